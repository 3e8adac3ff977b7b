"""CAM methods in closed form for a global-average-pooled linear head.

Each method maps (features A [B, C, h, w], head weights W [K, C]) to raw maps [B, K, h, w]:
only the per-class channel weighting differs, as in pytorch-grad-cam's one-file-per-method
design. With GAP, dy_k/dA_c = W[k, c] / (h w) everywhere, which is what makes the gradient
methods computable without autograd.
"""

from __future__ import annotations

import torch


def cam(feats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Zhou et al. 2016: M_k = sum_c W[k, c] A_c."""
    return torch.relu(torch.einsum("bchw,kc->bkhw", feats, weight))


def normalise_maps(maps: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale every map to [0, 1] by its own min and max (as pytorch-grad-cam does)."""
    lo = maps.amin(dim=(2, 3), keepdim=True)
    hi = maps.amax(dim=(2, 3), keepdim=True)
    return (maps - lo) / (hi - lo + eps)


CAM_METHODS = {"cam": cam}
