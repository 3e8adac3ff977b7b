"""The served repository stands alone: its Python models run with the project unimportable,
and the thresholds are ONNX graphs equal to the numpy refiners (and to scikit-image)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import json_format

from export.configs import parse
from export.repository import export_repository
from tests.conftest import ROOT, random_export_cfg
from tests.tiny_graphs import tiny_saliency
from training.torch_refiners import ThresholdGraph, build_refiner
from wsss.config import RefineConfig
from wsss.served import HELPERS, MODELS
from wsss.served.classical import OnnxMaps
from wsss.served.images import (
    decode_image,
    decode_resized,
    encode_png,
    resize_image,
    resize_mask,
)
from wsss.served.registry import RefinerSpec
from wsss.tensors import (
    CAMS,
    IMAGE,
    IMAGE_BYTES,
    ORIGINAL_SIZE,
    POSTPROCESS,
    PREPROCESS,
    PSEUDO_MASK,
    PSEUDO_MASK_FULL,
    REFINER,
    SCORES,
    SEGMENTATION,
    SEGMENTATION_FULL,
    VIT,
    VIT_OUTPUT,
)

SERVED = ROOT / "wsss" / "served"
ALLOWED = {"numpy", "cv2", "PIL", "onnxruntime", "triton_python_backend_utils"}


def test_served_modules_import_only_numpy_opencv_pillow_onnxruntime():
    stdlib = set(sys.stdlib_module_names)
    for path in SERVED.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            bad = [r for r in roots if r not in ALLOWED | stdlib | {"__future__"}]
            assert not bad, f"{path.name} imports {bad}: the served repository has no such module"
    assert {f"{m}.py" for m in MODELS} | set(HELPERS) | {"__init__.py"} == {
        p.name for p in SERVED.glob("*.py")
    }


def _blobs(k=3, size=48, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cams = []
    for _ in range(2):
        maps = []
        for _ in range(k):
            cy, cx, r = rng.uniform(10, size - 10, 2).tolist() + [rng.uniform(6, 14)]
            blob = np.clip(1 - np.hypot(yy - cy, xx - cx) / (2 * r), 0, 1)
            maps.append(blob + 0.05 * rng.random((size, size)))
        cams.append(np.stack(maps))
    cams = np.clip(np.asarray(cams, np.float32), 0, 1)
    scores = rng.dirichlet(np.ones(k), 2).astype(np.float32)
    return cams, scores


def _photo(size):
    import cv2
    import skimage.data

    return cv2.resize(skimage.data.chelsea(), (size, size), interpolation=cv2.INTER_AREA)


def _jpeg(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _run_standalone(repo: Path, model: str, inputs: dict, tmp_path: Path) -> dict:
    """One request to ``model``'s newest version, run by tests/served_stub.py."""
    folder = repo / model
    version = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    config = json_format.MessageToDict(
        parse((folder / "config.pbtxt").read_text()), preserving_proto_field_name=True
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    np.savez(tmp_path / "inputs.npz", **inputs)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "served_stub.py"),
            str(folder),
            str(version),
            str(tmp_path / "config.json"),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the checkout: nothing of the project on the path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp_path / "out.npz", allow_pickle=True) as out:
        result = {k: out[k] for k in out.files}
    assert list(result.pop("loaded")) == []
    return result


@pytest.mark.slow
@pytest.mark.parametrize(
    "refine",
    [
        ["refine.method=fixed", "refine.grabcut=true"],
        ["refine.method=otsu", "refine.chanvese=true", "refine.chanvese_iterations=5"],
        ["refine.method=vit"],
        ["refine.method=saliency"],
        ["refine.method=saliency", "refine.grabcut=true", "refine.saliency_doubt=background"],
        ["refine.method=walk", "refine.threshold=0.4"],
    ],
    ids=["grabcut", "chanvese", "vit", "saliency", "saliency-grabcut", "walk"],
)
def test_python_refiner_runs_without_the_project(tmp_path, refine):
    if refine == ["refine.method=saliency"]:  # its maps come as an input: any ViT will do
        # (after GrabCut the stand-in's maps mark the whole image: that case keeps the ViT)
        (tmp_path / "saliency.onnx").write_bytes(tiny_saliency())
        refine = [*refine, f"refine.saliency_weights={tmp_path / 'saliency.onnx'}"]
    cfg = random_export_cfg(tmp_path, *refine)
    export_repository(cfg)
    cams, scores = _blobs()
    images = np.stack([_photo(48), _photo(48)[::-1]])
    repo = Path(cfg.export.repository)
    inputs = {IMAGE: images, SCORES: scores, CAMS: cams}
    vit = VIT_OUTPUT.get(RefinerSpec.of(cfg.refine).entry.vit)
    if vit:  # the ViT model's maps, as the ensemble hands them on (an ONNX graph)
        inputs[vit] = OnnxMaps(repo / VIT / "1" / "model.onnx")(images)
    got = _run_standalone(repo, REFINER, inputs, tmp_path)
    want = build_refiner(cfg.refine, multi_label=False)(images, scores, cams)
    if vit:  # 48 px resized to the ViT's 224 in the graph: OpenCV's up to a rounding tie
        assert (got[PSEUDO_MASK] == want).mean() >= 0.99
    else:
        np.testing.assert_array_equal(got[PSEUDO_MASK], want)
    assert 0 < (want > 0).mean() < 1  # a real mask, not an empty or full one
    if refine[0] == "refine.method=fixed":  # a client calling the refiner itself
        for name in (SCORES, CAMS):
            bad = {**inputs, name: np.where(inputs[name] > 0.5, np.nan, inputs[name])}
            refused = _run_standalone(repo, REFINER, bad, tmp_path)
            assert int(refused["code"]) == 3 and f"{name} holds NaN" in str(refused["error"])


