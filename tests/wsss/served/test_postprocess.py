"""The postprocess model refuses an ORIGINAL_SIZE over the image pixel limit before making a
mask: a client may call it directly, and 8 bytes asking 16384 x 16384 would be two 268 MB
masks an item. Run in process, with the backend's utilities as tests/served_stub.py fakes them."""

import importlib
import json
import sys
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format

from export.configs import build_configs, parse
from export.repository import export_repository
from tests.conftest import random_export_cfg
from tests.served_stub import _fake_backend_utils
from wsss.config import load_config
from wsss.served.images import MAX_PIXELS, ImageError, output_size, resize_mask
from wsss.tensors import (
    ORIGINAL_SIZE,
    POSTPROCESS,
    PSEUDO_MASK,
    PSEUDO_MASK_FULL,
    SEGMENTATION,
    SEGMENTATION_FULL,
    served_models,
)

INVALID_ARG = 3  # the fake TritonError's code, as Triton's


@pytest.fixture
def load(monkeypatch):
    """``load(config)``: the postprocess model, initialized with that ModelConfig."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_backend_utils())
    monkeypatch.delitem(sys.modules, "wsss.served.postprocess", raising=False)
    module = importlib.import_module("wsss.served.postprocess")

    def loaded(config):
        model = module.TritonPythonModel()
        as_json = json_format.MessageToDict(config, preserving_proto_field_name=True)
        model.initialize({"model_config": json.dumps(as_json)})
        return model

    yield loaded
    sys.modules.pop("wsss.served.postprocess", None)  # bound to this fake


def _config(max_pixels: int | None):
    """postprocess's config as the exporter builds it, with or without the limit (an older
    export's)."""
    params = {POSTPROCESS: {"max_pixels": str(max_pixels)}} if max_pixels else {}
    specs = served_models(48, 3, 2)
    versions = {name: [1] for name in specs}
    return build_configs(specs, load_config(None, []).export, params, versions)[POSTPROCESS]


def _ask(model, size: tuple[int, int], batch: int = 2, segmentation=None):
    masks = np.random.default_rng(0).integers(0, 3, (batch, 48, 48), dtype=np.uint8)
    request = {
        PSEUDO_MASK: masks,
        SEGMENTATION: masks if segmentation is None else segmentation,
        ORIGINAL_SIZE: np.array([size] * batch, np.int32),
    }
    request = {k: types.SimpleNamespace(as_numpy=lambda a=a: a) for k, a in request.items()}
    (response,) = model.execute([request])
    return masks, response


def test_a_size_over_the_default_limit_is_refused_before_any_mask_is_made(load):
    model = load(_config(None))  # an older export's config, without the limit: the default
    tracemalloc.start()
    try:
        _, response = _ask(model, (6325, 6325), batch=1)  # 40,005,625 pixels
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.error is not None and response.error.code() == INVALID_ARG
    assert response.error.message() == (
        "postprocess: item 0: output size 6325x6325 = 40,005,625 pixels exceeds the limit "
        f"of {MAX_PIXELS:,} (an image's, export.max_image_pixels)"
    )
    assert peak < 1 << 20  # no mask of that size was made (each would be 40 MB)


def test_the_configured_limit_is_held_and_a_size_under_it_served(load):
    model = load(_config(100 * 120))
    for (h, w), batch in [((121, 100), 2), ((2000, 2000), 8)]:
        _, refused = _ask(model, (h, w), batch)
        assert refused.error.code() == INVALID_ARG
        assert (
            f"postprocess: item 0: output size {h}x{w} = {h * w:,} pixels exceeds the limit "
            "of 12,000 (" in refused.error.message()
        )
    masks, served = _ask(model, (120, 100))
    assert served.error is None
    got = {t.name(): t.as_numpy() for t in served.output_tensors}
    for name in (PSEUDO_MASK_FULL, SEGMENTATION_FULL):
        assert got[name].shape == (2, 120, 100)
        np.testing.assert_array_equal(got[name][1], resize_mask(masks[1], (120, 100)))


