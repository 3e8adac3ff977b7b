"""Level-set targets and the Chan-Vese energy of paper 003 (section 3), in torch.

Conventions: a level set phi is negative inside the object and positive outside. Targets
are signed distance functions of CAM masks, clipped and scaled to [-1, 1] so the MSE stays
well conditioned whatever the image size. The energy uses a smooth Heaviside so it is
differentiable in phi.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt


def signed_distance(mask: np.ndarray, clip: float) -> np.ndarray:
    """Euclidean SDF of a boolean mask: negative inside, positive outside, in [-1, 1].

    Distances are measured to the nearest pixel of the other side and divided by ``clip``
    (pixels), then clipped. An empty mask is all +1, a full one all -1.
    """
    if clip <= 0:
        raise ValueError("clip must be > 0 pixels")
    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.ones(mask.shape, np.float32)
    if mask.all():
        return -np.ones(mask.shape, np.float32)
    outside = distance_transform_edt(~mask)  # distance of outside pixels to the object
    inside = distance_transform_edt(mask)  # distance of inside pixels to the background
    return np.clip((outside - inside) / clip, -1.0, 1.0).astype(np.float32)


def heaviside(phi: torch.Tensor, eps: float) -> torch.Tensor:
    """Smooth H(-phi): ~1 inside (phi < 0), ~0 outside (Chan & Vese's arctan form)."""
    return 0.5 * (1 + (2 / math.pi) * torch.atan(-phi / eps))


def cam_weighted(image: torch.Tensor, cams: torch.Tensor, alpha: float) -> torch.Tensor:
    """I_c = X * ((1 - alpha) + alpha * sigmoid(C_c)): one input per class.

    image [B, C, H, W], cams [B, K, H, W] -> [B, K, C, H, W].
    """
    weight = (1 - alpha) + alpha * torch.sigmoid(cams)
    return image.unsqueeze(1) * weight.unsqueeze(2)


def chan_vese_energy(
    phi: torch.Tensor, inputs: torch.Tensor, gamma: float, eps: float = 0.1
) -> torch.Tensor:
    """Mean Chan-Vese energy of level sets phi [B, K, H, W] on inputs [B, K, C, H, W].

    Region terms: squared distance of each pixel to the mean inside (c1) and outside (c2),
    weighted by H and 1 - H; length term: total variation of H, weighted by ``gamma``.
    """
    h = heaviside(phi, eps).unsqueeze(2)  # [B, K, 1, H, W]
    dims = (-2, -1)
    c1 = (inputs * h).sum(dims, keepdim=True) / (h.sum(dims, keepdim=True) + 1e-6)
    c2 = (inputs * (1 - h)).sum(dims, keepdim=True) / ((1 - h).sum(dims, keepdim=True) + 1e-6)
    region = ((inputs - c1) ** 2 * h + (inputs - c2) ** 2 * (1 - h)).sum(2).mean(dims)
    hs = h.squeeze(2)
    dy = hs[..., 1:, :-1] - hs[..., :-1, :-1]
    dx = hs[..., :-1, 1:] - hs[..., :-1, :-1]
    length = torch.sqrt(dx**2 + dy**2 + 1e-8).mean(dims)
    return (region + gamma * length).mean()


def weighted_chan_vese_energy(
    phi: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, gamma: float, eps: float = 0.1
) -> torch.Tensor:
    """``chan_vese_energy`` of inputs I_c = x * weight_c, per image and class: [B, K].

    phi, weight [B, K, H, W]; x [B, C, H, W]. Written by hand because materialising the
    CAM-weighted inputs [B, K, C, H, W] costs gigabytes at VOC scale (20 classes x 2048
    feature channels); the region terms expand instead into weighted sums of x and |x|^2:
    sum_p |w_p x_p - m|^2 h_p = sum w^2 |x|^2 h - 2 m . sum w x h + |m|^2 sum h.
    """
    h = heaviside(phi, eps)
    x2 = (x * x).sum(1)  # [B, H, W]

    def region(side: torch.Tensor) -> torch.Tensor:
        mass = side.sum((-2, -1))  # [B, K]
        s1 = torch.einsum("bchw,bkhw->bkc", x, weight * side)
        s2 = torch.einsum("bhw,bkhw->bk", x2, weight * weight * side)
        mean = s1 / (mass + 1e-6).unsqueeze(-1)
        return s2 - 2 * (mean * s1).sum(-1) + (mean * mean).sum(-1) * mass

    pixels = phi.shape[-1] * phi.shape[-2]
    regions = (region(h) + region(1 - h)).clamp_min(0) / pixels
    dy = h[..., 1:, :-1] - h[..., :-1, :-1]
    dx = h[..., :-1, 1:] - h[..., :-1, :-1]
    length = torch.sqrt(dx**2 + dy**2 + 1e-8).mean((-2, -1))
    return regions + gamma * length
