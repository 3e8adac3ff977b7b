"""Write the Triton model repository: ONNX models, a python refiner, the ensemble, configs.

Every config.pbtxt is built as Triton's own ``ModelConfig`` protobuf (so the schema is
checked) from the tensor specs of ``wsss.tensors``, and written with ``text_format``. The
repository is assembled in a staging folder beside the target and moved into place only
after every model passed its parity check, so a failed export leaves the old one intact.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.onnx_export import check_parity, export_onnx
from training.pipeline import ServedClassifier, ServedSegmenter, load_model
from wsss.config import Config, ModelServingConfig, save_config
from wsss.tensors import CLASSIFIER, PIPELINE, REFINER, SEGMENTER, ModelSpec, served_models

_REFINER_SOURCE = Path(__file__).parent / "triton_models" / "refiner.py"


def _tensors(specs, cls):
    return [
        cls(name=t.name, data_type=getattr(mc, f"TYPE_{t.triton_dtype}"), dims=list(t.shape))
        for t in specs
    ]


def model_config(
    spec: ModelSpec,
    backend: str,
    serving: ModelServingConfig,
    parameters: dict[str, str] | None = None,
) -> mc.ModelConfig:
    """A config.pbtxt for one model: tensors from its spec, batching and instances from config."""
    cfg = mc.ModelConfig(
        name=spec.name,
        backend=backend,
        max_batch_size=serving.max_batch_size,
        input=_tensors(spec.inputs, mc.ModelInput),
        output=_tensors(spec.outputs, mc.ModelOutput),
    )
    if backend == "onnxruntime":
        cfg.default_model_filename = "model.onnx"
    preferred = [b for b in serving.preferred_batch_sizes if b <= serving.max_batch_size]
    cfg.dynamic_batching.preferred_batch_size.extend(preferred)
    cfg.dynamic_batching.max_queue_delay_microseconds = serving.max_queue_delay_us
    cfg.instance_group.add(
        count=serving.instances, kind=getattr(mc.ModelInstanceGroup.Kind, serving.kind)
    )
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = value
    return cfg


def ensemble_config(spec: ModelSpec, steps: list[ModelSpec], max_batch_size: int) -> mc.ModelConfig:
    """Chain ``steps``; tensors pass between them by name, so each map is name -> same name."""
    cfg = mc.ModelConfig(
        name=spec.name,
        platform="ensemble",
        max_batch_size=max_batch_size,
        input=_tensors(spec.inputs, mc.ModelInput),
        output=_tensors(spec.outputs, mc.ModelOutput),
    )
    for step in steps:
        cfg.ensemble_scheduling.step.add(
            model_name=step.name,
            model_version=-1,
            input_map={t.name: t.name for t in step.inputs},
            output_map={t.name: t.name for t in step.outputs},
        )
    return cfg


def write_config(cfg: mc.ModelConfig, folder: Path) -> Path:
    path = folder / "config.pbtxt"
    path.write_text(text_format.MessageToString(cfg))
    return path


def export_repository(cfg: Config) -> Path:
    """Export classifier, refiner, segmenter and the ensemble into ``cfg.export.repository``."""
    runs = Path(cfg.runs)
    classifier, cmeta = load_model(runs / "classifier" / "best.pt")
    segmenter, _ = load_model(runs / "segmenter" / "best.pt")
    multi_label = cmeta["task"] == "voc"
    num_classes = len(cmeta["class_names"])
    seg_classes = num_classes + 1 if multi_label else 2
    specs = served_models(cfg.data.image_size, num_classes, seg_classes)
    target = Path(cfg.export.repository)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        _write_all(
            cfg,
            staging,
            specs,
            ServedClassifier(classifier, multi_label),
            ServedSegmenter(segmenter),
            multi_label,
            cmeta["class_names"],
        )
        _swap_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_all(cfg, root, specs, classifier, segmenter, multi_label, class_names) -> None:
    rng = np.random.default_rng(0)
    size = cfg.data.image_size
    sample = (torch.from_numpy(rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)),)
    report = {}
    serving = cfg.export.serving
    for name, module in ((CLASSIFIER, classifier), (SEGMENTER, segmenter)):
        version = root / name / "1"
        version.mkdir(parents=True)
        path = export_onnx(module, specs[name], sample, version / "model.onnx", cfg.export.opset)
        report[name] = check_parity(module, path, specs[name], sample, cfg.export.atol)
        write_config(model_config(specs[name], "onnxruntime", serving), root / name)
    (root / REFINER / "1").mkdir(parents=True)
    shutil.copy(_REFINER_SOURCE, root / REFINER / "1" / "model.py")
    params = {
        "method": cfg.refine.method,
        "threshold": str(cfg.refine.threshold),
        "score_threshold": str(cfg.refine.score_threshold),
        "multi_label": "true" if multi_label else "false",
    }
    write_config(model_config(specs[REFINER], "python", serving, params), root / REFINER)
    (root / PIPELINE / "1").mkdir(parents=True)
    steps = [specs[CLASSIFIER], specs[REFINER], specs[SEGMENTER]]
    write_config(ensemble_config(specs[PIPELINE], steps, serving.max_batch_size), root / PIPELINE)
    save_config(cfg, root / "wsss_config.yaml")
    (root / "class_names.json").write_text(json.dumps(class_names))
    (root / "parity.json").write_text(json.dumps(report, indent=2))


def _swap_into_place(staging: Path, target: Path) -> None:
    """Move each staged entry over its counterpart in ``target`` by renames only.

    Other files in ``target`` (its README) stay; no half-copied model is ever visible.
    """
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(staging.iterdir()):
        dest = target / entry.name
        old = target / f".old-{entry.name}"
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        entry.rename(dest)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
