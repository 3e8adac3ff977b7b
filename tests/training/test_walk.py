"""The random walk of refine.method walk (training/walk.py): CAMs spread over the patches
their tokens say are alike, and nowhere else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.walk import WalkRefiner, random_walk
from wsss.config import ConfigError, load_config
from wsss.served.refiners import FixedThreshold


def _two_regions(h: int = 4, w: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens [1, h*w, 8]: the left half one direction, the right half an orthogonal one
    (a little noise on each); a CAM [1, 1, h, w] lit at one left-half patch; the left half."""
    gen = torch.Generator().manual_seed(0)
    left = torch.zeros(h, w, dtype=torch.bool)
    left[:, : w // 2] = True
    tokens = torch.where(left[..., None], torch.eye(8)[0], torch.eye(8)[1])
    tokens = tokens + 0.05 * torch.rand(h, w, 8, generator=gen)
    cam = torch.zeros(1, 1, h, w)
    cam[0, 0, 1, 1] = 1.0
    return tokens.reshape(1, h * w, 8), cam, left


def test_a_cam_spreads_over_its_own_region_only():
    tokens, cam, left = _two_regions()
    walked = random_walk(cam, tokens, beta=8.0, steps=4)[0, 0]
    assert walked[left].min() > 0.01  # every patch alike to the lit one got some
    assert walked[~left].max() < 1e-4  # the orthogonal half none
    assert walked.max() < cam.max()  # spread, not amplified


def test_a_constant_map_stays_constant():
    tokens, _, _ = _two_regions()
    flat = torch.full((1, 2, 4, 6), 0.3)
    torch.testing.assert_close(random_walk(flat, tokens, 8.0, 3), flat)


def test_tokens_must_fit_the_grid():
    tokens, cam, _ = _two_regions()
    with pytest.raises(ValueError, match="do not fit"):
        random_walk(cam, tokens[:, :-1], 8.0, 2)


def test_the_refiner_cuts_the_walked_cams():
    """The walk fills the lit region of a 4 x 4 patch grid; the fixed cut then marks all of
    it as class 1, and the other half (past the one pixel the upsampling blends) not."""
    tokens, _, _ = _two_regions(4, 4)

    class Tokens:
        grid = 4

        def __call__(self, images):
            return tokens

    inner = FixedThreshold(multi_label=True, threshold=0.02, score_threshold=0.5)
    refiner = WalkRefiner(inner, Tokens(), beta=8.0, steps=4)
    cams = np.zeros((1, 1, 8, 8), np.float32)
    cams[0, 0, 2:4, 2:4] = 1.0  # one left-half patch
    mask = refiner(np.zeros((1, 8, 8, 3), np.uint8), np.ones((1, 1), np.float32), cams)
    assert mask.shape == (1, 8, 8) and set(np.unique(mask)) == {0, 1}
    assert mask[0, :, :4].min() == 1 and mask[0, :, 5:].max() == 0
    unwalked = FixedThreshold(True, 0.02)(np.zeros((1, 8, 8, 3), np.uint8), np.ones((1, 1)), cams)
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
