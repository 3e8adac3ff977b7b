import numpy as np
import pytest

from training.refine import (
    FixedThreshold,
    OtsuThreshold,
    build_refiner,
    present_classes,
    refine_batch,
)


def _blob_cam(h=32, w=32, cy=16, cx=16, r=8):
    yy, xx = np.mgrid[:h, :w]
    return np.clip(1 - np.hypot(yy - cy, xx - cx) / (2 * r), 0, 1).astype(np.float32)


IMAGE = np.zeros((32, 32, 3), np.uint8)


@pytest.mark.parametrize("refiner", [FixedThreshold(0.5), OtsuThreshold()])
def test_binary_blob(refiner):
    cams = np.stack([np.zeros((32, 32), np.float32), _blob_cam()])
    mask = refiner(IMAGE, cams, [1], binary=True)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert mask[16, 16] == 1 and mask[0, 0] == 0
    assert 50 < mask.sum() < 600


def test_multiclass_overlap_goes_to_the_stronger_cam():
    a, b = _blob_cam(cx=10), _blob_cam(cx=22)
    cams = np.stack([a, b, np.zeros_like(a)])
    mask = FixedThreshold(0.3)(IMAGE, cams, [0, 1], binary=False)
    assert mask[16, 8] == 1 and mask[16, 24] == 2 and mask[0, 0] == 0
    assert set(np.unique(mask)) == {0, 1, 2}


def test_flat_cam_gives_background():
    cams = np.full((2, 16, 16), 0.7, np.float32)
    assert OtsuThreshold()(IMAGE[:16, :16], cams, [0], binary=True).sum() == 0


def test_present_classes():
    s = np.array([0.1, 0.7, 0.6])
    assert present_classes(s, False, 0.5) == [1]
    assert present_classes(s, True, 0.5) == [1, 2]
    assert present_classes(np.array([0.1, 0.2]), True, 0.5) == [1]


def test_refine_batch_and_registry():
    cams = np.stack([np.stack([_blob_cam(), _blob_cam(cx=8)])] * 3)
    masks = refine_batch(
        build_refiner("otsu"), np.stack([IMAGE] * 3), cams, [[0], [1], [0, 1]], binary=True
    )
    assert masks.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="unknown refiner"):
        build_refiner("magic")
    with pytest.raises(ValueError, match="threshold"):
        FixedThreshold(1.5)
