"""The served pipeline, in process: the reference every exported model is checked against.

``ServedClassifier`` and ``ServedSegmenter`` are exactly the graphs that get exported: uint8
NHWC pixels in, the tensors of ``wsss.tensors`` out. ``Pipeline`` chains them with a refiner
as the Triton ensemble does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.cams import CAM_METHODS
from training.levelset.model import ServedLevelSet
from training.levelset.train import load_levelset
from training.loop import load_checkpoint
from training.models import build_classifier, build_segmenter
from training.models.classifier import CAMClassifier
from training.models.common import to_input
from training.refine import Refiner, build_refiner, present_classes, refine_batch


class ServedClassifier(nn.Module):
    """IMAGE -> SCORES, CAMS (and FEATURES, the backbone's map, for the level-set refiner)."""

    def __init__(self, net: CAMClassifier, multi_label: bool, features: bool = False):
        super().__init__()
        self.net, self.multi_label, self.features = net, multi_label, features

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = to_input(images)
        feats = self.net.forward_features(x)
        logits = self.net.forward_head(feats)
        cams = CAM_METHODS[self.net.cam_method](feats, self.net.fc.weight, x.shape[-2:])
        scores = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)
        return (scores, cams, feats) if self.features else (scores, cams)


class ServedSegmenter(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.net(to_input(images)), dim=1)
        return probs, probs.argmax(dim=1).to(torch.uint8)


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a classifier or segmenter from a checkpoint (weights only: no pickled code)."""
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    build = build_classifier if meta["family"] == "classifier" else build_segmenter
    model = build(meta["arch"], **meta["kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), meta


def one_hot(classes: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """Image-level labels as the scores a refiner step reads (1 for each present class)."""
    out = np.zeros((len(classes), num_classes), np.float32)
    for row, cls in zip(out, classes, strict=True):
        row[list(cls)] = 1.0
    return out


@dataclass
class Pipeline:
    """Classifier -> refiner -> segmenter, as the ``wsss_pipeline`` ensemble runs them.

    ``refiner`` is a classical ``Refiner`` (numpy, per image) or the level-set network
    (``ServedLevelSet``, which reads the classifier's features as well).
    """

    classifier: ServedClassifier
    segmenter: ServedSegmenter | None
    refiner: Refiner | ServedLevelSet
    multi_label: bool
    score_threshold: float = 0.5

    @torch.inference_mode()
    def classify(self, images: np.ndarray) -> tuple[torch.Tensor, ...]:
        """SCORES, CAMS and (for the level-set refiner) FEATURES of uint8 [B, H, W, 3]."""
        return self.classifier(torch.from_numpy(np.ascontiguousarray(images)))

    @torch.inference_mode()
    def refine(
        self,
        images: np.ndarray,
        outputs: tuple[torch.Tensor, ...],
        classes: Sequence[Sequence[int]] | None = None,
        binary: bool | None = None,
    ) -> np.ndarray:
        """Pseudo-masks for the classes given (image labels), else for the predicted ones.

        ``binary`` (default: single-label task) makes a classical refiner write 1 for every
        object pixel, else class + 1 (the level-set seeds of a binary task need the class).
        The served level-set graph fixes its own encoding, the task's.
        """
        scores, cams, *features = outputs
        binary = not self.multi_label if binary is None else binary
        if isinstance(self.refiner, ServedLevelSet):
            if classes is not None:
                scores = torch.from_numpy(one_hot(classes, scores.shape[1]))
            x = torch.from_numpy(np.ascontiguousarray(images))
            return self.refiner(x, scores, cams, features[0]).numpy()
        if classes is None:
            classes = [
                present_classes(s, self.multi_label, self.score_threshold) for s in scores.numpy()
            ]
        return refine_batch(self.refiner, images, cams.numpy(), classes, binary)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [B, H, W, 3] -> the ensemble's outputs, keyed by their served names."""
        outputs = self.classify(images)
        pseudo = self.refine(images, outputs)
        probs, seg = (t.numpy() for t in self.segmenter(torch.from_numpy(images)))
        return {
            "SCORES": outputs[0].numpy(),
            "CAMS": outputs[1].numpy(),
            "PSEUDO_MASK": pseudo,
            "SEG_PROBS": probs,
            "SEGMENTATION": seg,
        }


def refine_step(cfg) -> tuple[ServedClassifier, Refiner | ServedLevelSet, dict]:
    """The served classifier and refiner the config names, and the classifier's metadata
    (task, class names), from the run's checkpoints.

    For ``refine.method: levelset`` all come from the level-set checkpoint: it holds the
    backbone the level-set head was trained on (fine-tuned or not).
    """
    runs = Path(cfg.runs)
    if cfg.refine.method == "levelset":
        net, head, ls_meta = load_levelset(runs / "levelset" / "best.pt")
        meta = ls_meta["classifier"]
        multi = meta["task"] == "voc"
        refiner: Refiner | ServedLevelSet = ServedLevelSet(head, multi, cfg.refine.score_threshold)
    else:
        net, meta = load_model(runs / "classifier" / "best.pt")
        multi = meta["task"] == "voc"
        refiner = build_refiner(cfg.refine)
    net.cam_method = cfg.classifier.cam_method
    served = ServedClassifier(net, multi, features=isinstance(refiner, ServedLevelSet)).eval()
    return served, refiner, meta


def pipeline_from_config(cfg, segmenter: bool = True) -> Pipeline:
    classifier, refiner, _ = refine_step(cfg)
    seg = None
    if segmenter:
        net, _ = load_model(Path(cfg.runs) / "segmenter" / "best.pt")
        seg = ServedSegmenter(net).eval()
    return Pipeline(classifier, seg, refiner, classifier.multi_label, cfg.refine.score_threshold)
