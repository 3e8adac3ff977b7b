"""The served pipeline, in process: the reference every exported model is checked against.

``ServedClassifier`` and ``ServedSegmenter`` are exactly the graphs that get exported: uint8
NHWC pixels in, the tensors of ``wsss.tensors`` out. ``Pipeline`` chains them with a refiner
as the Triton ensemble does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.loop import load_checkpoint
from training.models import build_classifier, build_segmenter
from training.models.classifier import CAMClassifier
from training.models.common import to_input
from training.refine import Refiner, build_refiner, present_classes, refine_batch


class ServedClassifier(nn.Module):
    def __init__(self, net: CAMClassifier, multi_label: bool):
        super().__init__()
        self.net, self.multi_label = net, multi_label

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cams = self.net.logits_and_cams(to_input(images))
        scores = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)
        return scores, cams


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


@dataclass
class Pipeline:
    classifier: ServedClassifier
    segmenter: ServedSegmenter
    refiner: Refiner
    multi_label: bool
    score_threshold: float = 0.5

    @classmethod
    def from_checkpoints(
        cls,
        classifier: str | Path,
        segmenter: str | Path,
        refiner: Refiner,
        score_threshold: float = 0.5,
    ) -> Pipeline:
        net, meta = load_model(classifier)
        seg, _ = load_model(segmenter)
        multi = meta["task"] == "voc"
        return cls(
            ServedClassifier(net, multi).eval(),
            ServedSegmenter(seg).eval(),
            refiner,
            multi,
            score_threshold,
        )

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [B, H, W, 3] -> the ensemble's outputs, keyed by their served names."""
        x = torch.from_numpy(np.ascontiguousarray(images))
        scores, cams = (t.numpy() for t in self.classifier(x))
        probs, seg = (t.numpy() for t in self.segmenter(x))
        classes = [present_classes(s, self.multi_label, self.score_threshold) for s in scores]
        pseudo = refine_batch(self.refiner, images, cams, classes, binary=not self.multi_label)
        return {
            "SCORES": scores,
            "CAMS": cams,
            "PSEUDO_MASK": pseudo,
            "SEG_PROBS": probs,
            "SEGMENTATION": seg,
        }


def pipeline_from_config(cfg) -> Pipeline:
    runs = Path(cfg.runs)
    pipe = Pipeline.from_checkpoints(
        runs / "classifier" / "best.pt",
        runs / "segmenter" / "best.pt",
        build_refiner(cfg.refine),
        cfg.refine.score_threshold,
    )
    pipe.classifier.net.cam_method = cfg.classifier.cam_method
    return pipe
