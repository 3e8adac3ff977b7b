"""Pseudo-mask refiners behind one batched interface, and the one registry of them.

Every refiner is called the same way, like the refine step of the served ensemble:

    masks = refiner(images, scores, cams, features)

uint8 images [B, H, W, 3], class scores [B, K] (predictions when serving; one-hot image
labels when making training pseudo-masks or scoring them), [0, 1] CAMs [B, K, H, W], and the
backbone's feature map [B, C, h, w] for the refiners that declare ``needs_features``; out come
uint8 masks [B, H, W]: 0 background, else 1 (``binary``) or class + 1.

Like pytorch-grad-cam's ``BaseCAM``, the base class owns the shared steps and a refiner
overrides one: the classical refiners (fixed or Otsu threshold, then optionally GrabCut or
Chan-Vese) say which pixels are one class's foreground (``ClassicalRefiner.foreground``) and
inherit how classes combine; the FNO level set is a network and overrides the whole call.
``served`` says how the repository serves each: ``python`` (this module, in Triton's Python
backend) or ``network`` (an exported graph, ``module``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar, Literal

import cv2
import numpy as np
import torch
from skimage.color import rgb2gray
from skimage.filters import threshold_otsu
from skimage.segmentation import chan_vese

from wsss.config import RefineConfig


def present_classes(
    scores: np.ndarray, multi_label: bool, threshold: float, min_score: float = 0.0
) -> list[int]:
    """Classes to refine: top-1, or all at or above ``threshold`` (at least the top one);
    none when even the top score is below ``min_score``."""
    top = int(scores.argmax())
    if scores[top] < min_score:
        return []
    if not multi_label:
        return [top]
    above = np.flatnonzero(scores >= max(threshold, min_score))
    return [int(c) for c in above] if len(above) else [top]


class Refiner(abc.ABC):
    """(images, scores, cams, features) -> masks; see the module docstring."""

    name: str = "base"
    needs_features: ClassVar[bool] = False
    served: ClassVar[Literal["python", "network"]] = "python"

    def __init__(
        self,
        multi_label: bool,
        binary: bool | None = None,
        score_threshold: float = 0.5,
        min_score: float = 0.0,
    ):
        self.multi_label = multi_label
        self.binary = not multi_label if binary is None else binary
        self.score_threshold, self.min_score = score_threshold, min_score

    def present(self, scores: np.ndarray) -> list[int]:
        return present_classes(scores, self.multi_label, self.score_threshold, self.min_score)

    @abc.abstractmethod
    def __call__(
        self,
        images: np.ndarray,
        scores: np.ndarray,
        cams: np.ndarray,
        features: np.ndarray | None = None,
    ) -> np.ndarray:
        """uint8 masks [B, H, W]."""


class ClassicalRefiner(Refiner):
    """Per class and image: ``foreground`` of its CAM; a pixel claimed by several present
    classes goes to the one whose CAM is strongest there, unclaimed pixels to background."""

    @abc.abstractmethod
    def foreground(self, cam: np.ndarray, image: np.ndarray) -> np.ndarray:
        """Boolean HxW foreground of one class from its [0, 1] CAM and the RGB image."""

    def __call__(self, images, scores, cams, features=None):
        return np.stack(
            [self.refine_one(img, s, c) for img, s, c in zip(images, scores, cams, strict=True)]
        )

    def refine_one(self, image: np.ndarray, scores: np.ndarray, cams: np.ndarray) -> np.ndarray:
        h, w = cams.shape[-2:]
        mask = np.zeros((h, w), np.uint8)
        best = np.full((h, w), -1.0, np.float32)
        for c in self.present(scores):
            fg = self.foreground(cams[c], image) & (cams[c] > best)
            mask[fg] = 1 if self.binary else c + 1
            best[fg] = cams[c][fg]
        return mask


class FixedThreshold(ClassicalRefiner):
    name = "fixed"

    def __init__(self, multi_label: bool, threshold: float = 0.5, **kwargs):
        super().__init__(multi_label, **kwargs)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), not {threshold}")
        self.threshold = threshold

    def foreground(self, cam, image):
        return cam >= self.threshold


class OtsuThreshold(ClassicalRefiner):
    """Otsu's threshold of the CAM histogram (scikit-image), per class and image."""

    name = "otsu"

    def foreground(self, cam, image):
        if float(cam.max() - cam.min()) < 1e-6:  # a flat map has no two modes to split
            return np.zeros(cam.shape, bool)
        return cam > threshold_otsu(cam)


