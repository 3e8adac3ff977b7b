"""Real Oxford-IIIT Pet photos (the shared subset, or WSSS_PET_DATA): quality by a margin.

A classifier trained for seconds on a few dozen photos, then its pseudo-masks scored on
real test photos against their trimaps: saliency-guided masks must beat CAM + threshold,
which must beat marking the whole image; the FNO level set trained from its CAM + Otsu seeds
must beat those seeds. The full profile (configs/pets_real.yaml) is for
`make reproduce PROFILE=pets_real`, not for tests.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from training import stages
from training.data.dataset import WSSSDataset
from training.data.layouts import list_samples, read_class_names
from training.evaluate import evaluate
from training.pipeline import ClassifierGraph, Pipeline, load_model, refine_step
from training.torch_refiners import build_refiner
from wsss.config import load_config

pytestmark = pytest.mark.realdata


def test_the_shared_subset_reads_as_it_comes(real_pets):
    assert read_class_names(real_pets, "pets") == ["Abyssinian", "american_bulldog", "Bengal"]
    train, test = (list_samples(real_pets, "pets", s) for s in ("train", "test"))
    assert len(train) >= 100 and len(test) >= 50
    assert {s.labels for s in train} == {(0,), (1,), (2,)}


class _Whole:
    """Every pixel of the image is the labelled pet: the floor any source must clear."""

    multi_label, binary, needs_features, served = False, True, False, "python"

    def __call__(self, images, scores, cams, features=None):
        return np.ones(images.shape[:3], np.uint8)


def _few(real_pets, runs, batch_size: int, *more: str):
    """The config of a pretrained MobileNetV2 trained 2 epochs at 128 px, 48 trainval photos
    (every sixth) and 38 test photos (every fourth; all three breeds in both)."""
    cfg = load_config(
        None,
        [
            f"data.root={real_pets}",
            "data.image_size=128",
            "classifier.arch=mobilenet_v2",
            "classifier.pretrained=true",
            "train.epochs=2",
            f"train.batch_size={batch_size}",
            "train.lr=0.001",
            f"runs={runs}",
            *more,
        ],
    )
    train = list_samples(real_pets, "pets", "train")[::6]
    test = list_samples(real_pets, "pets", "test")[::4]
    return (
        cfg,
        WSSSDataset(real_pets, "pets", "train", 128, samples=train),
        WSSSDataset(real_pets, "pets", "test", 128, samples=test),
    )


@pytest.fixture(scope="module")
def few_photos(real_pets, tmp_path_factory):
    """That classifier trained, and the test photos."""
    cfg, train, test = _few(real_pets, tmp_path_factory.mktemp("real") / "runs", 16)
    net = stages.train_classifier(cfg, train)
    return cfg, ClassifierGraph(net, multi_label=False).eval(), test


@pytest.mark.slow
def test_saliency_beats_cam_which_beats_the_whole_image(few_photos):
    cfg, classifier, test = few_photos
    refine = cfg.refine
    pipes = {
        "whole": Pipeline(classifier, None, _Whole()),
        "cam": Pipeline(classifier, None, build_refiner(refine, False)),  # CAM + Otsu
        "saliency": Pipeline(
            classifier,
            None,
            build_refiner(dataclasses.replace(refine, method="saliency"), False),
        ),
    }
    rows = {name: r.row() for name, r in evaluate(pipes, test, 16).items()}
    whole, cam, saliency = (rows[n]["pseudo_iou"] for n in ("whole", "cam", "saliency"))
    assert cam > whole + 0.1, rows
    assert saliency > cam + 0.15, rows
    assert rows["cam"]["accuracy"] >= 0.75, rows  # 2 epochs on 48 photos, 3 breeds


@pytest.mark.slow
def test_trained_level_set_beats_its_cam_seed(real_pets, tmp_path):
    """Paper 003's refiner on real photos: trained on 48 trainval photos at 128 px from its
    classifier's CAM + Otsu masks (the paper's energy, frozen backbone), its pseudo-masks
    beat those seeds on 38 test photos. Measured with these settings over training seeds 0,
    1, 2: +6.4, +5.0, +2.9 IoU points (reports/levelset_real/README.md)."""
    more = ("levelset.epochs=24", "levelset.lr=0.003")
    cfg, data, test = _few(real_pets, tmp_path / "runs", 8, *more)
    stages.train_classifier(cfg, data)
    net, cmeta = load_model(tmp_path / "runs" / "classifier" / "best.pt")
    levelset = dataclasses.replace(cfg, refine=cfg.refine.only("levelset"))
    stages.train_levelset(levelset, data, net, cmeta)
    pipes = {}
    for name, c in (("seed", dataclasses.replace(cfg, refine=cfg.refine.only("otsu"))),
                    ("levelset", levelset)):  # fmt: skip
        classifier, refiner, _ = refine_step(c)
        pipes[name] = Pipeline(classifier, None, refiner)
    scored = evaluate(pipes, test, 16)
    rows = {name: r.row() for name, r in scored.items()}
    assert rows["levelset"]["pseudo_iou"] > rows["seed"]["pseudo_iou"] + 0.015, rows
    assert rows["levelset"]["pseudo_image_iou"] > rows["seed"]["pseudo_image_iou"], rows
