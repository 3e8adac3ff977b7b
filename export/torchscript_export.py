"""PyTorch -> TorchScript (traced) for Triton's pytorch backend, with a parity check."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from export.parity import compare
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
    module: nn.Module, path: Path, spec: ModelSpec, sample: tuple[torch.Tensor, ...], atol: float
) -> dict[str, float]:
    """Load the saved file back and compare with eager PyTorch (see ``export.parity``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        got = loaded(*sample)
    got = got if isinstance(got, tuple) else (got,)
    return compare(module, [g.numpy() for g in got], spec, sample, atol, "TorchScript")
