"""What a data set's labels mean: the one place that knows a task's kind.

A task is named in configs (``data.task``) and saved in checkpoint metadata; everything that
behaves differently per task asks its ``Task`` here, never the name. Checkpoints saved before
the Task existed hold the bare name; ``get_task`` reads both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from wsss.errors import InputError


@dataclass(frozen=True)
class Task:
    name: str
    # One label per image (softmax scores, cross-entropy, top-1 accuracy) or several
    # (sigmoid scores, one binary cross-entropy per class, mAP).
    multi_label: bool
    # Masks: 1 for the foreground whatever its class (so a segmenter of two classes), or
    # class + 1 per pixel (background + every class).
    binary_masks: bool

    @property
    def loss(self) -> Literal["ce", "bce"]:
        """The classification loss: cross-entropy, or binary cross-entropy per class."""
        return "bce" if self.multi_label else "ce"

    @property
    def metric(self) -> Literal["accuracy", "map"]:
        """The classification score reports give (a key of the evaluation rows)."""
        return "map" if self.multi_label else "accuracy"

    @property
    def metric_label(self) -> str:
        return "mAP" if self.multi_label else "accuracy"

    @property
    def iou(self) -> Literal["iou", "miou"]:
        """The mask score: the foreground's IoU, or the mean IoU over the classes."""
        return "iou" if self.binary_masks else "miou"

    def iou_key(self, part: str) -> str:
        """That score of ``part`` (pseudo, seg): a key of the evaluation rows."""
        return f"{part}_{self.iou}"

    def segmentation_classes(self, num_classes: int) -> int:
        """Segmenter outputs: background + foreground, or background + every class."""
        return 2 if self.binary_masks else num_classes + 1

    def as_meta(self) -> dict:
        return dataclasses.asdict(self)


TASKS = {
    "pets": Task("pets", multi_label=False, binary_masks=True),
    "voc": Task("voc", multi_label=True, binary_masks=False),
}


def get_task(value: str | dict | Task) -> Task:
    """The Task a config names or a checkpoint saved (its fields, or its bare name)."""
    if isinstance(value, Task):
        return value
    if isinstance(value, dict):
        return Task(**value)
    if value not in TASKS:
        raise InputError(f"unknown task {value!r}: one of {', '.join(TASKS)}")
    return TASKS[value]
