"""UNet (Ronneberger et al. 2015), written here because torchvision ships none.

Encoder of ``depth`` levels, each two 3x3 conv-BN-ReLU and a 2x2 max-pool, channels doubling
from ``base_channels``; the decoder upsamples, concatenates the skip and convolves. Inputs of
any size work: each upsampled map is resized to its skip's size before concatenation. Like
every model here it takes [0, 1] pixels and normalises them itself (ImageNet statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.models.common import Normalize


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(
        self, num_classes: int, base_channels: int = 16, depth: int = 4, in_channels: int = 3
    ):
        super().__init__()
        self.normalize = Normalize()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(in_channels, widths[0])])
        self.down.extend(_block(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(depth))
        )
        self.dec = nn.ModuleList(_block(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            skip = skips.pop()
            x = F.interpolate(up(x), size=skip.shape[-2:], mode="nearest")
            x = dec(torch.cat([skip, x], dim=1))
        return self.head(x)
