"""Input conventions shared by training, the in-process pipeline and the exported graphs.

Clients send uint8 RGB pixels; ``to_pixels`` makes them [0, 1] float tensors, and every model
normalises them itself with the statistics its weights were trained with (``Normalize``, the
first step of its forward pass). So the normalisation travels inside each exported graph, no
client can get it wrong, and backbones with different conventions (ImageNet mean/std for
torchvision's, [-1, 1] for EfficientNet-Lite's) sit side by side.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from wsss.served.classical import IMAGENET_MEAN, IMAGENET_STD  # one copy, the served one


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC RGB (what clients send) -> float32 NCHW in [0, 1] (what models take)."""
    return images.permute(0, 3, 1, 2).float().div(255.0)


class Normalize(nn.Module):
    """(x - mean) / std per channel; the statistics are not saved in state dicts (they are
    a property of the architecture's weights, rebuilt with the model)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
