"""Exported file vs eager PyTorch: one comparison for every format."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from wsss.errors import WsssError
from wsss.tensors import ModelSpec


class ParityError(WsssError, RuntimeError):
    """The exported model disagrees with PyTorch beyond the tolerance: the export is refused."""


def compare(
    module: nn.Module,
    got: list[np.ndarray],
    spec: ModelSpec,
    sample: tuple[torch.Tensor, ...],
    atol: float,
    runtime: str,
    mismatch_fraction: float = 1e-3,
) -> dict[str, float]:
    """Check ``got`` (the exported model's outputs on ``sample``) against eager PyTorch.

    Float outputs must agree within ``atol``; integer outputs (argmax masks) may differ on at
    most ``mismatch_fraction`` of elements, where near-ties flip between implementations.
    Returns the measured error per output; raises ParityError past a tolerance.
    """
    with torch.inference_mode():
        want = module.eval()(*sample)
    want = want if isinstance(want, tuple) else (want,)
    errors = {}
    for t, g, w in zip(spec.outputs, got, want, strict=True):
        w = w.numpy()
        if g.shape != w.shape or g.dtype != w.dtype:
            raise ParityError(
                f"{spec.name}.{t.name}: {runtime} gave {g.dtype}{g.shape}, "
                f"PyTorch {w.dtype}{w.shape}"
            )
        if np.issubdtype(w.dtype, np.floating):
            err, limit = float(np.abs(g - w).max()), atol
        else:
            err, limit = float((g != w).mean()), mismatch_fraction
        errors[t.name] = err
        if not err <= limit:
            raise ParityError(
                f"{spec.name}.{t.name}: {runtime} vs PyTorch error {err:.3g} exceeds {limit:.3g}"
            )
    return errors
