"""A torch Dataset over any layout: resized uint8 images, image-level targets, masks."""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from training.data.base import UnreadableImageError
from training.data.layouts import (
    IGNORE,
    DataLayoutError,
    Sample,
    describe,
    get_layout,
    list_samples,
    read_class_names,
    read_mask,
    read_palette,
    read_resized,
)
from training.data.synth import SYNTH_RECORD
from wsss.served.images import MAX_PIXELS, resize_mask
from wsss.task import get_task


def require_synth(data) -> None:
    """Where a ``wsss.config.DataConfig`` means the bundled synthetic benchmark and it is not
    written yet: say how to write it."""
    if data.synth_count and not Path(data.root).exists():
        raise DataLayoutError(
            f"{data.root} does not exist: where the profile means the bundled synthetic "
            "benchmark (data.synth_count), write it first with `wsss data synth` and the "
            "same --config/--set"
        )


class WSSSDataset(Dataset):
    """Images resized to ``size`` x ``size`` and held in memory (decoded once, not per epoch).

    Items are ``(image, target, mask)``: image uint8 HxWx3, target the class index (pets) or a
    multi-hot float vector (voc), mask uint8 HxW with 255 = ignore (evaluation only).
    ``layout`` names the reader (``training.data.layouts.LAYOUTS``; None: the task's own);
    ``source`` says what was read, e.g. VOC's train or train_aug, and how many images;
    ``palette`` the colours of its masks (VOC's colour map unless the masks bring theirs).
    """

    def __init__(
        self,
        root,
        task: str,
        split: str,
        size: int,
        num_classes: int | None = None,
        samples: list[Sample] | None = None,
        augment: bool = False,
        layout: str | None = None,
        skip_unreadable: bool = False,
        max_pixels: int = MAX_PIXELS,
    ):
        self.class_names = read_class_names(root, task, layout)
        self.class_info = get_layout(task, layout).class_info(Path(root))
        self.num_classes = num_classes or len(self.class_names)
        self.task, self.size, self.augment = task, size, augment
        self.kind = get_task(task)  # what the labels mean (wsss.task)
        listed = samples if samples is not None else list_samples(root, task, split, layout)
        if not listed:
            raise DataLayoutError(f"{root}: the {split} split is empty")
        self.palette = read_palette(root, task, layout)  # the masks' colours, for exports
        images = np.empty((len(listed), size, size, 3), np.uint8)
        masks = np.empty((len(listed), size, size), np.uint8)
        known = len(self.class_names)
        # Listed files that are missing or do not decode: an error naming the first, or with
        # skip_unreadable (data.skip_unreadable) left out and counted in ``skipped``.
        self.samples, self.skipped = [], []
        for s in tqdm(listed, desc=f"load {split}", unit="img", leave=False):
            try:
                image, shape = read_resized(s.image_path, (size, size), max_pixels)
            except UnreadableImageError as exc:
                if not skip_unreadable:
                    larger = (
                        "; data.max_image_pixels reads larger photos"
                        if "exceeds the limit" in str(exc)
                        else ""
                    )
                    raise UnreadableImageError(
                        f"{exc} (listed in the {split} split; data.skip_unreadable=true "
                        f"leaves such files out{larger})"
                    ) from None
                self.skipped.append(str(exc))
                continue
            mask = read_mask(s, task, shape, known)
            i = len(self.samples)
            # The served decoder and its resize (wsss.served.images.decode_resized), so a
            # photo's pixels here are the pixels the server classifies.
            images[i] = image
            masks[i] = resize_mask(mask, (size, size))
            self.samples.append(s)
        n = len(self.samples)
        if not n:
            raise DataLayoutError(f"{root}: no image of the {split} split could be read")
        self.images, self.masks = images[:n], masks[:n]
        what = describe(root, task, split, layout) if samples is None else str(root)
        if (Path(root) / SYNTH_RECORD).is_file():  # a profile's stand-in: say it is no photo
            what += ", synthetic (drawn by `wsss data synth`, not photos)"
        self.source = f"{what}: {n:,} images, {len(self.class_names)} classes"
        if self.skipped:
            self.source += f" ({len(self.skipped)} unreadable skipped)"

    @property
    def aliases(self) -> list[str | None]:
        """Another name of each class, where the layout gives one (``class_info``'s alias: a
        Pet breed's species, cat or dog), which an ImageNet head's groups may name."""
        return [info.get("alias") for info in self.class_info]

    @classmethod
    def from_config(cls, data, split: str) -> WSSSDataset:
        """``split`` of the data a ``wsss.config.DataConfig`` describes: the one place the
        config's data settings become a dataset."""
        require_synth(data)
        return cls(
            data.root,
            data.task,
            split,
            data.image_size,
            layout=data.layout,
            skip_unreadable=data.skip_unreadable,
            max_pixels=data.max_image_pixels,
        )

    def subset(self, indices) -> WSSSDataset:
        """The images ``indices`` names (in that order), sharing nothing that changes: a
        fold of a cross-validation, without decoding the photos again."""
        indices = np.asarray(indices, int)
        part = copy.copy(self)
        part.images, part.masks = self.images[indices], self.masks[indices]
        part.samples = [self.samples[i] for i in indices]
        part.source = f"{self.source.split(':')[0]}: {len(indices):,} of its images"
        return part

    def full_mask(self, i: int) -> np.ndarray:
        """Sample ``i``'s ground truth at its image's own resolution, read again from disk
        (scores are taken there, with the model's masks resized back)."""
        return read_mask(self.samples[i], self.task, None, len(self.class_names))

    @property
    def has_masks(self) -> bool:
        """Whether any pixel can be scored (a plain folder may come without masks)."""
        return bool((self.masks != IGNORE).any())

    def __len__(self) -> int:
        return len(self.samples)

    def target(self, i: int) -> torch.Tensor:
        labels = self.samples[i].labels
        if not self.kind.multi_label:
            return torch.tensor(labels[0])
        multi_hot = torch.zeros(self.num_classes)
        multi_hot[list(labels)] = 1.0
        return multi_hot

    def __getitem__(self, i: int):
        image, mask = self.images[i], self.masks[i]
        if self.augment:
            image, mask = random_resized_crop_flip(image, mask, self.size)
        return (
            torch.from_numpy(np.ascontiguousarray(image)),
            self.target(i),
            torch.from_numpy(np.ascontiguousarray(mask)),
        )


def random_resized_crop_flip(
    image: np.ndarray, mask: np.ndarray, size: int, scale=(0.5, 1.0), rng=np.random
):
    """Crop a random 50-100% area square-ish window, resize back, maybe mirror."""
    h, w = mask.shape
    area = h * w * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, round(np.sqrt(area / aspect))))
    cw = int(min(w, round(np.sqrt(area * aspect))))
    y, x = rng.randint(0, h - ch + 1), rng.randint(0, w - cw + 1)
    image = cv2.resize(image[y : y + ch, x : x + cw], (size, size), interpolation=cv2.INTER_LINEAR)
    mask = resize_mask(mask[y : y + ch, x : x + cw], (size, size))
    if rng.rand() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return image, mask


__all__ = ["IGNORE", "WSSSDataset", "random_resized_crop_flip"]