@pytest.mark.slow
def test_pre_and_postprocess_run_without_the_project(tmp_path):
    cfg = random_export_cfg(tmp_path)
    export_repository(cfg)
    repo = Path(cfg.export.repository)
    photo = _photo(240)[:, :200]
    for data in (encode_png(photo), _jpeg(photo)):  # the JPEG decoded at half its size first
        blob = np.array([[data]], dtype=object)
        got = _run_standalone(repo, PREPROCESS, {IMAGE_BYTES: blob}, tmp_path)
        np.testing.assert_array_equal(got[IMAGE][0], decode_resized(data, (48, 48))[0])
        np.testing.assert_array_equal(got[ORIGINAL_SIZE], [[240, 200]])
    full = resize_image(decode_image(data), (48, 48))
    assert 0 < np.abs(got[IMAGE][0].astype(int) - full).mean() < 1  # scaled, and close
    bad = _run_standalone(repo, PREPROCESS, {IMAGE_BYTES: np.array([[b"no"]], object)}, tmp_path)
    assert "cannot decode" in str(bad["error"]) and int(bad["code"]) == 3  # INVALID_ARG

    masks = np.random.default_rng(0).integers(0, 3, (1, 48, 48), dtype=np.uint8)
    sizes = np.array([[120, 100]], np.int32)
    got = _run_standalone(
        repo,
        POSTPROCESS,
        {PSEUDO_MASK: masks, SEGMENTATION: masks, ORIGINAL_SIZE: sizes},
        tmp_path,
    )
    np.testing.assert_array_equal(got[SEGMENTATION_FULL][0], resize_mask(masks[0], (120, 100)))
    np.testing.assert_array_equal(got[PSEUDO_MASK_FULL][0], resize_mask(masks[0], (120, 100)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fixed", "otsu"])
def test_threshold_refiners_are_served_as_onnx_equal_to_numpy(tmp_path, method):
    import onnxruntime as ort

    cfg = random_export_cfg(tmp_path, f"refine.method={method}")
    export_repository(cfg)
    folder = Path(cfg.export.repository) / REFINER
    version = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    assert 'backend: "onnxruntime"' in (folder / "config.pbtxt").read_text()
    assert not (folder / str(version) / "model.py").exists()
    session = ort.InferenceSession(str(folder / str(version) / "model.onnx"))
    for seed in range(4):
        cams, scores = _blobs(seed=seed)
        images = np.zeros((2, 48, 48, 3), np.uint8)
        (got,) = session.run(None, {IMAGE: images, SCORES: scores, CAMS: cams})
        want = build_refiner(cfg.refine, multi_label=False)(images, scores, cams)
        # Otsu's threshold may land one histogram bin away (float32 binning): a few pixels.
        assert (got != want).mean() <= (0.01 if method == "otsu" else 0.0)
        assert (want > 0).any()


def test_served_threshold_matches_numpy_for_several_classes():
    cams, _ = _blobs(k=4, seed=3)
    scores = np.array([[0.9, 0.7, 0.1, 0.6], [0.2, 0.1, 0.3, 0.05]], np.float32)
    images = np.zeros((2, 48, 48, 3), np.uint8)
    for method in ("fixed", "otsu"):
        for binary in (True, False):
            refiner = build_refiner(RefineConfig(method, threshold=0.4), True, binary)
            want = refiner(images, scores, cams)
            with torch.inference_mode():
                got = ThresholdGraph(refiner)(*map(torch.from_numpy, (images, scores, cams)))
            assert (got.numpy() != want).mean() <= (0.01 if method == "otsu" else 0.0)
            assert len(np.unique(want)) > (2 if not binary else 1)


def test_served_fixed_threshold_breaks_ties_and_refines_nothing_as_numpy_does():
    """The fixed cut's graph (the strongest present class, where it reaches the cut) equals
    numpy's refiner pixel for pixel: two present classes with equal CAMs go to the first, a
    class below its score threshold claims nothing, and a photo whose top score is under
    min_score is all background."""
    cams, _ = _blobs(k=3, seed=5)
    cams[:, 2] = cams[:, 0]  # classes 0 and 2 tie everywhere
    scores = np.array([[0.9, 0.2, 0.8], [0.05, 0.04, 0.03]], np.float32)
    images = np.zeros((2, 48, 48, 3), np.uint8)
    refiner = build_refiner(RefineConfig("fixed", threshold=0.3, min_score=0.1), True, False)
    want = refiner(images, scores, cams)
    with torch.inference_mode():
        got = ThresholdGraph(refiner)(*map(torch.from_numpy, (images, scores, cams))).numpy()
    np.testing.assert_array_equal(got, want)
    assert set(np.unique(want[0])) == {0, 1} and not want[1].any()
