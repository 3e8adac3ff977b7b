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
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

from wsss.errors import InputError


def signed_distance(mask: np.ndarray, clip: float) -> np.ndarray:
    """Euclidean SDF of a boolean mask: negative inside, positive outside, in [-1, 1].

    Distances are measured to the nearest pixel of the other side and divided by ``clip``
    (pixels), then clipped. An empty mask is all +1, a full one all -1.
    """
    if clip <= 0:
        raise InputError("clip must be > 0 pixels")
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


def rgb_to_lab(pixels: torch.Tensor) -> torch.Tensor:
    """sRGB pixels in [0, 1] [B, 3, H, W] -> CIE L*a*b* (D65), each channel divided by 25.

    Photos separate an animal from grass, floor or sofa by colour more than by brightness;
    in Lab the chroma (a*, b*) is apart from the lightness, and Euclidean distance follows
    perceived difference, which is what the region terms measure. Divided by 25, each
    channel's spread on photos is about that of ImageNet-normalised RGB (the paper's
    input), so the energy weights keep their scale. (The standard formulas: a few lines
    where no maintained torch library is installed.)
    """
    linear = torch.where(
        pixels > 0.04045, ((pixels.clamp_min(0) + 0.055) / 1.055) ** 2.4, pixels / 12.92
    )
    to_xyz = pixels.new_tensor(
        [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
         [0.019334, 0.119193, 0.950227]]
    )  # fmt: skip
    white = pixels.new_tensor([0.95047, 1.0, 1.08883]).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", to_xyz, linear) / white
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-8) ** (1 / 3), 7.787 * xyz + 16 / 116)
    lightness = 116 * f[:, 1:2] - 16
    a = 500 * (f[:, 0:1] - f[:, 1:2])
    b = 200 * (f[:, 1:2] - f[:, 2:3])
    return torch.cat([lightness, a, b], dim=1) / 25


def edge_stop(image: torch.Tensor, beta: float) -> torch.Tensor:
    """g = 1 / (1 + beta |grad I|^2) [B, 1, H, W]: about 1 in flat regions, small on edges.

    The geodesic active contour's weight on the length term: a contour costs less where it
    runs along an edge of the (3x3-blurred) image, so the evolution is drawn to real edges
    instead of only shortening. Gradients by central differences, summed over channels.
    """
    blur = F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    padded = F.pad(blur, (1, 1, 1, 1), mode="replicate")
    gx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    gy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    return 1 / (1 + beta * (gx**2 + gy**2).sum(1, keepdim=True))


def weighted_chan_vese_energy(
    phi: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    gamma: float,
    eps: float = 0.1,
    edges: torch.Tensor | None = None,
) -> torch.Tensor:
    """``chan_vese_energy`` of inputs I_c = x * weight_c, per image and class: [B, K].

    phi, weight [B, K, H, W]; x [B, C, H, W]. Written by hand because materialising the
    CAM-weighted inputs [B, K, C, H, W] costs gigabytes at VOC scale (20 classes x 2048
    feature channels); the region terms expand instead into weighted sums of x and |x|^2:
    sum_p |w_p x_p - m|^2 h_p = sum w^2 |x|^2 h - 2 m . sum w x h + |m|^2 sum h.
    ``edges`` [B, 1, H, W] (``edge_stop``) weights the length term pixel by pixel.
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
    length = torch.sqrt(dx**2 + dy**2 + 1e-8)
    if edges is not None:
        length = length * edges[..., :-1, :-1]
    return regions + gamma * length.mean((-2, -1))


def seed_region_energy(
    phi: torch.Tensor, seeds: torch.Tensor, eps: float = 0.1, ignore: int = 255
) -> torch.Tensor:
    """Mean disagreement of the evolved regions H(-phi) with the seed masks [B, K].

    seeds [B, H, W]: class + 1 per pixel, ``ignore`` where the seed is in doubt (not
    counted). H (1 - M) + (1 - H) M per pixel, M the class's seed region: a region term
    that keeps the evolution near the seed where the image terms alone would wander (with
    ``levelset.seed: saliency``, the saliency map's region: the prior the paper's future work
    calls region-based).
    """
    h = heaviside(phi, eps)  # [B, K, H, W]
    classes = torch.arange(1, phi.shape[1] + 1, device=phi.device).view(1, -1, 1, 1)
    m = (seeds.unsqueeze(1) == classes).float()
    valid = (seeds != ignore).float().unsqueeze(1)
    disagree = (h * (1 - m) + (1 - h) * m) * valid
    return disagree.sum((-2, -1)) / valid.sum((-2, -1)).clamp_min(1)
