"""The ViT model's int8 graph for CPU instances: the masks it gives on real photos, and what
export does with it (or refuses)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.quantize import is_quantized, map_agreement, quantize_graph
from export.repository import ExportError, _refuse_quantize, _vit
from export.vit import served_vit
from tests.conftest import ROOT
from tests.tiny_graphs import tiny_saliency
from training.pipeline import pipeline_from_config
from training.torch_refiners import saliency_model
from wsss.config import Config, RefineConfig, load_config
from wsss.errors import InputError
from wsss.served.classical import OnnxMaps, OnnxSaliency, otsu_foreground
from wsss.tensors import SALIENCY, VIT, served_models


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


def test_the_fp32_form_a_benchmark_times_is_the_unquantized_export(tiny):
    """``fp32_vit``: the ViT model as export writes it with quantize none, whatever the
    config ships (make bench times it beside the int8 one); None where no ViT is served."""
    from export.repository import fp32_vit

    graph = fp32_vit(_config(tiny, "export.vit.quantize=dynamic"))
    assert not is_quantized(graph)
    assert graph == _vit(_config(tiny), None, SALIENCY).graph
    assert fp32_vit(load_config(None, ["refine.method=fixed"])) is None


def test_static_int8_is_calibrated_on_photos_or_export_says_why_it_is_dynamic(tiny, pets_root):
    """export.vit.quantize static: weights and activations int8 (QuantizeLinear in the
    graph), ranges from export.vit.calibration's training photos, named in what export
    says; with no photos to read, the dynamic graph, and why."""
    static = _vit(
        _config(tiny, "export.vit.quantize=static", f"export.vit.calibration={pets_root}"),
        None,
        SALIENCY,
    )
    ops = {n.op_type for n in onnx.load_from_string(static.graph).graph.node}
    assert "QuantizeLinear" in ops and "DynamicQuantizeLinear" not in ops
    assert static.quantized["quantize"].startswith("static")
    assert f"training images of {pets_root}" in static.quantized["quantize"]
    assert static.quantized["photos"].endswith(f"training images of {pets_root}")  # checked there
    fallback = _vit(_config(tiny, "export.vit.quantize=static"), None, SALIENCY)
    ops = {n.op_type for n in onnx.load_from_string(fallback.graph).graph.node}
    assert "DynamicQuantizeLinear" in ops and "QuantizeLinear" not in ops
    assert "static asked for, but no photos at hand" in fallback.quantized["quantize"]


def test_the_agreement_is_measured_besides_the_calibration_photos(tiny, pets_root):
    from export.repository import _photos

    cfg = _config(tiny, f"data.root={pets_root}")
    calibration, _ = _photos(cfg, 10)
    checked, source = _photos(cfg, 4, besides=10)
    assert len(checked) == 4 and source.startswith("4 training images")
    assert not any(np.array_equal(a, b) for a in checked for b in calibration)
    assert any(np.array_equal(a, b) for a in _photos(cfg, 4)[0] for b in calibration)


def test_calibration_needs_a_photo_and_is_each_networks_own():
    with pytest.raises(InputError, match="calibration_photos 0: at least 1"):
        load_config(None, ["export.vit.calibration_photos=0"])
    with pytest.raises(InputError, match="calibration_photos 0: at least 1"):
        load_config(None, ["export.segmenter.calibration_photos=0"])
    cfg = load_config(None, ["export.classifier.calibration=photos"])
    assert cfg.export.classifier.calibration == "photos" and cfg.export.vit.calibration == ""


def test_old_configs_quantize_the_vit(capsys):
    """``export.refiner.quantize`` quantized the ViT inside the refiner: it now means the
    ViT model's, and says so (a refusal then names export.vit.quantize); against another
    export.vit.quantize it is refused, not dropped."""
    from wsss import config
    from wsss.config import ConfigError

    config._SAID.clear()
    for _ in range(2):  # said once, however often a command loads its config
        cfg = load_config(None, ["export.refiner.quantize=dynamic"])
    assert cfg.export.vit.quantize == "dynamic" and cfg.export.refiner.quantize == "none"
    err = capsys.readouterr().err
    assert err.count("export.refiner.quantize is now export.vit.quantize: read as dynamic") == 1
    with pytest.raises(ConfigError, match="give export.vit.quantize"):
        load_config(None, ["export.refiner.quantize=dynamic", "export.vit.quantize=static"])


@pytest.mark.parametrize(
    "overrides, vit_map, passthrough, message",
    [
        (["export.vit.quantize=dynamic", "refine.method=otsu"], None, False, "reads no ViT"),
        (["export.segmenter.quantize=static"], SALIENCY, True, "pass-through segmenter has no"),
        (
            ["export.classifier.quantize=dynamic", "export.classifier.format=torchscript"],
            SALIENCY,
            False,
            "int8 graphs are ONNX Runtime's; export.classifier.format is torchscript",
        ),
    ],
)
def test_export_refuses_what_it_would_not_quantize(tiny, overrides, vit_map, passthrough, message):
    with pytest.raises(ExportError, match=message):
        _refuse_quantize(_config(tiny, *overrides), vit_map, passthrough)
    # What a network may have: int8 classifier and segmenter graphs.
    fine = _config(tiny, "export.classifier.quantize=static", "export.segmenter.quantize=dynamic")
    _refuse_quantize(fine, SALIENCY, passthrough=False)
    # The level set's network refiner stays fp32 (export.refiner.quantize, read from a YAML
    # file, is the ViT's: test_old_configs_quantize_the_vit).
    fine.export.refiner.quantize = "dynamic"
    with pytest.raises(ExportError, match="network refiner stays fp32"):
        _refuse_quantize(fine, SALIENCY)


@pytest.mark.slow
@pytest.mark.realdata
def test_the_shipped_vit_is_scored_against_the_truth_by_export(real_pets):
    """make serve's ViT as export makes it (configs/serve.yaml: static int8, 168 px,
    calibrated on 60 Pet training photos): export reports its masks and fp32's against the
    trimaps of 32 test photos it did not choose on, and int8 is as good (within 0.01 IoU):
    0.893 against fp32's 0.891 at 168 px when written, at 224 px masks (on all 149 photos,
    served at each photo's size: 0.8381 against fp32 224 px's 0.8433, reports/bench/)."""
    cfg = load_config(
        ROOT / "configs" / "serve.yaml",
        [f"export.vit.calibration={real_pets}", f"data.root={real_pets}", "data.synth_count=0"],
    )
    vit = _vit(cfg, None, SALIENCY)
    done = vit.quantized
    assert done["quantize"].startswith("static") and is_quantized(vit.graph)
    assert done["truth_photos"] == f"32 test images of {real_pets} (at 224 px, the model's size)"
    assert done["int8_truth_iou"] >= done["fp32_truth_iou"] - 0.01, done
    assert done["fp32_truth_iou"] >= 0.75, done  # the masks sit on the pets


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("kind", ["dynamic"])  # static: the shipped form, the test above
def test_int8_vit_keeps_the_masks_on_real_photos(real_pets, kind):
    """On 16 Pet test photos the served int8 ViT's foreground agrees with the in-process fp32
    ViT's (IoU >= 0.95) and is as good against the trimaps (within 0.01 IoU), from a third
    of the bytes."""
    from export.quantize import quantize_static_graph
    from training.attention import onnx_reading
    from training.data import list_samples
    from training.data.dataset import WSSSDataset
    from wsss.served.classical import IMAGENET_MEAN, IMAGENET_STD, VIT_SIZE, vit_input

    fp32 = onnx_reading(saliency_model(RefineConfig(method="saliency")), VIT_SIZE)
    if kind == "dynamic":
        int8 = quantize_graph(fp32)
    else:
        train = list_samples(real_pets, "pets", "train")[::10][:30]
        calibration = WSSSDataset(real_pets, "pets", "train", 224, samples=train).images
        inputs = [vit_input(i[None], IMAGENET_MEAN, IMAGENET_STD, VIT_SIZE) for i in calibration]
        int8 = quantize_static_graph(fp32, inputs)
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
        "fp32, 224 px": {"perf": perf(150.0, 13.0), "quality": quality},
        "int8, 168 px": {"perf": perf(60.0, 30.0), "quality": quality},
    }
    text = _report(
        SimpleNamespace(runs="runs/serve"),
        {
            "fp32, 224 px, the file as it came, default threads": 80.0,
            "fp32, 224 px, default threads": 70.0,  # as the project reads it: not the yardstick
            "int8, 168 px, default threads": 30.0,
        },
        served,
        149,
        "pets",
    )
    # the 224 px fp32 ViT alone: 12.5 images/s; int8 at 168 px served: 30 / 12.5 = 2.4x, p50
    # 60 / 80 = 0.75x.
    assert (
        "- int8, 168 px: best throughput 30.0 images/s = 2.40x the 224 px fp32 ViT's own rate "
        "in process, the file as it came (12.5/s, default threads); p50 at concurrency 1 = "
        "0.75x its time" in text
    )
    assert "| int8, 168 px | 0.950 | 0.840 | 0.850 |" in text


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


def any_side_saliency(rank: int = 4) -> bytes:
    """A saliency model that reads any side, declared at 224 as the bundled one is:
    [B, 3, 224, 224] -> output_importance [B, 1, H, W] (``rank`` 3: [B, H, W]), the sigmoid
    of the grey level."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["grey"], axes=[1], keepdims=rank == 4),
        helper.make_node("Sigmoid", ["grey"], ["output_importance"]),
    ]
    out = ["b", 1, "h", "w"] if rank == 4 else ["b", "h", "w"]
    graph = helper.make_graph(
        nodes,
        "any_side",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 224, 224])],
        [helper.make_tensor_value_info("output_importance", TensorProto.FLOAT, out)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_vit_reading_smaller_images_is_served_as_it_runs_in_process(tmp_path):
    """refine.saliency_size: the served ViT model resizes the image to that side inside its
    graph and brings the map back to 224 px, as OnnxSaliency does in process; at 56 px the
    map is coarser than at 224, so the side really changed."""
    from training.attention import onnx_reading

    path = tmp_path / "any_side.onnx"
    path.write_bytes(any_side_saliency())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    small = onnx_reading(path, 56)
    served = OnnxMaps(served_vit(small, SALIENCY, 96, vit_size=56))(images)
    in_process = OnnxSaliency(small, size=56)(images)
    assert served.shape == in_process.shape == (3, 224, 224)
    assert np.abs(served - in_process).max() < 2e-3
    full = OnnxSaliency(onnx_reading(path, 224))(images)
    assert np.abs(full - in_process).mean() > 10 * np.abs(served - in_process).mean()
    with pytest.raises(Exception, match="224"):  # the declared side stays where not freed
        OnnxSaliency(path.read_bytes(), size=56)(images)


def test_a_vit_of_a_fixed_grid_is_refused_at_another_side_with_a_clear_error(tmp_path):
    """A user's saliency graph whose position embeddings fit only its declared 224 px grid
    (an Add of a fixed [1, 3, 224, 224] tensor stands for them): refine.saliency_size 56 is
    refused by name, with the setting to change, before any batch runs; 224 still works."""
    from training.attention import onnx_reading

    grid = numpy_helper.from_array(np.zeros((1, 3, 224, 224), np.float32), "pos")
    nodes = [
        helper.make_node("Add", ["x", "pos"], ["embedded"]),
        helper.make_node("ReduceMean", ["embedded"], ["grey"], axes=[1], keepdims=1),
        helper.make_node("Sigmoid", ["grey"], ["output_importance"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed_grid",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 224, 224])],
        [helper.make_tensor_value_info("output_importance", TensorProto.FLOAT, None)],
        [grid],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "fixed_grid.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match=r"does not run on 56 px images.*refine.saliency_size"):
        onnx_reading(path, 56)
    images = np.zeros((1, 64, 64, 3), np.uint8)
    assert OnnxSaliency(onnx_reading(path, 224))(images).shape == (1, 224, 224)


@pytest.mark.parametrize("rank", [4, 3])
def test_export_serves_the_vit_at_the_configured_side(tmp_path, rank):
    """export.vit with refine.saliency_size 56: the ViT model agrees with the in-process ViT
    at that side (export's own check), for a saliency output [B, 1, H, W] or [B, H, W]."""
    path = tmp_path / "any_side.onnx"
    path.write_bytes(any_side_saliency(rank))
    vit = _vit(_config(path, "refine.saliency_size=56"), None, SALIENCY)
    assert vit.parity["mask_mismatch"] < 0.01 and vit.parity["max_abs_error"] < 2e-3
    images = np.random.default_rng(1).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    maps = OnnxMaps(vit.graph)(images)
    assert maps.shape == (2, 224, 224)
    full = _vit(_config(path), None, SALIENCY)
    assert np.abs(OnnxMaps(full.graph)(images) - maps).mean() > 1e-3  # the side took effect


def test_saliency_size_is_a_multiple_of_the_patch():
    from wsss.config import ConfigError

    assert load_config(None, ["refine.saliency_size=168"]).refine.saliency_size == 168
    for side in ("100", "28"):
        with pytest.raises(ConfigError, match="multiple of the ViT's 14 px patch"):
            load_config(None, [f"refine.saliency_size={side}"])


@pytest.mark.slow
@pytest.mark.realdata
def test_the_vit_on_168_px_images_keeps_the_masks_on_real_photos(real_pets):
    """The bundled saliency ViT reading 168 px images (144 patches instead of 256): its Otsu
    foreground on 50 Pet training photos (where configs/serve.yaml chose the side) is within
    0.01 IoU of the 224 px one against the trimaps, while 112 px (64 patches) loses more
    than that."""
    from training.data import list_samples
    from training.data.dataset import WSSSDataset
    from training.torch_refiners import saliency_graph

    samples = list_samples(real_pets, "pets", "train")[::6][:50]
    data = WSSSDataset(real_pets, "pets", "train", 224, samples=samples)
    truth, known = data.masks == 1, data.masks != 255

    def iou(side: int) -> float:
        graph = saliency_graph(RefineConfig(method="saliency", saliency_size=side))
        maps = OnnxSaliency(graph, size=side)(data.images)
        fg = np.stack([otsu_foreground(m) for m in maps])
        return float((fg & truth & known).sum() / ((fg | truth) & known).sum())

    full, small, tiny = iou(224), iou(168), iou(112)
    assert small >= full - 0.01 and full >= 0.6, (full, small)
    assert tiny < small - 0.01, (tiny, small)


@pytest.mark.parametrize("stride, bias", [(2, True), (4, False)])
def test_upsampling_conv_transposes_become_phase_convs_that_int8_quantizes(stride, bias):
    """A ConvTranspose of kernel 2s, stride s, padding s/2 (the saliency decoder's 4 / 2 / 1)
    as s x s kernel-2 Convs interleaved: the same output to float rounding, and int8 then
    quantizes it (ConvInteger), where quantize_dynamic alone left it fp32. A ConvTranspose of
    another shape stays as it is."""
    import onnxruntime as ort

    from export.quantize import phase_convs

    rng = np.random.default_rng(stride)
    k = 2 * stride
    inits = [numpy_helper.from_array(rng.normal(size=(8, 5, k, k)).astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=5).astype(np.float32), "b"))
        inputs.append("b")
    nodes = [
        helper.make_node(
            "ConvTranspose",
            inputs,
            ["up"],
            kernel_shape=[k, k],
            strides=[stride] * 2,
            pads=[stride // 2] * 4,
        ),
        helper.make_node("ConvTranspose", ["up", "odd"], ["y"], kernel_shape=[3, 3]),
    ]
    inits.append(numpy_helper.from_array(rng.normal(size=(5, 2, 3, 3)).astype(np.float32), "odd"))
    graph = helper.make_graph(
        nodes,
        "decoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8, 6, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    fp32 = model.SerializeToString()
    rewritten = phase_convs(fp32)
    ops = [n.op_type for n in onnx.load_from_string(rewritten).graph.node]
    assert ops.count("Conv") == stride**2 and ops.count("ConvTranspose") == 1  # the 3x3 stays
    x = rng.normal(size=(2, 8, 6, 7)).astype(np.float32)

    def run(graph: bytes) -> np.ndarray:
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    want = run(fp32)
    assert want.shape == (2, 2, 6 * stride + 2, 7 * stride + 2)
    assert np.abs(run(rewritten) - want).max() < 1e-4 * np.abs(want).max()
    int8 = quantize_graph(fp32)
    assert "ConvInteger" in [n.op_type for n in onnx.load_from_string(int8).graph.node]
    assert np.abs(run(int8) - want).mean() < 0.05 * np.abs(want).mean()


def test_a_static_graph_is_calibrated_once_per_graph_and_photos(monkeypatch):
    """`wsss bench --quantized` times a static graph in process, then exports it: the same
    graph and photos are calibrated once (the last two kept), other photos again."""
    import export.quantize as quantize

    made = []
    monkeypatch.setattr(quantize, "_STATIC", {})
    monkeypatch.setattr(quantize, "_quantize_static", lambda m, x: made.append(m) or m + b"q")
    photos = [np.zeros((1, 3, 4, 4), np.float32), np.ones((1, 3, 4, 4), np.float32)]
    assert quantize.quantize_static_graph(b"vit", photos) == b"vitq"
    assert quantize.quantize_static_graph(b"vit", [p.copy() for p in photos]) == b"vitq"
    assert len(made) == 1
    quantize.quantize_static_graph(b"vit", photos[:1])  # other photos: calibrated again
    quantize.quantize_static_graph(b"other", photos)
    assert len(made) == 3 and len(quantize._STATIC) == 2  # the oldest dropped


def test_export_quantizes_the_networks_and_checks_them_against_fp32(trained, tmp_path, monkeypatch):
    """export.classifier / export.segmenter.quantize: int8 graphs in the repository, each
    checked against its fp32 graph on training photos besides the calibration's (the
    segmenter's masks; the classifier's classes, CAM masks and accuracy), said in the
    export's result and quantized.json. A check below the bar, or an int8 graph that does
    not run, refuses the export and leaves the repository as it was."""
    import json

    from export import repository
    from export.repository import export_repository
    from wsss.config import with_overrides
    from wsss.tensors import CLASSIFIER, SEGMENTER

    repo = tmp_path / "repo"
    cfg = with_overrides(
        trained, [f"export.repository={repo}", "export.segmenter.quantize=dynamic"]
    )
    result = export_repository(cfg)
    version = str(result.version)
    assert is_quantized((repo / SEGMENTER / version / "model.onnx").read_bytes())
    assert not is_quantized((repo / CLASSIFIER / version / "model.onnx").read_bytes())
    seg = result.quantized[SEGMENTER]
    assert seg["quantize"].startswith("dynamic") and seg["segmentation_miou"] >= 0.9
    assert seg["segmentation_pixel_agreement"] >= 0.9
    # Checked on training photos (the calibration's would be left out for static).
    assert seg["photos"].endswith(f"training images of {trained.data.root}")
    saved = json.loads((repo / CLASSIFIER / version / "quantized.json").read_text())
    assert set(saved) == {SEGMENTER}
    # And each form's masks against the truth of those photos: fp32's as evaluation scores
    # the in-process segmenter there (foreground IoU pooled at each photo's resolution).
    data, _ = repository._photo_data(cfg, repository.QUANTIZE_CHECK_PHOTOS)
    masks = pipeline_from_config(cfg)(data.images)["SEGMENTATION"]
    inter = union = 0
    for i, mask in enumerate(masks):
        truth = data.full_mask(i)
        mask = cv2.resize(mask, truth.shape[::-1], interpolation=cv2.INTER_NEAREST) == 1
        kept, true = truth != 255, truth == 1
        inter += np.count_nonzero(mask & true & kept)
        union += np.count_nonzero((mask | true) & kept)
    assert seg["truth_iou_fp32"] == pytest.approx(inter / union, abs=1e-3)
    assert seg["truth_scored"] == "foreground IoU" and seg["truth_image_iou_int8"] > 0

    files = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    # ONNX Runtime's dynamic quantization of this ResNet's CAM Einsum gives a graph that
    # does not run (its operands' shapes no longer broadcast): refused, said.
    broken = with_overrides(cfg, ["export.classifier.quantize=dynamic"])
    with pytest.raises(ExportError, match="export.classifier.quantize dynamic: the int8 graph"):
        export_repository(broken)
    # Static int8 runs, and moves this tiny classifier's CAM masks too far (its fixed
    # refiner's masks are made of them): refused.
    static = with_overrides(cfg, ["export.classifier.quantize=static"])
    with pytest.raises(ExportError, match="export.classifier: the int8 graph's cams_miou"):
        export_repository(static)
    monkeypatch.setattr(repository, "MIN_QUANTIZED_AGREEMENT", 1.01)
    with pytest.raises(ExportError, match="export.segmenter: the int8 graph's segmentation_miou"):
        export_repository(cfg)
    # Agreeing with fp32 is not enough: masks that lose against the truth are refused.
    monkeypatch.setattr(repository, "MIN_QUANTIZED_AGREEMENT", 0.9)
    worse = {"truth_iou_fp32": 0.8, "truth_iou_int8": 0.7, "truth_scored": "foreground IoU"}
    monkeypatch.setattr(repository, "_mask_quality", lambda *args: worse)
    with pytest.raises(ExportError, match=r"masks' \(m\)IoU against the truth is 0.100 below"):
        export_repository(cfg)
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == files


@pytest.mark.slow
@pytest.mark.realdata
def test_the_int8_classifier_keeps_the_classes_of_real_photos(real_pets, tmp_path):
    """make serve's classifier (EfficientNet-Lite0's ImageNet head, cat and dog groups) in
    static int8, calibrated on 60 Pet training photos, checked by export on 64 others: the
    top class stays on nearly every photo and neither accuracy nor mAP falls by more than
    one photo's worth (measured: 63 of 64 kept, accuracy 0.953 against fp32's 0.938, mAP
    0.986 against 0.994; reports/bench/quantized.md). Its CAMs' masks move (0.70 mIoU with
    fp32's at the 0.5 cut): accepted where a saliency map gives the extent (make serve's
    refiner), refused where the CAMs' cut is the mask."""
    from export.repository import export_repository
    from training import stages
    from wsss.config import with_overrides
    from wsss.tensors import CLASSIFIER

    cfg = load_config(
        ROOT / "configs" / "serve.yaml",
        [
            f"data.root={real_pets}",
            "data.synth_count=0",
            f"runs={tmp_path / 'runs'}",
            f"export.repository={tmp_path / 'repo'}",
            "export.vit.quantize=none",  # the classifier is what is checked
            "export.classifier.quantize=static",
            f"export.classifier.calibration={real_pets}",
        ],
    )
    stages.run(cfg)
    done = export_repository(cfg).quantized[CLASSIFIER]
    assert done["photos"] == f"64 training images of {real_pets}"
    assert done["labelled_photos"] == 64
    assert done["top_class_agreement"] >= 61 / 64, done
    assert done["top1_int8"] >= done["top1_fp32"] - 1 / 64, done
    assert done["map_int8"] >= done["map_fp32"] - 0.02, done
    assert done["top1_fp32"] >= 0.85, done  # the fp32 head knows cats from dogs
    assert done["cams_miou"] < 0.9, done  # read, not gated: saliency gives the extent
    with pytest.raises(ExportError, match="the int8 graph's cams_miou with fp32's is 0"):
        export_repository(with_overrides(cfg, ["refine.method=fixed"]))


def _score_graph(shift: float) -> bytes:
    """IMAGE uint8 [N, 4, 4, 3] -> CAMS (each channel / 255, [N, 3, 4, 4], plus ``shift`` on
    the first class) and SCORES (their means): a stand-in classifier to compare."""
    image = helper.make_tensor_value_info("IMAGE", TensorProto.UINT8, ["n", 4, 4, 3])
    cams = helper.make_tensor_value_info("CAMS", TensorProto.FLOAT, ["n", 3, 4, 4])
    scores = helper.make_tensor_value_info("SCORES", TensorProto.FLOAT, ["n", 3])
    consts = [
        numpy_helper.from_array(np.float32(255.0), "scale"),
        numpy_helper.from_array(np.array([shift, 0, 0], np.float32).reshape(1, 3, 1, 1), "add"),
    ]
    nodes = [
        helper.make_node("Cast", ["IMAGE"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["f", "scale"], ["g"]),
        helper.make_node("Transpose", ["g"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Add", ["t", "add"], ["CAMS"]),
        helper.make_node("ReduceMean", ["CAMS"], ["SCORES"], axes=[2, 3], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "scores", [image], [cams, scores], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_classifiers_check_reads_its_present_classes_and_its_cams():
    """``network_agreement``: where several classes may be present, the share of photos
    whose classes at the served thresholds stay; the CAMs by the masks they make."""
    from export.quantize import network_agreement
    from wsss.tensors import ModelSpec, TensorSpec

    spec = ModelSpec(
        "classifier",
        (TensorSpec("IMAGE", "uint8", (4, 4, 3)),),
        (TensorSpec("SCORES", "float32", (3,)), TensorSpec("CAMS", "float32", (3, 4, 4))),
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    same = network_agreement(spec, _score_graph(0), _score_graph(0), images, presence=0.5)
    assert same["top_class_agreement"] == same["present_class_agreement"] == 1.0
    assert same["cams_miou"] == 1.0 and same["max_abs_score"] == 0.0
    moved = network_agreement(spec, _score_graph(0), _score_graph(0.3), images, presence=0.5)
    a = images[..., 0].reshape(20, -1).mean(1) / 255
    crossed = ((a >= 0.5) != (a + 0.3 >= 0.5)).mean()  # photos whose first class appears
    assert moved["present_class_agreement"] == pytest.approx(1 - crossed) and crossed > 0
    assert moved["cams_miou"] < 0.9 and moved["max_abs_score"] == pytest.approx(0.3)
    labels = [(int(np.argmax(s)),) for s in images.reshape(20, -1, 3).mean(1)]
    scored = network_agreement(spec, _score_graph(0), _score_graph(0.3), images, labels)
    assert scored["top1_fp32"] == 1.0 > scored["top1_int8"]  # the shift costs accuracy
