import numpy as np
import pytest

from training.metrics import ConfusionMatrix


def test_binary_iou_dice_ignore():
    gt = np.array([[1, 1, 0, 255]], np.uint8)
    pred = np.array([[1, 0, 0, 1]], np.uint8)
    cm = ConfusionMatrix(2)
    cm.update(pred, gt)
    s = cm.summary(binary=True)
    assert s["iou"] == pytest.approx(1 / 2) and s["dice"] == pytest.approx(2 / 3)


def test_miou_counts_background_and_skips_absent_classes():
    gt = np.array([0, 0, 1, 1], np.uint8)
    cm = ConfusionMatrix(3)
    cm.update(gt.copy(), gt)
    assert cm.summary(binary=False)["miou"] == 1.0


def test_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="out of range"):
        ConfusionMatrix(2).update(np.array([3]), np.array([1]))
