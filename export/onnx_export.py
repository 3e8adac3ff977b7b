"""PyTorch -> ONNX with the served names, dynamic batch, and a parity check that fails loudly."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from wsss.errors import WsssError
from wsss.tensors import ModelSpec


class ParityError(WsssError, RuntimeError):
    """ONNX Runtime disagrees with PyTorch beyond the tolerance: the export is refused."""


def export_onnx(
    module: nn.Module,
    spec: ModelSpec,
    sample: tuple[torch.Tensor, ...],
    path: Path,
    opset: int = 17,
) -> Path:
    """Export ``module`` with ``spec``'s input/output names; only the batch axis is dynamic."""
    if opset < 17:
        raise ValueError("opset must be >= 17")
    dynamic = {t.name: {0: "batch"} for t in spec.inputs + spec.outputs}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but is the one that handles our graphs;
        # torch.export-based export is tracked for the spectral layers of the level-set step.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module.eval(),
            sample,
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))
    return path


def check_parity(
    module: nn.Module,
    path: Path,
    spec: ModelSpec,
    sample: tuple[torch.Tensor, ...],
    atol: float,
    mismatch_fraction: float = 1e-3,
) -> dict[str, float]:
    """Compare ONNX Runtime (CPU) with eager PyTorch on ``sample``; ParityError past tolerance.

    Float outputs must agree within ``atol``; integer outputs (argmax masks) may differ on at
    most ``mismatch_fraction`` of elements, where near-ties flip between implementations.
    Returns the measured error per output.
    """
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {t.name: s.numpy() for t, s in zip(spec.inputs, sample, strict=True)}
    got = session.run([t.name for t in spec.outputs], feeds)
    with torch.inference_mode():
        want = module.eval()(*sample)
    want = want if isinstance(want, tuple) else (want,)
    errors = {}
    for t, g, w in zip(spec.outputs, got, want, strict=True):
        w = w.numpy()
        if g.shape != w.shape or g.dtype != w.dtype:
            raise ParityError(
                f"{spec.name}.{t.name}: ONNX gave {g.dtype}{g.shape}, PyTorch {w.dtype}{w.shape}"
            )
        if np.issubdtype(w.dtype, np.floating):
            err, limit = float(np.abs(g - w).max()), atol
        else:
            err, limit = float((g != w).mean()), mismatch_fraction
        errors[t.name] = err
        if not err <= limit:
            raise ParityError(
                f"{spec.name}.{t.name}: ONNX Runtime vs PyTorch error {err:.3g} exceeds {limit:.3g}"
            )
    return errors
