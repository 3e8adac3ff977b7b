"""Segmentation scores from a confusion matrix, ignoring 255 (trimap 3 / VOC boundaries)."""

from __future__ import annotations

import numpy as np

from training.data import IGNORE
from wsss.errors import InputError


class ConfusionMatrix:
    def __init__(self, num_classes: int):
        self.n = num_classes
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        keep = target != IGNORE
        t, p = target[keep].astype(np.int64), pred[keep].astype(np.int64)
        if t.size and (t.max() >= self.n or p.max() >= self.n):
            raise InputError(f"class index out of range for {self.n} classes")
        self.matrix += np.bincount(t * self.n + p, minlength=self.n**2).reshape(self.n, self.n)

    def iou(self) -> np.ndarray:
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        return np.divide(tp, union, out=np.full(self.n, np.nan), where=union > 0)

    def dice(self) -> np.ndarray:
        tp = np.diag(self.matrix).astype(np.float64)
        denom = self.matrix.sum(0) + self.matrix.sum(1)
        return np.divide(2 * tp, denom, out=np.full(self.n, np.nan), where=denom > 0)

    def summary(self, binary: bool) -> dict[str, float]:
        """Binary: foreground IoU and Dice (the pets convention). Multi-class: mIoU over
        background + the classes that the truth or the prediction holds (ignored pixels
        aside), and how many classes that mean is over (``classes``, background included)."""
        if binary:
            return {"iou": float(self.iou()[1]), "dice": float(self.dice()[1])}
        iou = self.iou()
        return {
            "miou": float(np.nanmean(iou)),
            "mdice": float(np.nanmean(self.dice())),
            "classes": int(np.count_nonzero(~np.isnan(iou))),
        }

    def per_class(self) -> list[float | None]:
        """Each class's IoU (None where neither truth nor prediction holds it)."""
        return [None if np.isnan(v) else float(v) for v in self.iou()]


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """Mean over classes of the average precision of ranking images by each class's score
    (the multi-label classifier's metric: the area under the precision-recall steps, not
    interpolated, as scikit-learn's ``average_precision_score``); classes no image holds are
    skipped. Images of equal score are one step, taken together: the order they were listed
    in changes nothing."""
    aps = []
    for s, t in zip(scores.T, truth.T, strict=True):
        if not t.any():
            continue
        order = np.argsort(-s, kind="stable")
        s, hits = s[order], t[order].astype(np.float64)
        last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the end of each score's run
        found = np.cumsum(hits)[last]
        precision = found / (last + 1)
        recalled = np.diff(np.r_[0.0, found])  # the positives each step adds
        aps.append(float((recalled * precision).sum() / found[-1]))
    return float(np.mean(aps)) if aps else float("nan")


def label_f1(predicted: np.ndarray, truth: np.ndarray, missed: np.ndarray | None = None) -> float:
    """Mean over images of the F1 of the predicted class set against the true one, both
    bool [N, K] (an image with neither scores 1): how well a multi-label classifier says
    what a photo holds at its thresholds, beside the threshold-free mAP. ``missed`` [N]:
    each image's true classes beyond the K (a class the classifier does not have), which
    it cannot predict: each a miss."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    if not len(truth):
        return float("nan")
    hits = (predicted & truth).sum(1)
    total = predicted.sum(1) + truth.sum(1)
    if missed is not None:
        total = total + np.asarray(missed)
    return float(np.mean(np.where(total > 0, 2 * hits / np.maximum(total, 1), 1.0)))
