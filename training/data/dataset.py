"""A torch Dataset over either layout: resized uint8 images, image-level targets, masks."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from training.data.layouts import (
    IGNORE,
    Sample,
    list_samples,
    read_class_names,
    read_image,
    read_mask,
)


class WSSSDataset(Dataset):
    """Images resized to ``size`` x ``size`` and held in memory (decoded once, not per epoch).

    Items are ``(image, target, mask)``: image uint8 HxWx3, target the class index (pets) or a
    multi-hot float vector (voc), mask uint8 HxW with 255 = ignore (evaluation only).
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
    ):
        self.class_names = read_class_names(root, task)
        self.num_classes = num_classes or len(self.class_names)
        self.task, self.size, self.augment = task, size, augment
        self.samples = samples if samples is not None else list_samples(root, task, split)
        if not self.samples:
            raise ValueError(f"{root}: the {split} split is empty")
        n = len(self.samples)
        self.images = np.empty((n, size, size, 3), np.uint8)
        self.masks = np.empty((n, size, size), np.uint8)
        for i, s in enumerate(tqdm(self.samples, desc=f"load {split}", unit="img", leave=False)):
            self.images[i] = cv2.resize(
                read_image(s.image_path), (size, size), interpolation=cv2.INTER_AREA
            )
            self.masks[i] = cv2.resize(
                read_mask(s, task), (size, size), interpolation=cv2.INTER_NEAREST
            )

    def __len__(self) -> int:
        return len(self.samples)

    def target(self, i: int) -> torch.Tensor:
        labels = self.samples[i].labels
        if self.task == "pets":
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
    mask = cv2.resize(mask[y : y + ch, x : x + cw], (size, size), interpolation=cv2.INTER_NEAREST)
    if rng.rand() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return image, mask


__all__ = ["IGNORE", "WSSSDataset", "random_resized_crop_flip"]
