"""A fully connected CRF as a pseudo-mask follow-up (Krahenbuhl & Koltun, NIPS 2011).

The WSSS literature's standard post-processing of CAM masks (PSA, IRN and most since): each
pixel's label is pulled towards those of pixels near it and of similar colour. Here it runs
per class, like GrabCut: the seed's mask is the unary (``confidence`` that a pixel inside it
is the class, 1 - that outside), then ``iterations`` steps of mean-field inference with a
smoothness kernel (3 px) and an appearance kernel (``spatial`` px, ``colour`` RGB levels).
The inference is pydensecrf2's (the maintained build of Krahenbuhl's code), not rewritten.
It is a training follow-up only, and an optional extra (``wsss[crf]``): the library
compiles from source, which the container images cannot (the served refiner refuses it).
"""

from __future__ import annotations

import numpy as np

from wsss.errors import InputError


class DenseCRF:
    """``step(image, cam, init) -> bool``: the follow-up ``Followed`` and the saliency
    refiner call, from a RefineConfig's crf_* settings."""

    name = "crf"

    def __init__(
        self,
        confidence: float = 0.8,
        iterations: int = 5,
        spatial: float = 50.0,
        colour: float = 13.0,
        weight: float = 10.0,
    ):
        if not 0.5 < confidence < 1.0:
            raise InputError(f"refine.crf_confidence must be in (0.5, 1), not {confidence}")
        if iterations < 1 or spatial <= 0 or colour <= 0 or weight < 0:
            raise InputError("refine.crf_iterations >= 1, crf_spatial and crf_colour > 0")
        try:
            import pydensecrf.densecrf  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "refine.crf needs pydensecrf2, which compiles from source: `make setup`, or "
                "pip install 'wsss[crf]' where a C compiler is (the container images have none)"
            ) from exc
        self.confidence, self.iterations = confidence, iterations
        self.spatial, self.colour, self.weight = spatial, colour, weight

    @classmethod
    def of(cls, settings: dict) -> DenseCRF:
        """From a RefineConfig's crf_* fields, as a dict (``dataclasses.asdict``)."""
        names = ("confidence", "iterations", "spatial", "colour", "weight")
        return cls(*(settings[f"crf_{n}"] for n in names))

    def __call__(self, image: np.ndarray, cam: np.ndarray, init: np.ndarray) -> np.ndarray:
        import pydensecrf.densecrf as dcrf

        h, w = init.shape
        p = np.where(init, self.confidence, 1.0 - self.confidence).astype(np.float32)
        unary = -np.log(np.stack([1.0 - p, p]).reshape(2, -1))
        crf = dcrf.DenseCRF2D(w, h, 2)
        crf.setUnaryEnergy(np.ascontiguousarray(unary, np.float32))
        crf.addPairwiseGaussian(sxy=3, compat=3)
        rgb = np.ascontiguousarray(image[..., :3], np.uint8)
        crf.addPairwiseBilateral(sxy=self.spatial, srgb=self.colour, rgbim=rgb, compat=self.weight)
        q = np.asarray(crf.inference(self.iterations)).reshape(2, h, w)
        refined = q[1] > q[0]
        # The class is there (its label, or its score, says so): where the smoothing votes
        # all of it to background (a seed under half of a same-coloured object), the seed
        # is kept rather than the class lost. On the 150 training photos of
        # configs/coco_voc.yaml this happened to 3 of 253 classes (pseudo-mask mIoU 0.3535
        # -> 0.3539).
        return refined if refined.any() or not init.any() else init
