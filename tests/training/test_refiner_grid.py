"""Every registered refiner through one grid, as tests/training/models/test_models.py runs
the models.

Each spelling the table accepts (``wsss.served.registry.RefinerSpec``: a seed, optionally
followed by GrabCut or Chan-Vese) is built from its config and run on the same batches:
batch sizes and image sizes, degenerate CAMs (all zero, flat, all one), binary and
multi-class tasks, and its served form (the graph for ``network`` refiners, the Python model's
settings as the exporter writes them for the others). A new refiner is a table entry and a
class; its test here is the line that lists its spelling, which the first test demands.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from export.repository import _vit
from tests.tiny_graphs import tiny_saliency
from training.levelset.model import LevelSetGraph, LevelSetHead
from training.torch_refiners import build_refiner, served_settings
from wsss import config as wsss_config
from wsss.config import Config, RefineConfig
from wsss.served.classical import OnnxMaps
from wsss.served.refiners import build_classical
from wsss.served.registry import (
    FOLLOW_UPS,
    LABELS_ONLY,
    MORE_THAN_LABELS,
    REFINERS,
    RefinerSpec,
    builder,
)
from wsss.tensors import VIT_OUTPUT

SPECS = [
    "fixed",
    "otsu",
    "fixed+grabcut",
    "otsu+grabcut",
    "fixed+chanvese",
    "otsu+chanvese",
    "fixed+crf",
    "otsu+crf",
    "saliency",
    "saliency+grabcut",
    "saliency+chanvese",
    "saliency+crf",
    "vit",
    "walk",
    "walk+grabcut",
    "walk+chanvese",
    "walk+crf",
    "levelset",
]
FEATURES = 8  # channels of the fake backbone features the level set reads


def test_the_grid_covers_every_spelling_the_registry_accepts():
    accepted = []
    for seed in (n for n, e in REFINERS.items() if e.part == "seed"):
        for follow in (None, *FOLLOW_UPS):
            try:
                accepted.append(str(RefinerSpec(seed, follow)))
            except ValueError:
                pass
    assert sorted(accepted) == sorted(SPECS)
    # Every part has its class: a builder registered against its entry (the served numpy
    # one, or training's), and the config reads the table's names.
    assert all(builder(name, "training") for name in REFINERS)
    assert wsss_config.FOLLOW_UPS is FOLLOW_UPS


def test_rows_that_read_a_pretrained_vit_are_marked():
    """WSSS papers mark the rows that use more than image labels: every table prints what a
    refiner's masks are made from, and only the ViT readers (a follow-up after one too) say
    more than image labels."""
    marked = {t for t in SPECS if RefinerSpec.parse(t).supervision == MORE_THAN_LABELS}
    seeds = {t.partition("+")[0] for t in marked}
    assert seeds == {"saliency", "vit", "walk"}
    assert all(RefinerSpec.parse(t).supervision == LABELS_ONLY for t in set(SPECS) - marked)
    assert MORE_THAN_LABELS in RefinerSpec.parse("walk+crf").label


def test_one_spelling_round_trips_through_config_and_cli_overrides():
    for text in SPECS + ["otsu+chanvese50"]:
        # A config's Chan-Vese carries its iteration count (chanvese_iterations: 15).
        spelled = text + "15" if text.endswith("chanvese") else text
        spec = RefinerSpec.parse(text)
        assert str(RefinerSpec.of(spec.apply(RefineConfig()))) == spelled
        cfg = wsss_config.load_config(None, [f"refine.method={text}"])
        assert str(RefinerSpec.of(cfg.refine)) == spelled
        assert RefinerSpec.parse(spelled) == RefinerSpec.of(cfg.refine)
        if spec.served_as == "python":  # the served model's refiner is named the same
            assert build_classical(served_settings(cfg.refine), True).name == spelled
    assert wsss_config.load_config(None, ["refine.method=otsu+chanvese50"]).refine == (
        RefineConfig("otsu", chanvese=True, chanvese_iterations=50)
    )
    with pytest.raises(wsss_config.ConfigError, match="contradicts refine.chanvese_iterations=5"):
        wsss_config.load_config(
            None, ["refine.method=otsu+chanvese50", "refine.chanvese_iterations=5"]
        )
    for bad in ("vit+grabcut", "magic+grabcut", "otsu+otsu", "grabcut", "otsu+grabcut5"):
        with pytest.raises(ValueError, match="optionally \\+grabcut or \\+chanvese"):
            RefinerSpec.parse(bad)
    with pytest.raises(ValueError, match="exclude each other"):
        RefinerSpec.of(RefineConfig("otsu", grabcut=True, chanvese=True))
    with pytest.raises(wsss_config.ConfigError, match="refine.method 'otsu\\+magic'"):
        wsss_config.load_config(None, ["refine.method=otsu+magic"])
    with pytest.raises(wsss_config.ConfigError, match="contradicts refine.grabcut=false"):
        wsss_config.load_config(None, ["refine.method=otsu+grabcut", "refine.grabcut=false"])
    served = wsss_config.load_config(None, ["export.refine.method=saliency+grabcut"]).export
    assert str(RefinerSpec.of(served.refine)) == "saliency+grabcut"
    # Overriding a whole config (a study's variant): the spelling replaces the switches.
    base = wsss_config.load_config(None, ["refine.method=otsu+grabcut"])
    again = wsss_config.with_overrides(base, ["refine.method=fixed+chanvese"])
    assert str(RefinerSpec.of(again.refine)) == "fixed+chanvese15"


def _levelset(k: int, size: int, multi_label: bool) -> LevelSetGraph:
    torch.manual_seed(0)
    head = LevelSetHead(FEATURES, k, size, hidden=8, modes=4, layers=2).eval()
    return LevelSetGraph(head, multi_label).eval()


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> str:
    """A small graph with the saliency model's interface, in the bundled ViT's place for the
    saliency refiners: the grid is about shapes, degenerate CAMs and the served form, not
    what the ViT sees (its masks are held to real photos: tests/training/test_real_pets.py,
    tests/export/test_quantize.py), and the ViT took 2-4 s a case here. The attention and
    random-walk refiners read the ViT's inner layers: they run the bundled one."""
    path = tmp_path_factory.mktemp("grid") / "saliency.onnx"
    path.write_bytes(tiny_saliency())
    return str(path)


