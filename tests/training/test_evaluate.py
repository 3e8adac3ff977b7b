"""The evaluation harness on hand-made photos and pipelines whose right scores are known."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from training.evaluate import evaluate
from wsss.task import get_task

DATA_CLASSES = ["cat", "dog", "person"]  # the data's; masks hold class + 1


class _Data(SimpleNamespace):
    def __len__(self) -> int:
        return len(self.images)


def _data(truth: list[np.ndarray], labels: list[tuple[int, ...]]):
    """A multi-label test set of 8 x 8 photos with these masks and image labels."""
    return _Data(
        kind=get_task("voc"),
        class_names=DATA_CLASSES,
        num_classes=len(DATA_CLASSES),
        aliases=(),
        samples=[SimpleNamespace(labels=ls) for ls in labels],
        images=np.zeros((len(truth), 8, 8, 3), np.uint8),
        full_mask=lambda i: truth[i],
    )


class _Classifier:
    """Scores fixed per image, in its own class order (an ImageNet head's groups)."""

    def __init__(self, names: list[str], scores: np.ndarray):
        self.class_names, self.scores, self.seen = names, scores, 0

    def __call__(self, images):
        batch = self.scores[self.seen : self.seen + len(images)]
        self.seen += len(images)
        return torch.from_numpy(batch), torch.zeros(len(images), len(self.class_names), 8, 8)


def test_a_pass_through_is_scored_in_the_datas_classes_not_its_classifiers():
    """A pass-through serves its classifier's class numbers (dog first, cat second, no
    person: an ImageNet head's groups in another order): the masks that are the truth,
    renumbered so, score 1.0, not the 0 of reading dog as cat."""
    cat, dog = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    cat[:4], dog[4:] = 1, 2  # data numbering: cat 1, dog 2
    truth = [cat, dog]
    own = {0: 0, 1: 2, 2: 1}  # data value -> the classifier's (dog 1, cat 2)
    served = np.stack([np.vectorize(own.get)(t) for t in truth]).astype(np.uint8)
    source = SimpleNamespace(class_names=["dog", "cat"], classifier=None)
    pipe = SimpleNamespace(
        classifier=None,
        refiner=None,
        segmenter=object(),
        passthrough_source=source,
        segment=lambda images, outputs=None: (None, served[: len(images)]),
    )
    row = evaluate({"served": pipe}, _data(truth, [(0,), (1,)]), batch_size=2)["served"].row()
    assert row["seg_miou"] == pytest.approx(1.0) and row["seg_classes"] == 3


def test_a_photo_of_none_of_the_classifiers_classes_is_a_negative_of_each():
    """mAP and label F1 of a classifier that has no person class: a photo of people alone
    counts against every class it scores high, rather than leaving the scored list, and a
    person it cannot name is a miss in the label F1, as any class it does not say."""
    from training.metrics import average_precision

    labels = [(0,), (1,), (2,), (2,), (0, 2)]  # cat; dog; people; people; cat and person
    scores = np.array(
        [[0.9, 0.1], [0.2, 0.8], [0.95, 0.1], [0.1, 0.1], [0.7, 0.2]], np.float32
    )  # the first people photo looks like a cat to it
    classifier = _Classifier(["cat", "dog"], scores)
    refiner = SimpleNamespace(present=lambda s: [int(c) for c in np.flatnonzero(s >= 0.5)])
    pipe = SimpleNamespace(
        classifier=classifier,
        refiner=refiner,
        segmenter=None,
        passthrough_source=None,
        class_names=classifier.class_names,
        classify=classifier,
        refine=lambda images, outputs, labels: np.zeros((len(images), 8, 8), np.uint8),
    )
    truth = [np.zeros((8, 8), np.uint8)] * len(labels)
    result = evaluate({"p": pipe}, _data(truth, labels), batch_size=2)["p"]
    row = result.row()
    assert len(result.scores) == len(labels)
    held = np.array([[1, 0], [0, 1], [0, 0], [0, 0], [1, 0]], bool)
    assert row["map"] == pytest.approx(average_precision(scores, held))
    assert row["map"] < 0.9  # the cat-like people photo ranks above two cats
    # F1 per photo: 1, 1, 0 (cat said, none there), 0 (person not said), 2/3 (cat said,
    # person not)
    assert row["label_f1"] == pytest.approx((1 + 1 + 0 + 0 + 2 / 3) / 5)


def test_shares_with_misses_merge_into_the_whole():
    """Under torchrun each rank scores a share and rank 0 merges their arrays: the photos
    a classifier cannot name (their misses) come through, whichever share holds them."""
    from training.evaluate import Evaluation

    labels = [(0,), (1,), (2,), (2,), (0, 2)]
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.95, 0.1], [0.1, 0.1], [0.7, 0.2]], np.float32)
    truth = [np.zeros((8, 8), np.uint8)] * len(labels)

    def pipe():
        classifier = _Classifier(["cat", "dog"], scores)
        present = SimpleNamespace(present=lambda s: [int(c) for c in np.flatnonzero(s >= 0.5)])
        return SimpleNamespace(
            classifier=classifier,
            refiner=present,
            segmenter=None,
            passthrough_source=None,
            class_names=classifier.class_names,
            classify=lambda images: classifier(images),
            refine=lambda images, outputs, labels: np.zeros((len(images), 8, 8), np.uint8),
        )

    data = _data(truth, labels)
    whole = evaluate({"p": pipe()}, data, batch_size=5)["p"].row()
    for cut in (2, 5):
        shares = []
        for share in (range(0, cut), range(cut, 5)):
            p = pipe()
            p.classifier.seen = share.start
            shares.append(evaluate({"p": p}, data, 5, share=share)["p"].arrays())
        merged = Evaluation.merged(False, shares).row()
        assert merged.pop("refine_ms") >= 0 and whole["refine_ms"] >= 0
        assert merged == {k: v for k, v in whole.items() if k != "refine_ms"}
