"""CAM, Grad-CAM and Grad-CAM++ in closed form, for a global-average-pooled linear head.

Like pytorch-grad-cam, a base class owns the shared steps (weigh the feature channels per
class, sum, ReLU, upsample, scale each map to [0, 1]) and each method only says how it
weighs channels. With GAP over an h x w map and logits y = W mean(A) + b, the gradient of
y_c with respect to A_k is W[c, k] / (h w) at every position. That constant makes the
gradient methods computable in the forward pass, so the exported graph needs no autograd;
``tests/training/test_cams.py`` checks each against pytorch-grad-cam's autograd version.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F

from wsss.config import CAM_METHODS as CONFIG_CAM_METHODS


class ClosedFormCAM(abc.ABC):
    @abc.abstractmethod
    def weights(self, feats: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        """[B, K, C]: how much channel C counts for class K's map, per image."""

    def __call__(
        self, feats: torch.Tensor, class_weights: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """feats [B, C, h, w], class weights [B, K, C] -> maps [B, K, *size] in [0, 1]."""
        weights = self.weights(feats, class_weights)
        maps = torch.relu(torch.einsum("bkc,bchw->bkhw", weights, feats))
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        return normalise_maps(maps)


class CAM(ClosedFormCAM):
    """Zhou et al. 2016: the classifier's own weights."""

    def weights(self, feats, class_weights):
        return class_weights


class GradCAM(ClosedFormCAM):
    """Selvaraju et al. 2017: the spatial mean of the gradient, W / (h w) under GAP.

    For this head it equals CAM up to a positive factor, which the [0, 1] scaling removes;
    it is kept as its own method because the two differ on any other head.
    """

    def weights(self, feats, class_weights):
        h, w = feats.shape[-2:]
        return class_weights / (h * w)


class GradCAMPlusPlus(ClosedFormCAM):
    """Chattopadhyay et al. 2018, eq. 19, as pytorch-grad-cam computes it.

    With g = W / (h w) constant in space: a = g^2 / (2 g^2 + sum(A_k) g^3 + eps), zero
    where g = 0; weight = sum over positions of relu(g) a = (h w) relu(g) a.
    """

    eps = 1e-6  # pytorch-grad-cam's; it matters, as g^2 is often near it

    def weights(self, feats, class_weights):
        h, w = feats.shape[-2:]
        g = class_weights / (h * w)  # [B, K, C]
        g2 = g * g
        total = feats.sum(dim=(2, 3)).unsqueeze(1)  # [B, 1, C]
        alpha = g2 / (2 * g2 + total * g2 * g + self.eps)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        return (h * w) * torch.relu(g) * alpha


def normalise_maps(maps: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale every map to [0, 1] by its own min and max (as pytorch-grad-cam does)."""
    lo = maps.amin(dim=(2, 3), keepdim=True)
    hi = maps.amax(dim=(2, 3), keepdim=True)
    return (maps - lo) / (hi - lo + eps)


# Keyed by the config's names (wsss.config.CAM_METHODS), in their order.
CAM_METHODS: dict[str, ClosedFormCAM] = dict(
    zip(CONFIG_CAM_METHODS, (CAM(), GradCAM(), GradCAMPlusPlus()), strict=True)
)
