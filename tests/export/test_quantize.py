"""The ViT model's int8 graph for CPU instances: the masks it gives on real photos, and what
export does with it (or refuses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from export.quantize import is_quantized, map_agreement, quantize_graph
from export.repository import ExportError, _refuse_quantize, _vit
from export.vit import served_vit
from training.torch_refiners import saliency_model
from wsss.config import Config, RefineConfig, load_config
from wsss.served.classical import OnnxMaps, OnnxSaliency, otsu_foreground
from wsss.tensors import SALIENCY, VIT, served_models


def tiny_saliency() -> bytes:
    """A graph with the saliency model's interface: [B, 3, 224, 224] -> output_importance."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor(
        "w",
        TensorProto.FLOAT,
        [224, 224],
        rng.standard_normal((224, 224)).astype(np.float32).ravel() / 15,
    )
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["grey"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["grey", "w"], ["mixed"]),
        helper.make_node("Sigmoid", ["mixed"], ["output_importance"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 224, 224])],
        [helper.make_tensor_value_info("output_importance", TensorProto.FLOAT, ["b", 224, 224])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny_saliency.onnx"
    path.write_bytes(tiny_saliency())
    return path


def _config(tiny: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [
            "refine.method=saliency",
            f"refine.saliency_weights={tiny}",
            "data.root=/nonexistent",
            *overrides,
        ],
    )


def test_export_quantizes_the_vit_and_says_what_it_did(tiny):
    vit = _vit(_config(tiny, "export.vit.quantize=dynamic"), None, SALIENCY)
    assert is_quantized(vit.graph)
    assert vit.quantized["quantize"].startswith("dynamic")
    # No photos at hand: checked on random images, and it says so.
    assert vit.quantized["photos"].startswith("4 random images (no photos at hand")
    assert vit.quantized["mask_iou"] >= 0.9
    # Nothing asked, nothing done; GPU instances keep fp32.
    plain = _vit(_config(tiny), None, SALIENCY)
    assert plain.quantized == {} and not is_quantized(plain.graph)
    # The fp32 graph with the resize inside (128 px -> 224 here): the in-process masks.
    assert plain.parity["mask_mismatch"] < 0.01 and plain.parity["max_abs_error"] < 0.01
    gpu = _vit(
        _config(tiny, "export.vit.quantize=dynamic", "export.vit.kind=KIND_GPU"), None, SALIENCY
    )
    assert "KIND_GPU" in gpu.quantized["quantize"] and not is_quantized(gpu.graph)


def test_old_configs_quantize_the_vit():
    """``export.refiner.quantize`` quantized the ViT inside the refiner: it now means the
    ViT model's."""
    cfg = load_config(None, ["export.refiner.quantize=dynamic"])
    assert cfg.export.vit.quantize == "dynamic" and cfg.export.refiner.quantize == "none"


@pytest.mark.parametrize(
    "overrides, vit_map, message",
    [
        (["export.classifier.quantize=dynamic"], SALIENCY, "only the ViT"),
        (["export.vit.quantize=dynamic", "refine.method=otsu"], None, "reads no ViT"),
    ],
)
def test_export_refuses_what_it_would_not_quantize(tiny, overrides, vit_map, message):
    with pytest.raises(ExportError, match=message):
        _refuse_quantize(_config(tiny, *overrides), vit_map)


@pytest.mark.slow
@pytest.mark.realdata
def test_int8_vit_keeps_the_masks_on_real_photos(real_pets):
    """On 16 Pet test photos the served int8 ViT's foreground agrees with the in-process fp32
    ViT's (IoU >= 0.95) and is as good against the trimaps (within 0.01 IoU), from a third
    of the bytes."""
    from training.data import list_samples
    from training.data.dataset import WSSSDataset

    fp32 = saliency_model(RefineConfig(method="saliency")).read_bytes()
    int8 = quantize_graph(fp32)
    assert is_quantized(int8) and len(int8) < 0.4 * len(fp32)
    samples = list_samples(real_pets, "pets", "test")[::9][:16]
    data = WSSSDataset(real_pets, "pets", "test", 224, samples=samples)
    served = OnnxMaps(served_vit(int8, SALIENCY, 224))
    reference = OnnxSaliency(fp32)
    agreement = map_agreement(reference, served, data.images)
    assert agreement["mask_iou"] >= 0.95 and agreement["images"] == 16, agreement

    def iou(run) -> float:
        fg = np.stack([otsu_foreground(m) for m in run(data.images)])
        truth, known = data.masks == 1, data.masks != 255
        return float((fg & truth & known).sum() / ((fg | truth) & known).sum())

    assert iou(served) >= iou(reference) - 0.01
    assert iou(reference) >= 0.6  # the saliency masks sit on the pets at all


def test_quantized_bench_report_states_the_targets_ratios():
    from types import SimpleNamespace

    from benchmarks.quantized import _report

    def perf(c1: float, best: float) -> list[dict]:
        return [
            {"concurrency": 1, "images_per_s": 1e3 / c1, "p50_ms": c1, "p95_ms": c1 * 1.2},
            {"concurrency": 4, "images_per_s": best, "p50_ms": 300.0, "p95_ms": 400.0},
        ]

    quality = {"accuracy": 0.95, "pseudo_iou": 0.84, "pseudo_image_iou": 0.85}
    served = {
        "none": {"perf": perf(150.0, 13.0), "quality": quality},
        "dynamic": {"perf": perf(60.0, 30.0), "quality": quality},
    }
    text = _report(
        SimpleNamespace(runs="runs/serve"),
        {"fp32, default threads": 80.0, "int8, default threads": 40.0},
        served,
        149,
        "pets",
    )
    # fp32 ViT alone: 12.5 images/s; int8 served: 30 / 12.5 = 2.4x, p50 60 / 80 = 0.75x.
    assert (
        "best throughput 30.0 images/s = 2.40x the fp32 ViT's own rate in process (12.5/s, " in text
    )
    assert "p50 at concurrency 1 = 0.75x the fp32 ViT's time" in text
    assert "| int8 (dynamic) | 0.950 | 0.840 | 0.850 |" in text


@pytest.mark.parametrize(
    "kind, quantize, placed",
    [
        ("KIND_AUTO", "dynamic", "KIND_CPU"),  # int8 kernels are the CPU's
        ("KIND_AUTO", "none", "KIND_AUTO"),  # fp32: the GPU where there is one
        ("KIND_GPU", "none", "KIND_GPU"),
    ],
)
def test_an_int8_vit_is_placed_on_cpu_instances(kind, quantize, placed):
    from tritonclient.grpc.model_config_pb2 import ModelInstanceGroup

    from export.configs import model_config

    cfg = load_config(None, [f"export.vit.kind={kind}", f"export.vit.quantize={quantize}"])
    spec = served_models(32, 2, 2, vit=SALIENCY)[VIT]
    config = model_config(spec, "onnx", cfg.export.vit, [1])
    assert ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == placed
