"""The level-set refiner of paper 003 (section 3): initialise from features, evolve with an FNO.

- ``LevelSetInit`` (f_LSI, eq 7): the classifier's feature map, its CAMs and the image -> one
  level set per class at image resolution, trained towards the signed distance functions of
  the CAM masks (eqs 9-12, 25).
- ``FNOGroup`` (f_LSE, eqs 14-17): Fourier layers whose spectral branch is re-weighted per
  class by SE channel attention, a 1x1 linear path beside it, GELU between layers and a
  residual linear path from the initial level sets, so level sets of different classes
  exchange information while they evolve.
- ``LevelSetHead`` chains both; ``LevelSetGraph`` is the graph the repository serves as the
  refine step: image, class scores, CAMs and features in, a pseudo-mask out.

Level sets are negative inside an object (see ``training.levelset.energy``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.levelset.spectral import SpectralConv2d
from training.models.common import Normalize, to_pixels
from training.torch_refiners import claim_mask, present_classes_mask
from wsss.errors import InputError


class LevelSetInit(nn.Module):
    """f_LSI: coarse semantic features and the CAMs, fused with a shallow image branch.

    The features and CAMs say where each class is (the CAMs are a fixed linear read-out of
    the features, passed in so the head need not relearn it from a 1x1 projection); the image
    branch gives the edges a coarse feature map cannot. ``tanh`` keeps the output in the
    range of the clipped SDF targets.

    ``cam_prior`` (a CAM level t, or None: the paper's f_LSI) adds ``PRIOR_SCALE * (t - CAM)``
    before the ``tanh`` and zeroes the head's last layer, so an untrained head's level sets
    are the CAM's own fixed-threshold masks and training learns a correction to them rather
    than the masks themselves (20 classes and 128 photos are too few for the latter:
    reports/coco_voc/README.md).
    """

    PRIOR_SCALE = 4.0  # (t - CAM) in [-1, 1] -> level-set units of about the clipped SDF's

    def __init__(
        self,
        feature_channels: int,
        num_classes: int,
        hidden: int = 32,
        cam_prior: float | None = None,
    ):
        super().__init__()
        self.cam_prior = cam_prior
        self.project = nn.Sequential(nn.Conv2d(feature_channels, hidden, 1), nn.ReLU(inplace=True))
        half = hidden // 2
        self.image = nn.Sequential(
            nn.Conv2d(3, half, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(
            nn.Conv2d(hidden + half + num_classes, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, num_classes, 1),
        )
        if cam_prior is not None:
            with torch.no_grad():
                self.head[-1].weight.zero_()
                self.head[-1].bias.zero_()

    def forward(self, features: torch.Tensor, x: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
        semantic = F.interpolate(
            self.project(features), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        phi = self.head(torch.cat([semantic, cams, self.image(x)], dim=1))
        if self.cam_prior is not None:
            phi = phi + self.PRIOR_SCALE * (self.cam_prior - cams)
        return torch.tanh(phi)


class ChannelAttention(nn.Module):
    """SE-style weights w_i, one per level set, from all level sets' pooled responses."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 2)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as a batched channel matmul (same weights, same result).

    At FNO widths (the number of classes) the CPU convolution kernel is mostly layout
    overhead; with this the FNO group runs 1.2-1.4x faster on the CPU (10 classes, 96-224 px).
    """
    b = x.shape[0]
    w = conv.weight[:, :, 0, 0].expand(b, -1, -1)  # [B, Cout, Cin]
    out = torch.baddbmm(conv.bias[None, :, None], w, x.flatten(2))
    return out.unflatten(-1, x.shape[-2:])


class FourierLayer(nn.Module):
    """Eq 17 before its activation: L(phi) + w * F^-1(R(F(phi)))."""

    def __init__(self, width: int, modes: int):
        super().__init__()
        self.spectral = SpectralConv2d(width, width, modes, modes)
        self.linear = nn.Conv2d(width, width, 1)
        self.attention = ChannelAttention(width)

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        spectral = self.spectral(phi)
        return pointwise(self.linear, phi) + self.attention(spectral) * spectral


class FNOGroup(nn.Module):
    """f_LSE: ``layers`` Fourier layers of width = number of classes, plus a residual path."""

    def __init__(self, width: int, modes: int = 12, layers: int = 4):
        super().__init__()
        if layers < 1:
            raise InputError("levelset.layers must be >= 1")
        self.layers = nn.ModuleList(FourierLayer(width, modes) for _ in range(layers))
        self.residual = nn.Conv2d(width, width, 1)
        # Start as "evolution = identity + a small learned update", so an untrained group
        # leaves the initial level sets where they are rather than scrambling them.
        with torch.no_grad():
            self.residual.weight.copy_(torch.eye(width)[:, :, None, None])
            self.residual.bias.zero_()
            last = self.layers[-1]
            last.linear.weight.mul_(0.1)
            last.spectral.weight.mul_(0.1)
            # Its bias keeps its default draw: a small offset per class (1-5% of pixels
            # cross their zero contour untrained). Zeroed, the real-photo level set trained
            # 3 points below its seed instead of above it (docs/levelset.md).

    def forward(self, phi0: torch.Tensor) -> torch.Tensor:
        phi = phi0
        for i, layer in enumerate(self.layers):
            phi = layer(phi)
            if i < len(self.layers) - 1:
                phi = F.gelu(phi)
        return phi + pointwise(self.residual, phi0)


class LevelSetHead(nn.Module):
    """Features, normalised image, CAMs -> (initial level sets Phi^0, evolved ones Phi^T)."""

    def __init__(
        self,
        feature_channels: int,
        num_classes: int,
        image_size: int,
        hidden: int = 32,
        modes: int = 12,
        layers: int = 4,
        evolve: bool = True,
        cam_prior: float | None = None,
    ):
        super().__init__()
        # The truncated transform keeps at most half the side in each direction.
        self.modes = min(modes, image_size // 2)
        self.init = LevelSetInit(feature_channels, num_classes, hidden, cam_prior)
        self.evolution = FNOGroup(num_classes, self.modes, layers)
        self.evolve = evolve  # False: read masks from Phi^0 (the "no energy" ablation)

    def forward(
        self, features: torch.Tensor, x: torch.Tensor, cams: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        phi0 = self.init(features, x, cams)
        return phi0, self.evolution(phi0) if self.evolve else phi0


def levelset_mask(phi: torch.Tensor, present: torch.Tensor, binary: bool) -> torch.Tensor:
    """uint8 [B, H, W] from level sets [B, K, H, W]: 0 background, 1 or class + 1.

    A pixel belongs to a present class whose level set is negative there; where several
    are, to the one it lies deepest inside (the most negative phi).
    """
    return claim_mask((phi < 0) & present[:, :, None, None], -phi, binary)


class LevelSetGraph(nn.Module):
    """The refine step as served: IMAGE, SCORES, CAMS, FEATURES -> PSEUDO_MASK.

    The ensemble computes CAMS and FEATURES from uint8 pixels, so they are finite. A client
    that calls this model directly with NaN or inf gets an empty mask for that image: the
    DFT products spread a non-finite value over the whole level set, and NaN is never < 0.
    """

    def __init__(
        self,
        head: LevelSetHead,
        multi_label: bool,
        score_threshold: float = 0.5,
        min_score: float = 0.0,
    ):
        super().__init__()
        self.head, self.multi_label = head, multi_label
        self.score_threshold, self.min_score = score_threshold, min_score
        self.normalize = Normalize()  # the level set's image convention: ImageNet statistics

    def forward(
        self, images: torch.Tensor, scores: torch.Tensor, cams: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        present = present_classes_mask(
            scores, self.multi_label, self.score_threshold, self.min_score
        )
        phi = self.head(features, self.normalize(to_pixels(images)), cams)[1]
        return levelset_mask(phi, present, not self.multi_label)