class SeededRefiner(ClassicalRefiner):
    """A refinement that starts from a threshold refiner's mask (its ``seed``)."""

    def __init__(self, seed: ClassicalRefiner):
        super().__init__(seed.multi_label, seed.binary, seed.score_threshold, seed.min_score)
        self.seed = seed


class GrabCut(SeededRefiner):
    """OpenCV GrabCut seeded from a threshold refiner's mask and the CAM's confident bands.

    Pixels with CAM >= ``sure_fg`` are fixed foreground, <= ``sure_bg`` fixed background;
    the rest are probable foreground or background as ``seed`` decides. GrabCut then fits
    colour models to both and cuts along image edges. When the seed leaves one side with too
    few pixels to fit a colour model (all foreground, all background, a tiny image), the seed
    is returned unchanged: there is nothing for GrabCut to separate.
    """

    min_pixels = 16  # per side; GrabCut's 5-component colour models need a handful each

    def __init__(
        self,
        seed: ClassicalRefiner,
        iterations: int = 5,
        sure_fg: float = 0.8,
        sure_bg: float = 0.05,
    ):
        super().__init__(seed)
        if iterations < 1:
            raise ValueError("grabcut_iterations must be >= 1")
        if not 0.0 <= sure_bg < sure_fg <= 1.0:
            raise ValueError("need 0 <= sure_background < sure_foreground <= 1")
        self.iterations, self.sure_fg, self.sure_bg = iterations, sure_fg, sure_bg
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


class ChanVese(SeededRefiner):
    """Classical iterative Chan-Vese (scikit-image) on the grey image, from the seed's mask.

    The baseline of paper 003's efficiency table: the level set starts as the thresholded CAM
    (positive inside, as scikit-image wants) and evolves for exactly ``iterations`` steps
    (``tol=0``), so its cost can be compared step for step with the FNO evolution.
    """

    def __init__(self, seed: ClassicalRefiner, iterations: int = 15, mu: float = 0.25):
        super().__init__(seed)
        if iterations < 1:
            raise ValueError("chanvese_iterations must be >= 1")
        self.iterations, self.mu = iterations, mu
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


class LevelSetRefiner(Refiner):
    """Paper 003's FNO level-set refiner: a trained network (``training.levelset``).

    ``module`` is the graph the repository serves (``ServedLevelSet``: IMAGE, SCORES, CAMS,
    FEATURES -> PSEUDO_MASK); this class runs it on numpy batches like any refiner.
    """

    name = "levelset (FNO)"
    needs_features = True
    served = "network"

    def __init__(self, module: torch.nn.Module):
        super().__init__(module.multi_label, None, module.score_threshold, module.min_score)
        self.module = module.eval()

    @torch.inference_mode()
    def __call__(self, images, scores, cams, features=None):
        if features is None:
            raise ValueError("the level-set refiner needs the classifier's FEATURES")
        tensors = (torch.from_numpy(np.ascontiguousarray(a)) for a in (images, scores, cams))
        return self.module(*tensors, torch.from_numpy(np.ascontiguousarray(features))).numpy()


