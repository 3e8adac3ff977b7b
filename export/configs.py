"""Generate every config.pbtxt from the tensor specs and the export config.

Configs are Triton's own ``ModelConfig`` protobuf (from tritonclient), so a field that does not
exist in Triton's schema cannot be written, and ``text_format`` renders them deterministically:
the same specs and settings always give the same bytes (a golden test holds us to it).
Nothing here touches a model file; ``export.repository`` does the writing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import serialize_byte_tensor

from wsss.config import ExportConfig, ModelServingConfig, NetworkExportConfig
from wsss.errors import InputError
from wsss.served.images import encode_png
from wsss.tensors import (
    ENSEMBLES,
    LABELS_FILE,
    ORIGINAL_SIZE,
    POSTPROCESS,
    PREPROCESS,
    REFINER,
    VIT,
    ModelSpec,
    TensorSpec,
    ensemble_aliases,
    ensemble_members,
)

# format -> (Triton backend, model file in each version folder)
FORMATS = {
    "onnx": ("onnxruntime", "model.onnx"),
    "torchscript": ("pytorch", "model.pt"),
    "python": ("python", "model.py"),
}
PYTHON_MODELS = (PREPROCESS, REFINER, POSTPROCESS)


def io_names(spec: ModelSpec, fmt: str) -> dict[str, str]:
    """Spec tensor name -> the name this model's config uses for it.

    Triton's PyTorch backend binds TorchScript inputs and outputs by position, spelled
    ``<name>__<index>``; every other format keeps the spec's names. Ensembles map between them,
    so clients only ever see the spec's names.
    """
    if fmt != "torchscript":
        return {t.name: t.name for t in spec.inputs + spec.outputs}
    names = {t.name: f"{t.name}__{i}" for i, t in enumerate(spec.inputs)}
    return names | {t.name: f"{t.name}__{i}" for i, t in enumerate(spec.outputs)}


def data_type(t: TensorSpec) -> int:
    """The config.pbtxt enum of a tensor's dtype (bytes: TYPE_STRING, as Triton spells it)."""
    return getattr(mc, "TYPE_STRING" if t.dtype == "bytes" else f"TYPE_{t.triton_dtype}")


def _tensors(specs, cls, names, labelled=False):
    """Config tensors; with ``labelled``, outputs of one value per class name their labels."""
    out = [cls(name=names[t.name], data_type=data_type(t), dims=list(t.shape)) for t in specs]
    for tensor, t in zip(out, specs, strict=True):
        if labelled and t.labelled:
            tensor.label_filename = LABELS_FILE
    return out


def labelled(spec: ModelSpec) -> bool:
    """Whether ``spec`` returns class scores: its config carries the class names and its
    folder the labels file (the classifier and the ensembles)."""
    return any(t.labelled for t in spec.outputs)


def model_config(
    spec: ModelSpec,
    fmt: str,
    serving: ModelServingConfig,
    versions: list[int],
    parameters: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> mc.ModelConfig:
    """One model's config: tensors from its spec, the rest from its serving settings.

    ``labels`` (``wsss.tensors.label_parameters``) name the classes of a model that has
    labelled outputs: they join its parameters, and those outputs get the labels file.
    """
    backend, filename = FORMATS[fmt]
    names = io_names(spec, fmt)
    cfg = mc.ModelConfig(
        name=spec.name,
        backend=backend,
        max_batch_size=serving.max_batch_size,
        default_model_filename=filename,
        input=_tensors(spec.inputs, mc.ModelInput, names),
        output=_tensors(spec.outputs, mc.ModelOutput, names, labels is not None),
    )
    # The versions to serve, listed: "latest N" would also pick up an older version written
    # in another format (model.onnx where the config now says model.pt) and fail to load it.
    cfg.version_policy.specific.versions.extend(versions)
    if serving.max_batch_size > 0:
        preferred = [b for b in serving.preferred_batch_sizes if b <= serving.max_batch_size]
        cfg.dynamic_batching.preferred_batch_size.extend(preferred)
        cfg.dynamic_batching.max_queue_delay_microseconds = serving.max_queue_delay_us
    kind = serving.kind
    if getattr(serving, "quantize", "none") != "none" and kind == "KIND_AUTO":
        # An int8 graph is for CPU instances (a GPU has fp32 kernels, not these): on a GPU
        # server Triton would otherwise place it there. Serve fp32 on the GPU instead with
        # quantize: none.
        kind = "KIND_CPU"
    cfg.instance_group.add(count=serving.instances, kind=getattr(mc.ModelInstanceGroup.Kind, kind))
    if serving.warmup:
        cfg.model_warmup.append(warmup(spec, names, serving.max_batch_size))
    if isinstance(serving, NetworkExportConfig) and fmt == "onnx":
        _onnxruntime_options(cfg, serving)
    elif isinstance(serving, NetworkExportConfig) and fmt == "torchscript":  # same threads
        _libtorch_options(cfg, serving)
    for key, value in sorted(((parameters or {}) | (labels or {})).items()):
        cfg.parameters[key].string_value = value
    return cfg


def _onnxruntime_options(cfg: mc.ModelConfig, serving: NetworkExportConfig) -> None:
    """Where Triton's onnxruntime backend reads its options (and so does our shim)."""
    ort = serving.onnxruntime
    cfg.optimization.graph.level = ort.graph_level
    if ort.intra_op_threads:
        cfg.parameters["intra_op_thread_count"].string_value = str(ort.intra_op_threads)
    if ort.inter_op_threads:
        cfg.parameters["inter_op_thread_count"].string_value = str(ort.inter_op_threads)
    if ort.shrink_arena:
        cfg.parameters["memory.enable_memory_arena_shrinkage"].string_value = "cpu:0"
    if not ort.memory_pattern:
        cfg.parameters["enable_mem_pattern"].string_value = "0"
    if ort.gpu_accelerator != "none":
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name=ort.gpu_accelerator
        )
        if ort.gpu_accelerator == "tensorrt":
            acc.parameters["precision_mode"] = "FP16" if ort.tensorrt_fp16 else "FP32"


