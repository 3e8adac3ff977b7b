"""Pseudo-mask refiners: CAMs (+ the image) in, a class-index mask out, behind one interface.

A refiner decides, for one class at a time, which pixels are that class's foreground
(``foreground``). The shared ``__call__`` combines classes: a pixel claimed by several present
classes goes to the one whose CAM is strongest there; unclaimed pixels are background. A
refiner that reasons about all classes jointly overrides ``__call__`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.filters import threshold_otsu


class Refiner:
    name = "base"

    def foreground(self, cam: np.ndarray, image: np.ndarray) -> np.ndarray:
        """Boolean HxW foreground of one class from its [0, 1] CAM and the RGB image."""
        raise NotImplementedError

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


REFINERS = {"fixed": FixedThreshold, "otsu": OtsuThreshold}


def build_refiner(method: str, **kwargs) -> Refiner:
    if method not in REFINERS:
        raise ValueError(f"unknown refiner {method!r}: one of {sorted(REFINERS)}")
    if method == "fixed":
        return FixedThreshold(kwargs.get("threshold", 0.5))
    return REFINERS[method]()


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
