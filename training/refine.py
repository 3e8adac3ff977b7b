"""Pseudo-mask refiners: CAMs (+ the image) in, a class-index mask out, behind one interface.

A refiner decides, for one class at a time, which pixels are that class's foreground
(``foreground``). The shared ``__call__`` combines classes: a pixel claimed by several present
classes goes to the one whose CAM is strongest there; unclaimed pixels are background. A
refiner that reasons about all classes jointly overrides ``__call__`` instead.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import cv2
import numpy as np
from skimage.color import rgb2gray
from skimage.filters import threshold_otsu
from skimage.segmentation import chan_vese

from wsss.config import RefineConfig


class Refiner(abc.ABC):
    name = "base"

    @abc.abstractmethod
    def foreground(self, cam: np.ndarray, image: np.ndarray) -> np.ndarray:
        """Boolean HxW foreground of one class from its [0, 1] CAM and the RGB image."""

    def __call__(
        self, image: np.ndarray, cams: np.ndarray, classes: Sequence[int], binary: bool
    ) -> np.ndarray:
        """uint8 HxW mask: 0 background, else ``1`` (binary) or ``class + 1`` (multi-class).

        ``cams`` is [K, H, W] in [0, 1]; ``classes`` are the classes present (labels at
        training time, predictions at serving time); ``binary`` folds them into one foreground.
        """
        h, w = cams.shape[-2:]
        mask = np.zeros((h, w), np.uint8)
        best = np.full((h, w), -1.0, np.float32)
        for c in classes:
            fg = self.foreground(cams[c], image) & (cams[c] > best)
            mask[fg] = 1 if binary else c + 1
            best[fg] = cams[c][fg]
        return mask


class FixedThreshold(Refiner):
    name = "fixed"

    def __init__(self, threshold: float = 0.5):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), not {threshold}")
        self.threshold = threshold

    def foreground(self, cam, image):
        return cam >= self.threshold


class OtsuThreshold(Refiner):
    """Otsu's threshold of the CAM histogram (scikit-image), per class and image."""

    name = "otsu"

    def foreground(self, cam, image):
        if float(cam.max() - cam.min()) < 1e-6:  # a flat map has no two modes to split
            return np.zeros(cam.shape, bool)
        return cam > threshold_otsu(cam)


class GrabCut(Refiner):
    """OpenCV GrabCut seeded from a threshold refiner's mask and the CAM's confident bands.

    Pixels with CAM >= ``sure_fg`` are fixed foreground, <= ``sure_bg`` fixed background;
    the rest are probable foreground or background as ``seed`` decides. GrabCut then fits
    colour models to both and cuts along image edges. When the seed leaves one side with too
    few pixels to fit a colour model (all foreground, all background, a tiny image), the seed
    is returned unchanged: there is nothing for GrabCut to separate.
    """

    min_pixels = 16  # per side; GrabCut's 5-component colour models need a handful each

    def __init__(
        self, seed: Refiner, iterations: int = 5, sure_fg: float = 0.8, sure_bg: float = 0.05
    ):
        if iterations < 1:
            raise ValueError("grabcut_iterations must be >= 1")
        if not 0.0 <= sure_bg < sure_fg <= 1.0:
            raise ValueError("need 0 <= sure_background < sure_foreground <= 1")
        self.seed, self.iterations = seed, iterations
        self.sure_fg, self.sure_bg = sure_fg, sure_bg
        self.name = f"{seed.name}+grabcut"

    def foreground(self, cam, image):
        init = self.seed.foreground(cam, image)
        mask = np.where(init, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
        mask[(cam >= self.sure_fg) & init] = cv2.GC_FGD
        mask[(cam <= self.sure_bg) & ~init] = cv2.GC_BGD
        fg = np.count_nonzero(init)
        if min(fg, init.size - fg) < self.min_pixels or min(image.shape[:2]) < 8:
            return init
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        bgr = cv2.cvtColor(np.ascontiguousarray(image, np.uint8), cv2.COLOR_RGB2BGR)
        # GrabCut seeds its colour models by k-means from OpenCV's thread-global RNG, whose
        # state depends on whatever ran before: seed it, or masks differ between processes.
        cv2.setRNGSeed(0)
        cv2.grabCut(bgr, mask, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
        return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


class ChanVese(Refiner):
    """Classical iterative Chan-Vese (scikit-image) on the grey image, from the seed's mask.

    The baseline of paper 003's efficiency table: the level set starts as the thresholded CAM
    (positive inside, as scikit-image wants) and evolves for exactly ``iterations`` steps
    (``tol=0``), so its cost can be compared step for step with the FNO evolution.
    """

    def __init__(self, seed: Refiner, iterations: int = 15, mu: float = 0.25):
        if iterations < 1:
            raise ValueError("chanvese_iterations must be >= 1")
        self.seed, self.iterations, self.mu = seed, iterations, mu
        self.name = f"{seed.name}+chanvese{iterations}"

    def foreground(self, cam, image):
        init = self.seed.foreground(cam, image)
        if init.all() or not init.any():  # no contour to evolve
            return init
        grey = rgb2gray(image) if image.ndim == 3 else image.astype(np.float64) / 255.0
        start = np.where(init, 1.0, -1.0)
        return chan_vese(
            grey, mu=self.mu, tol=0.0, max_num_iter=self.iterations, init_level_set=start
        )


def build_refiner(cfg: RefineConfig) -> Refiner:
    """The refiner a RefineConfig describes: a threshold, then optionally GrabCut or Chan-Vese.

    ``method: levelset`` is a trained network, built by ``training.pipeline`` instead.
    """
    if cfg.method == "fixed":
        refiner: Refiner = FixedThreshold(cfg.threshold)
    elif cfg.method == "otsu":
        refiner = OtsuThreshold()
    else:
        raise ValueError(f"refine.method {cfg.method!r} has no classical refiner: fixed or otsu")
    if cfg.grabcut and cfg.chanvese:
        raise ValueError("refine.grabcut and refine.chanvese exclude each other: pick one")
    if cfg.grabcut:
        refiner = GrabCut(refiner, cfg.grabcut_iterations, cfg.sure_foreground, cfg.sure_background)
    if cfg.chanvese:
        refiner = ChanVese(refiner, cfg.chanvese_iterations)
    return refiner


def present_classes(scores: np.ndarray, multi_label: bool, threshold: float) -> list[int]:
    """Classes to refine when serving: top-1, or all above ``threshold`` (at least one)."""
    if not multi_label:
        return [int(scores.argmax())]
    above = np.flatnonzero(scores >= threshold)
    return [int(c) for c in above] if len(above) else [int(scores.argmax())]


def refine_batch(
    refiner: Refiner,
    images: np.ndarray,
    cams: np.ndarray,
    classes: Sequence[Sequence[int]],
    binary: bool,
) -> np.ndarray:
    """uint8 [B, H, W] masks for a batch; the same code runs in-process and inside Triton."""
    return np.stack(
        [
            refiner(img, cam, cls, binary)
            for img, cam, cls in zip(images, cams, classes, strict=True)
        ]
    )