def _libtorch_options(cfg: mc.ModelConfig, serving: NetworkExportConfig) -> None:
    """The threads of a TorchScript model's instances, where Triton's pytorch backend reads
    them (and so does our shim): ``onnxruntime.intra_op_threads`` and ``inter_op_threads``,
    the threads per instance whichever runtime serves the network."""
    ort = serving.onnxruntime
    if ort.intra_op_threads:
        cfg.parameters["INTRA_OP_THREAD_COUNT"].string_value = str(ort.intra_op_threads)
    if ort.inter_op_threads:
        cfg.parameters["INTER_OP_THREAD_COUNT"].string_value = str(ort.inter_op_threads)


def _file_input(t: TensorSpec) -> bool:
    """Bytes and integer tensors warm up from a generated file: random sizes could be huge."""
    return t.dtype == "bytes" or t.dtype.startswith("int") or -1 in t.shape


def warmup(spec: ModelSpec, names: dict[str, str], max_batch_size: int = 1) -> mc.ModelWarmup:
    """A sample request run at load. Generated (zero) inputs come as the largest batch the
    model takes: ONNX Runtime's memory arena grows to the largest batch it has seen and
    keeps it, so it reaches that size at load rather than in the middle of serving (a
    20,000-request soak saw stubs grow 20-33 MiB long after their warm-up: reports/soak/).
    Inputs read from files (encoded images, sizes) stay one sample."""
    files = any(_file_input(t) for t in spec.inputs)
    batch = 1 if files else max(1, max_batch_size)
    w = mc.ModelWarmup(name="generated_sample", batch_size=batch)
    for t in spec.inputs:
        entry = w.inputs[names[t.name]]
        entry.data_type = data_type(t)
        entry.dims.extend([d if d > 0 else 1 for d in t.shape])
        if _file_input(t):
            entry.input_data_file = t.name
        else:
            # Zeros, not random_data: Triton's random FP32 bytes include NaNs.
            entry.zero_data = True
    return w


@dataclass(frozen=True)
class WarmupSample:
    """The raw contents Triton reads from ``<model>/warmup/<name>`` for one input."""

    name: str
    data: bytes


def warmup_files(
    spec: ModelSpec, image_size: int, max_pixels: int | None = None
) -> list[WarmupSample]:
    """Deterministic sample inputs: a gradient PNG for image bytes, a 2x size for sizes (no
    more than ``max_pixels``, which postprocess refuses beyond: a failed warm-up would leave
    the model unloaded)."""
    side = 2 * image_size if max_pixels is None else min(2 * image_size, math.isqrt(max_pixels))
    out = []
    for t in spec.inputs:
        if not _file_input(t):
            continue
        if t.dtype == "bytes":
            yy, xx = np.mgrid[:image_size, :image_size]
            img = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)
            element = serialize_byte_tensor(np.array([encode_png(img)], np.object_)).item()
            out.append(WarmupSample(t.name, element))  # Triton's length-prefixed BYTES
        elif t.name == ORIGINAL_SIZE:
            out.append(WarmupSample(t.name, np.array([side] * 2, t.dtype).tobytes()))
        else:
            raise InputError(f"no warm-up sample rule for {spec.name}.{t.name}")
    return out