@pytest.mark.parametrize("batch", [1, 3])
def test_each_mask_comes_back_at_the_photos_size_a_pass_throughs_two_resized_once(load, batch):
    model = load(_config(None))
    other = np.random.default_rng(1).integers(0, 3, (batch, 48, 48), dtype=np.uint8)
    for segmentation in (None, other):  # a pass-through's SEGMENTATION is its PSEUDO_MASK
        masks, served = _ask(model, (75, 61), batch, segmentation)
        got = {t.name(): t.as_numpy() for t in served.output_tensors}
        seg = masks if segmentation is None else segmentation
        for name, sent in ((PSEUDO_MASK_FULL, masks), (SEGMENTATION_FULL, seg)):
            want = np.stack([resize_mask(m, (75, 61)) for m in sent])
            np.testing.assert_array_equal(got[name], want)
            assert got[name].flags.c_contiguous
        same = np.shares_memory(got[PSEUDO_MASK_FULL], got[SEGMENTATION_FULL])
        assert same == (segmentation is None)


def test_output_size_refuses_sides_out_of_range_and_too_many_pixels():
    assert output_size(np.array([120, 100], np.int32), 12_000) == (120, 100)
    # An int32 product would wrap: 65536 x 65536 is 0 in 32 bits.
    for size, message in [
        ((0, 10), "out of range"),
        ((-4, -4), "out of range"),
        ((65536, 65536), "out of range"),
        ((8000, 8000), "64,000,000 pixels exceeds the limit of 40,000,000"),
    ]:
        with pytest.raises(ImageError, match=message):
            output_size(np.array(size, np.int32))
    with pytest.raises(ImageError, match="exceeds the limit of 100"):
        resize_mask(np.zeros((4, 4), np.uint8), (11, 10), max_pixels=100)


def test_the_export_gives_postprocess_the_image_limit(tmp_path):
    cfg = random_export_cfg(tmp_path, "export.max_image_pixels=5000")
    export_repository(cfg)
    repo = Path(cfg.export.repository)
    for model in ("preprocess", POSTPROCESS):
        config = parse((repo / model / "config.pbtxt").read_text())
        assert config.parameters["max_pixels"].string_value == "5000", model
    # Its warm-up asks for no more than the limit: a refused warm-up would leave the model
    # (and the bytes ensemble) unloaded.
    warm = np.frombuffer((repo / POSTPROCESS / "warmup" / ORIGINAL_SIZE).read_bytes(), np.int32)
    assert output_size(warm, 5000) == (70, 70)


def test_a_limit_below_one_image_at_the_model_size_is_refused(tmp_path):
    from wsss.errors import InputError

    cfg = random_export_cfg(tmp_path, "export.max_image_pixels=1000")
    with pytest.raises(InputError, match="below one image at the model's own size"):
        export_repository(cfg)
    assert not Path(cfg.export.repository).exists() or not any(
        Path(cfg.export.repository).iterdir()
    )


def test_a_resized_mask_takes_the_label_under_each_pixels_centre():
    """4x smaller: output pixel i covers source pixels 4i..4i+3 and takes 4i+2, the one
    under its centre (OpenCV's INTER_NEAREST took 4i, shifting every mask by 1.5 source
    pixels); 4x larger, each source pixel covers its own 4 x 4 block; a round trip of a
    photo-size mask through the model's side keeps its edges where they were."""
    from wsss.served.images import resize_mask

    row = np.arange(8, dtype=np.uint8)[None].repeat(8, 0)
    assert resize_mask(row, (2, 2))[0].tolist() == [2, 6]
    assert resize_mask(np.array([[1, 2]], np.uint8), (1, 8))[0].tolist() == [1] * 4 + [2] * 4
    mask = np.zeros((375, 500), np.uint8)
    mask[100:300, 120:380] = 1
    back = resize_mask(resize_mask(mask, (224, 224)), (375, 500))
    iou = ((back == 1) & (mask == 1)).sum() / ((back == 1) | (mask == 1)).sum()
    assert iou > 0.99, iou