def _refiner(text: str, k: int, size: int, multi_label: bool, saliency: str | None = None):
    cfg = RefinerSpec.parse(text).apply(RefineConfig(chanvese_iterations=3))
    if cfg.method == "saliency":
        cfg = dataclasses.replace(cfg, saliency_weights=saliency)
    levelset = _levelset(k, size, multi_label) if text == "levelset" else None
    return cfg, build_refiner(cfg, multi_label, levelset=levelset)


def _batch(b: int, k: int, h: int, w: int, kind: str):
    """Images with a bright disc; CAMs a blob on the disc (``blob``) or degenerate."""
    rng = np.random.default_rng(b * 100 + k)
    images = rng.integers(0, 80, (b, h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    disc = np.hypot(yy - h / 2, xx - w / 2) < min(h, w) / 4
    images[:, disc] = (220, 60, 40)
    blob = np.clip(1 - np.hypot(yy - h / 2, xx - w / 2) / (min(h, w) / 2), 0, 1)
    value = {"blob": None, "zero": 0.0, "flat": 0.5, "one": 1.0}[kind]
    cams = np.zeros((b, k, h, w), np.float32)
    cams[:, 0] = blob if value is None else value
    if k > 2:
        cams[:, 2] = np.roll(blob, w // 4, axis=1) if value is None else value
    scores = np.zeros((b, k), np.float32)
    scores[:, 0] = 0.9
    if k > 2:
        scores[:, 2] = 0.8
    features = rng.standard_normal((b, FEATURES, h // 8, w // 8)).astype(np.float32)
    return images, scores, cams, features


def _run(refiner, batch):
    images, scores, cams, features = batch
    return refiner(images, scores, cams, features if refiner.needs_features else None)


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("multi_label", [False, True], ids=["binary", "multi"])
def test_every_refiner_on_the_grid(text, multi_label, stand_in):
    k = 3 if multi_label else 2
    shapes = [(1, 32, 32), (3, 48, 40)]
    if text == "levelset":  # its head is built for one square side
        shapes = [(1, 32, 32), (3, 32, 32)]
    for b, h, w in shapes:
        _, refiner = _refiner(text, k, h, multi_label, stand_in)
        allowed = {0, 1} if refiner.binary else {0, 1, 3}  # background, the present classes
        for kind in ("blob", "zero", "flat", "one"):
            masks = _run(refiner, _batch(b, k, h, w, kind))
            assert masks.shape == (b, h, w) and masks.dtype == np.uint8, (kind, masks.shape)
            assert set(np.unique(masks)) <= allowed, (kind, np.unique(masks))
            if kind == "blob" and text != "levelset":  # an untrained level set marks nothing
                assert masks.any(axis=(1, 2)).all(), kind
            if kind == "blob" and text in ("fixed", "otsu"):  # a CAM-only seed: the blob
                h2, w2 = h // 2, w // 2
                assert (masks[:, h2, w2] > 0).all() and (masks[:, 0, 0] == 0).all()


@pytest.mark.parametrize("text", SPECS)
def test_every_refiner_serves_as_it_trains(text, stand_in):
    """The served form gives the training refiner's masks: the graph for graph refiners,
    the Python model's builder from the settings the exporter writes for the others."""
    k, size, multi_label = 3, 32, True
    cfg, refiner = _refiner(text, k, size, multi_label, stand_in)
    batch = _batch(2, k, size, size, "blob")
    expected = _run(refiner, batch)
    spec = RefinerSpec.of(cfg)
    assert refiner.served_as == spec.served_as
    assert refiner.needs_features == spec.entry.needs_features
    if spec.served_as == "training":  # not served: the Python model refuses it, saying so
        settings = json.loads(json.dumps(served_settings(cfg)))
        with pytest.raises(ValueError, match="training only"):
            build_classical(settings, multi_label, saliency=lambda images: images[..., 0])
        return
    if spec.served_as == "network":
        images, scores, cams, features = (torch.from_numpy(a) for a in batch)
        inputs = (
            (images, scores, cams, features) if refiner.needs_features else (images, scores, cams)
        )
        with torch.no_grad():
            np.testing.assert_array_equal(refiner.module(*inputs).numpy(), expected)
        return
    # What the exporter writes: the settings in config.pbtxt, and the ViT model whose maps
    # the refiner is given (its pre-processing in the graph: 32 px resized to 224 as
    # OpenCV's INTER_AREA, up to the rounding of a tie).
    settings = json.loads(json.dumps(served_settings(cfg)))
    assert "runners" not in settings  # the served refiner runs no network
    served = build_classical(settings, multi_label)
    maps = None
    if spec.entry.vit:
        export = Config(refine=cfg, data=dataclasses.replace(Config().data, root="/nonexistent"))
        export.data.image_size = size
        vit = _vit(export, refiner, VIT_OUTPUT[spec.entry.vit])
        maps = OnnxMaps(vit.graph)(batch[0])
        with pytest.raises(ValueError, match="or its maps"):
            served(*batch[:3])  # neither a ViT nor its maps
    got = served(*batch[:3], maps=maps)
    assert (got == expected).mean() >= 0.99
    if not spec.entry.vit:
        np.testing.assert_array_equal(got, expected)


def test_settings_of_older_exports_build_the_same_refiner():
    """A served refiner's settings as exports before the dense CRF wrote them (no crf
    switch or weights) build the refiner the table names, under the same spelling."""
    cfg = RefinerSpec.parse("otsu+grabcut").apply(RefineConfig())
    old = served_settings(cfg)
    for key in [k for k in old if k.startswith("crf")]:
        del old[key]
    refiner = build_classical(old, True)
    assert refiner.name == "otsu+grabcut"
    batch = _batch(2, 3, 32, 32, "blob")
    np.testing.assert_array_equal(refiner(*batch[:3]), build_refiner(cfg, True)(*batch[:3]))