class ViTAttentionRefiner(Refiner):
    """Paper 000's open question: the foreground of a pretrained ViT's attention, with no CAM
    (``training.attention``). Binary tasks mark it 1; multi-class ones give each of its
    pixels to the present class whose CAM is strongest there."""

    name = "vit attention"

    def __init__(
        self,
        multi_label: bool,
        layers=(10, 11),
        sigma: float = 8.0,
        kernel: int = 15,
        weights: str | None = None,
        arch: str = "vit_small_patch14_dinov2",
        **presence,
    ):
        from training.attention import ViTAttention

        super().__init__(multi_label, **presence)
        if sigma < 0 or kernel < 0:
            raise ValueError("refine.vit_sigma and refine.vit_kernel: >= 0")
        self.attention = ViTAttention(layers, weights, arch)
        self.sigma, self.kernel = sigma, kernel

    def __call__(self, images, scores, cams, features=None):
        from training.attention import attention_mask

        h, w = cams.shape[-2:]
        out = np.zeros((len(images), h, w), np.uint8)
        for b, attention in enumerate(self.attention(images)):
            classes = self.present(scores[b])
            if not classes:
                continue
            fg = attention_mask(attention, self.sigma, self.kernel).astype(np.uint8)
            fg = cv2.resize(fg, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
            if self.binary:
                out[b][fg] = 1
            else:
                strongest = np.asarray(classes)[cams[b][classes].argmax(axis=0)] + 1
                out[b][fg] = strongest[fg]
        return out


# The registry: refine.method -> the first step; refine.grabcut / refine.chanvese -> the
# refinement that follows a threshold. ``build_refiner`` is the one place that reads
# RefineConfig.
REFINERS: dict[str, Callable[..., Refiner]] = {
    "fixed": FixedThreshold,
    "otsu": OtsuThreshold,
    "levelset": LevelSetRefiner,
    "vit": ViTAttentionRefiner,
    "grabcut": GrabCut,
    "chanvese": ChanVese,
}
METHODS = ("fixed", "otsu", "levelset", "vit")  # what refine.method names
FOLLOW_UPS = ("grabcut", "chanvese")  # what may follow a threshold


def build_refiner(
    cfg: RefineConfig,
    multi_label: bool,
    binary: bool | None = None,
    levelset: torch.nn.Module | None = None,
) -> Refiner:
    """The refiner a RefineConfig describes.

    ``levelset`` is the trained ``ServedLevelSet`` that ``refine.method: levelset`` needs
    (``training.pipeline.refine_step`` loads it from the run's checkpoint).
    """
    if cfg.method not in METHODS:
        raise ValueError(f"refine.method {cfg.method!r}: one of {', '.join(METHODS)}")
    if cfg.method == "levelset":
        if levelset is None:
            raise ValueError("refine.method levelset needs the trained level-set network")
        if cfg.grabcut or cfg.chanvese:
            raise ValueError("refine.grabcut and refine.chanvese follow a threshold, not levelset")
        return REFINERS["levelset"](levelset)
    presence = {
        "binary": binary,
        "score_threshold": cfg.score_threshold,
        "min_score": cfg.min_score,
    }
    if cfg.method == "vit":
        if cfg.grabcut or cfg.chanvese:
            raise ValueError("refine.grabcut and refine.chanvese follow a threshold, not vit")
        return REFINERS["vit"](
            multi_label,
            cfg.vit_layers,
            cfg.vit_sigma,
            cfg.vit_kernel,
            cfg.vit_weights,
            cfg.vit_arch,
            **presence,
        )
    extra = {"threshold": cfg.threshold} if cfg.method == "fixed" else {}
    refiner = REFINERS[cfg.method](multi_label, **extra, **presence)
    if cfg.grabcut and cfg.chanvese:
        raise ValueError("refine.grabcut and refine.chanvese exclude each other: pick one")
    if cfg.grabcut:
        refiner = REFINERS["grabcut"](
            refiner, cfg.grabcut_iterations, cfg.sure_foreground, cfg.sure_background
        )
    if cfg.chanvese:
        refiner = REFINERS["chanvese"](refiner, cfg.chanvese_iterations)
    return refiner
