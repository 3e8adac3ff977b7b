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


def test_average_precision_is_scikit_learns_and_ignores_the_order_of_ties():
    """Tied scores are one step of the precision-recall curve: [0.5, 0.5] scored 1.0 with
    the positive listed first and 0.5 with it second."""
    from sklearn.metrics import average_precision_score

    from training.metrics import average_precision

    tied = np.array([[0.5], [0.5]])
    for truth in ([[1], [0]], [[0], [1]]):
        assert average_precision(tied, np.array(truth, bool)) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    for _ in range(50):
        scores = np.round(rng.random((30, 4)), 1)  # many ties
        truth = rng.random((30, 4)) < 0.3
        truth[0] = True  # every class held by some image
        pairs = zip(scores.T, truth.T, strict=True)
        expected = np.mean([average_precision_score(t, s) for s, t in pairs])
        assert average_precision(scores, truth) == pytest.approx(expected, abs=1e-12)
    absent = np.zeros((30, 4), bool)
    absent[:, 0] = truth[:, 0]  # classes no image holds are skipped, not scored 0
    assert average_precision(scores, absent) == pytest.approx(
        average_precision_score(truth[:, 0], scores[:, 0])
    )
