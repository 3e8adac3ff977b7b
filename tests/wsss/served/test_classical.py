"""wsss.served.classical stands in for scikit-image and SciPy in the served repository: it must
give what they give."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from scipy import ndimage
from skimage.color import rgb2gray
from skimage.filters import threshold_otsu
from skimage.segmentation import chan_vese as skimage_chan_vese

from training.torch_refiners import otsu_thresholds
from wsss.served import classical


def _maps(n=40, shape=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random(shape) ** rng.uniform(0.3, 3)).astype(np.float32) for _ in range(n)]


def test_otsu_equals_scikit_image():
    for x in _maps():
        assert classical.otsu_threshold(x) == threshold_otsu(x)
    assert classical.otsu_threshold(np.full((4, 4), 0.3)) == pytest.approx(0.3)
    # Finite maps whose range overflows float32 (a client calling the refiner model with
    # +-3e38) split between their two values, not a 500 from a bin index of -2**63.
    two = np.where(_maps(1)[0] > 0.5, 3e38, -3e38).astype(np.float32)
    cut = classical.otsu_threshold(two)
    assert -3e38 <= cut < 3e38 and ((two > cut) == (two > 0)).all()


def test_otsu_graph_is_scikit_image_within_one_bin():
    maps = _maps(seed=1)
    got = otsu_thresholds(torch.from_numpy(np.stack([m.ravel() for m in maps]))).numpy()
    for g, m in zip(got, maps, strict=True):
        assert abs(g - threshold_otsu(m)) <= (m.max() - m.min()) / 256 + 1e-6


def test_grey_and_chan_vese_equal_scikit_image():
    image = cv2.resize(skimage.data.chelsea(), (96, 96), interpolation=cv2.INTER_AREA)
    grey = classical.grey(image)
    np.testing.assert_array_equal(grey, rgb2gray(image))
    init = np.zeros((96, 96), bool)
    init[20:70, 30:80] = True
    for iterations in (1, 5, 15, 50):
        want = skimage_chan_vese(
            grey, tol=0.0, max_num_iter=iterations, init_level_set=np.where(init, 1.0, -1.0)
        )
        got = classical.chan_vese(grey, init, iterations)
        np.testing.assert_array_equal(got, want)
        assert 0 < got.mean() < 1


def test_largest_component_equals_scipy():
    for seed in range(5):
        mask = np.random.default_rng(seed).random((60, 60)) > 0.55
        labels, count = ndimage.label(mask)
        sizes = ndimage.sum(mask, labels, range(1, count + 1))
        want = labels == 1 + int(np.argmax(sizes))
        np.testing.assert_array_equal(classical.largest_component(mask), want)
