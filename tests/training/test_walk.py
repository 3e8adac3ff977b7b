"""The random walk of refine.method walk (wsss.served.classical.random_walk, WalkRefiner;
the ViT's tokens in training.walk): CAMs spread over the patches their tokens say are alike,
and nowhere else."""

from __future__ import annotations

import numpy as np
import pytest

from wsss.config import ConfigError, load_config
from wsss.served.classical import random_walk, walk_cams
from wsss.served.refiners import FixedThreshold, WalkRefiner


def _two_regions(h: int = 4, w: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens [h*w, 8]: the left half one direction, the right half an orthogonal one
    (a little noise on each); a CAM [1, h, w] lit at one left-half patch; the left half."""
    rng = np.random.default_rng(0)
    left = np.zeros((h, w), bool)
    left[:, : w // 2] = True
    eye = np.eye(8, dtype=np.float32)
    tokens = np.where(left[..., None], eye[0], eye[1]) + 0.05 * rng.random((h, w, 8))
    cam = np.zeros((1, h, w), np.float32)
    cam[0, 1, 1] = 1.0
    return tokens.reshape(h * w, 8).astype(np.float32), cam, left


def test_a_cam_spreads_over_its_own_region_only():
    tokens, cam, left = _two_regions()
    walked = random_walk(cam, tokens, beta=8.0, steps=4)[0]
    assert walked[left].min() > 0.01  # every patch alike to the lit one got some
    assert walked[~left].max() < 1e-4  # the orthogonal half none
    assert walked.max() < cam.max()  # spread, not amplified


def test_a_constant_map_stays_constant():
    tokens, _, _ = _two_regions()
    flat = np.full((2, 4, 6), 0.3, np.float32)
    np.testing.assert_allclose(random_walk(flat, tokens, 8.0, 3), flat, rtol=1e-5)


def test_tokens_must_fit_the_grid():
    tokens, cam, _ = _two_regions()
    with pytest.raises(ValueError, match="do not fit"):
        random_walk(cam, tokens[:-1], 8.0, 2)


def test_cams_at_the_image_size_walk_on_the_patch_grid():
    """walk_cams averages a CAM onto the tokens' grid, walks it and brings it back: the lit
    left-half patch of an 8 x 8 CAM fills the left half, the right half stays dark."""
    tokens, _, _ = _two_regions(4, 4)
    cams = np.zeros((1, 8, 8), np.float32)
    cams[0, 2:4, 2:4] = 1.0
    walked = walk_cams(cams, tokens, 8.0, 4)
    assert walked.shape == (1, 8, 8)
    assert walked[0, :, :3].min() > 0.02 and walked[0, :, 5:].max() < 1e-3


def test_the_refiner_cuts_the_walked_cams():
    """The walk fills the lit region of a 4 x 4 patch grid; the fixed cut then marks all of
    it as class 1, and the other half (past the one pixel the upsampling blends) not. The
    tokens come from a runner, or as the served ViT model's output (``maps``)."""
    tokens, _, _ = _two_regions(4, 4)
    inner = FixedThreshold(multi_label=True, threshold=0.02, score_threshold=0.5)
    cams = np.zeros((1, 1, 8, 8), np.float32)
    cams[0, 0, 2:4, 2:4] = 1.0  # one left-half patch
    images, scores = np.zeros((1, 8, 8, 3), np.uint8), np.ones((1, 1), np.float32)
    mask = WalkRefiner(inner, lambda images: tokens[None], beta=8.0, steps=4)(images, scores, cams)
    assert mask.shape == (1, 8, 8) and set(np.unique(mask)) == {0, 1}
    assert mask[0, :, :4].min() == 1 and mask[0, :, 5:].max() == 0
    served = WalkRefiner(inner, None, beta=8.0, steps=4)
    np.testing.assert_array_equal(served(images, scores, cams, maps=tokens[None]), mask)
    with pytest.raises(ValueError, match="patch tokens or its maps"):
        served(images, scores, cams)
    unwalked = FixedThreshold(True, 0.02)(images, scores, cams)
    assert unwalked.sum() == 4


def test_walk_settings_are_checked():
    with pytest.raises(ConfigError, match="walk_side 100: a multiple"):
        load_config(None, ["refine.walk_side=100"])
    with pytest.raises(ConfigError, match="walk_steps >= 1"):
        load_config(None, ["refine.walk_steps=0"])


def test_a_layer_the_vit_lacks_is_refused_by_its_setting():
    from training.attention import bundled_vit_onnx, onnx_with_tokens

    with pytest.raises(ValueError, match="has no node output .*check refine.walk_layer"):
        onnx_with_tokens(bundled_vit_onnx(), 224, 12)  # ViT-S/14 has layers 0-11


def test_the_served_builder_reads_the_walks_settings():
    """build_classical (training's and the served refiner model's one builder) gives the
    walk refine.walk_steps and walk_beta: other settings, another mask."""
    from dataclasses import asdict

    from wsss.config import RefineConfig
    from wsss.served.refiners import build_classical

    tokens = np.tile(np.eye(8, dtype=np.float32)[0], (16, 1))  # one region: all alike
    tokens[:, 1] = np.linspace(0, 1, 16)  # ... less alike the further apart
    cams = np.zeros((1, 1, 4, 4), np.float32)
    cams[0, 0, 0, 0] = 1.0
    args = (np.zeros((1, 4, 4, 3), np.uint8), np.ones((1, 1), np.float32), cams)

    def walked(**changes):
        settings = asdict(RefineConfig(method="walk", threshold=0.05, **changes))
        refiner = build_classical(settings, multi_label=True)
        assert (refiner.steps, refiner.beta) == (settings["walk_steps"], settings["walk_beta"])
        return refiner(*args, maps=tokens[None])

    one = walked(walk_steps=1)
    assert 0 < one.sum() < one.size  # a mask to tell apart
    assert not np.array_equal(one, walked(walk_steps=8))
    assert not np.array_equal(one, walked(walk_steps=1, walk_beta=1.0))


def test_a_vit_whose_patches_are_not_14_px_is_refused_by_its_setting():
    """A ViT with 16 px patches gives 1 + 14 x 14 tokens at 224 px, not 1 + 16 x 16: the
    walk's token runner says which setting chose it, not a reshape error later."""
    from onnx import TensorProto, helper

    from training.walk import ViTTokens

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 224, 224])
    y = helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["b", 197, 3])
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, 3, -1])
    start = helper.make_tensor("start", TensorProto.INT64, [1], [0])
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[16, 16], strides=[16, 16]),
        helper.make_node("Reshape", ["p", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["patches"], perm=[0, 2, 1]),  # [b, 196, 3]
        helper.make_node("Slice", ["patches", "start", "one", "one"], ["cls"]),
        helper.make_node("Concat", ["cls", "patches"], ["tokens"], axis=1),
    ]
    graph = helper.make_graph(nodes, "vit16", [x], [y], [shape, start, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    runner = ViTTokens(model.SerializeToString(), side=224)
    with pytest.raises(ValueError, match="197 tokens at 224 px.*refine.saliency_weights"):
        runner(np.zeros((1, 64, 64, 3), np.uint8))
