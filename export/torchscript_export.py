"""PyTorch -> TorchScript (traced) for Triton's pytorch backend, with a parity check."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.onnx_export import ParityError
from wsss.tensors import ModelSpec


def export_torchscript(module: nn.Module, sample: tuple[torch.Tensor, ...], path: Path) -> Path:
    """Trace ``module`` on ``sample``; the batch dimension stays free (checked by parity)."""
    with torch.no_grad(), warnings.catch_warnings():
        # Deprecated in torch, but TorchScript is what Triton's pytorch backend (24.10) loads.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module.eval(), sample, check_trace=False)
    traced.save(str(path))
    return path


def check_torchscript_parity(
    module: nn.Module,
    path: Path,
    spec: ModelSpec,
    sample: tuple[torch.Tensor, ...],
    atol: float,
    mismatch_fraction: float = 1e-3,
) -> dict[str, float]:
    """Load the saved file back and compare with eager PyTorch (ParityError past tolerance)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        got = loaded(*sample)
        want = module.eval()(*sample)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    errors = {}
    for t, g, w in zip(spec.outputs, got, want, strict=True):
        g, w = g.numpy(), w.numpy()
        if g.shape != w.shape or g.dtype != w.dtype:
            raise ParityError(
                f"{spec.name}.{t.name}: TorchScript gave {g.dtype}{g.shape}, "
                f"PyTorch {w.dtype}{w.shape}"
            )
        if np.issubdtype(w.dtype, np.floating):
            err, limit = float(np.abs(g - w).max()), atol
        else:
            err, limit = float((g != w).mean()), mismatch_fraction
        errors[t.name] = err
        if not err <= limit:
            raise ParityError(
                f"{spec.name}.{t.name}: TorchScript vs PyTorch error {err:.3g} exceeds {limit:.3g}"
            )
    return errors
