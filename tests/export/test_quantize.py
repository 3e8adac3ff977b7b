"""int8 saliency ViT for CPU instances: the masks it gives on real photos, and what export
does with it (or refuses)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from export.quantize import is_quantized, quantize_graph, saliency_agreement
from export.repository import REFINER, ExportError, _quantize
from training.refine import saliency_model
from wsss.config import Config, RefineConfig, load_config
from wsss.served.classical import OnnxSaliency, otsu_foreground


def _tiny_saliency() -> bytes:
    """A graph with the saliency model's interface: [B, 3, 224, 224] -> output_importance."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor(
        "w",
        TensorProto.FLOAT,
        [224, 224],
        rng.standard_normal((224, 224)).astype(np.float32).ravel(),
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


def _config(*overrides: str) -> Config:
    return load_config(None, ["refine.method=saliency", "data.root=/nonexistent", *overrides])


def test_export_quantizes_the_saliency_graph_and_says_what_it_did():
    fp32 = _tiny_saliency()
    files = {"saliency.onnx": fp32}
    done = _quantize(_config("export.refiner.quantize=dynamic"), files)
    assert is_quantized(files["saliency.onnx"]) and not is_quantized(fp32)
    assert done[REFINER]["quantize"].startswith("dynamic")
    assert done[REFINER]["agreement"].startswith("not measured: no photos at hand")
    # Nothing asked, nothing done; GPU instances keep fp32.
    files = {"saliency.onnx": fp32}
    assert _quantize(_config(), files) == {} and files["saliency.onnx"] == fp32
    gpu = _config("export.refiner.quantize=dynamic", "export.refiner.kind=KIND_GPU")
    assert "KIND_GPU" in _quantize(gpu, files)[REFINER]["quantize"]
    assert files["saliency.onnx"] == fp32


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["export.classifier.quantize=dynamic"], "only the refiner's saliency ViT"),
        (["export.refiner.quantize=dynamic", "refine.method=otsu"], "runs no saliency ViT"),
    ],
)
def test_export_refuses_what_it_would_not_quantize(overrides, message):
    with pytest.raises(ExportError, match=message):
        _quantize(_config(*overrides), {"saliency.onnx": _tiny_saliency()})


@pytest.mark.slow
@pytest.mark.realdata
def test_int8_saliency_keeps_the_masks_on_real_photos(real_pets):
    """On 16 Pet test photos the int8 graph's foreground agrees with fp32's (IoU >= 0.95)
    and is as good against the trimaps (within 0.01 IoU), from a third of the bytes."""
    from training.data import list_samples
    from training.data.dataset import WSSSDataset

    fp32 = saliency_model(RefineConfig(method="saliency")).read_bytes()
    int8 = quantize_graph(fp32)
    assert is_quantized(int8) and len(int8) < 0.4 * len(fp32)
    samples = list_samples(real_pets, "pets", "test")[::9][:16]
    data = WSSSDataset(real_pets, "pets", "test", 224, samples=samples)
    agreement = saliency_agreement(fp32, int8, data.images)
    assert agreement["mask_iou"] >= 0.95 and agreement["images"] == 16, agreement

    def iou(model: bytes) -> float:
        maps = OnnxSaliency(model)(data.images)
        fg = np.stack([otsu_foreground(m) for m in maps])
        truth, known = data.masks == 1, data.masks != 255
        return float((fg & truth & known).sum() / ((fg | truth) & known).sum())

    assert iou(int8) >= iou(fp32) - 0.01
    assert iou(fp32) >= 0.6  # the saliency masks sit on the pets at all


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