def ensemble_config(
    spec: ModelSpec,
    steps: list[tuple[ModelSpec, str]],
    max_batch_size: int,
    labels: dict[str, str] | None = None,
    aliases: dict[str, str] | None = None,
    version: int | None = None,
) -> mc.ModelConfig:
    """Chain ``steps`` (spec, format); tensors flow by spec name, mapped to each step's names.

    ``labels`` as for ``model_config``: the ensemble is what clients ask, so it names the
    classes itself. ``aliases`` (``wsss.tensors.ensemble_aliases``): an input of that name
    reads the tensor it names instead, made by an earlier step. ``version``: the one version
    it serves, named (under "latest", the default, a version folder moved in before its
    config was served with the config before: another export's id, a commit killed there
    kept it so until the next export).
    """
    aliases = aliases or {}
    plain = {t.name: t.name for t in spec.inputs + spec.outputs}
    cfg = mc.ModelConfig(
        name=spec.name,
        platform="ensemble",
        max_batch_size=max_batch_size,
        input=_tensors(spec.inputs, mc.ModelInput, plain),
        output=_tensors(spec.outputs, mc.ModelOutput, plain, labels is not None),
    )
    if version is not None:
        cfg.version_policy.specific.versions.append(version)
    for key, value in sorted((labels or {}).items()):
        cfg.parameters[key].string_value = value
    # Triton refuses an ensemble tensor that nothing reads, so map only the outputs that a
    # later step consumes or the ensemble returns.
    wanted = {t.name for t in spec.outputs}
    wanted |= {aliases.get(t.name, t.name) for s, _ in steps for t in s.inputs}
    for step, fmt in steps:
        names = io_names(step, fmt)
        cfg.ensemble_scheduling.step.add(
            model_name=step.name,
            model_version=-1,
            input_map={names[t.name]: aliases.get(t.name, t.name) for t in step.inputs},
            output_map={names[t.name]: t.name for t in step.outputs if t.name in wanted},
        )
    return cfg


def model_format(name: str, export: ExportConfig, network_refiner: bool = False) -> str:
    """ensemble, python, or the network's configured format.

    The refiner is a Python model for the classical refiners and a network (ONNX or
    TorchScript, as ``export.refiner.format`` says) for the level-set one; the ViT is ONNX.
    """
    if name in ENSEMBLES:
        return "ensemble"
    if name == VIT:
        return "onnx"
    if name in PYTHON_MODELS and not (name == REFINER and network_refiner):
        return "python"
    return getattr(export, name).format


def build_configs(
    specs: dict[str, ModelSpec],
    export: ExportConfig,
    python_parameters: dict[str, dict[str, str]],
    versions: dict[str, list[int]],
    network_refiner: bool = False,
    labels: dict[str, str] | None = None,
) -> dict[str, mc.ModelConfig]:
    """Every model's config and then the ensembles', keyed by model name.

    ``versions`` lists, per model, the versions to serve: the exporter picks the latest
    ``export.keep_versions`` that hold the model's file in its configured format.
    ``labels`` (``wsss.tensors.label_parameters``) go to every model with labelled outputs.
    """
    configs = {}
    for name, spec in specs.items():
        if name in ENSEMBLES:
            continue
        configs[name] = model_config(
            spec,
            model_format(name, export, network_refiner),
            getattr(export, name),
            versions[name],
            python_parameters.get(name),
            labels if labelled(spec) else None,
        )
    for name in ENSEMBLES:
        steps = ensemble_members(name, specs)
        # An ensemble can batch no more than its smallest member.
        batch = min(configs[s].max_batch_size for s in steps)
        configs[name] = ensemble_config(
            specs[name],
            [(specs[s], model_format(s, export, network_refiner)) for s in steps],
            batch,
            labels if labelled(specs[name]) else None,
            ensemble_aliases(name, specs),
            max(versions[name]) if versions.get(name) else None,
        )
    return configs


def render(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def parse(text: str) -> mc.ModelConfig:
    """Parse a config.pbtxt against Triton's schema (raises text_format.ParseError)."""
    return text_format.Parse(text, mc.ModelConfig())
