"""PyTorch -> ONNX with the served names, dynamic batch, and a parity check that fails loudly."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

from export.parity import compare
from wsss.errors import InputError
from wsss.tensors import ModelSpec


def export_onnx(
    module: nn.Module,
    spec: ModelSpec,
    sample: tuple[torch.Tensor, ...],
    path: Path,
    opset: int = 17,
) -> Path:
    """Export ``module`` with ``spec``'s input/output names; only the batch axis is dynamic."""
    # The TorchScript exporter's own range (a private constant; 20 in torch 2.14)
    top = getattr(torch.onnx._constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", opset)
    if not 17 <= opset <= top:
        raise InputError(f"export.opset {opset}: 17 to {top} (the ONNX exporter's range)")
    dynamic = {t.name: {0: "batch"} for t in spec.inputs + spec.outputs}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but is the one that handles our graphs;
        # torch.export-based export is tracked for the spectral layers of the level-set step.
        warnings.simplefilter("ignore", DeprecationWarning)
        # Python checks on spatial sizes become constants in the trace: they are fixed by
        # the served contract (only the batch axis is free), so that is what we want.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
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
    module: nn.Module, path: Path, spec: ModelSpec, sample: tuple[torch.Tensor, ...], atol: float
) -> dict[str, float]:
    """ONNX Runtime (CPU) vs eager PyTorch on ``sample`` (see ``export.parity.compare``)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {t.name: s.numpy() for t, s in zip(spec.inputs, sample, strict=True)}
    got = session.run([t.name for t in spec.outputs], feeds)
    return compare(module, got, spec, sample, atol, "ONNX Runtime")
