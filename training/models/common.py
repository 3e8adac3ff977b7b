"""Input conventions shared by training, the in-process pipeline and the exported graphs."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC RGB (what clients send) -> float32 NCHW normalised (what networks eat).

    Living inside every exported graph, this makes the served models take raw pixels, so no
    client can get the normalisation wrong.
    """
    x = images.permute(0, 3, 1, 2).float().div(255.0)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std
