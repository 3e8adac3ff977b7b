"""Quality, not ranges: on a small copy of the bundled benchmark, each method must beat its
reference by a margin, so a regression in the data, a model, a refiner or the harness fails.

One pretrained classifier, the segmenter on its pseudo-masks and on the true masks (the
supervised bound) and the level-set study with its ablation, all through the CLI's own
functions, about three and a half minutes on one core. Measured on this setup (96 px, 320
images, 3 epochs): classifier accuracy 0.85 (chance 0.1); pseudo-mask IoU 0.456 for
CAM + Otsu against 0.246 for marking the whole image; segmenter 0.469; supervised bound
0.844; level set (MSE + energy) 0.322 against 0.129 for its untrained initialisation
(0.327, 0.277 energy only, 0.127 untrained in a run of 2026-12-06).
Margins are about half those gaps. ViT attention is held to real photos only
(tests/training/test_attention.py), where it must land on the pet; without the photos that
check skips, and the summary says so.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsss.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from experiments.levelset_study import run_levelset_study
    from experiments.studies import evaluate_profile
    from training import stages
    from training.data.dataset import WSSSDataset
    from training.data.synth import SynthOptions, write_synth

    work = tmp_path_factory.mktemp("quality")
    root = write_synth(work / "data", SynthOptions("pets", 320, 96, seed=1))
    cfg = load_config(
        None,
        [
            f"data.root={root}",
            "data.image_size=96",
            f"runs={work / 'runs'}",
            f"evaluate.out={work / 'study'}",
            "evaluate.figure_images=2",
            "classifier.arch=mobilenet_v2",
            "classifier.pretrained=true",
            "train.epochs=3",
            "train.lr=0.0005",
            "segmenter.base_channels=8",
            "segmenter.depth=3",
            "segmenter.epochs=8",
            "segmenter.lr=0.003",
            "levelset.epochs=3",
            "levelset.hidden=16",
            "evaluate.levelset_backbone_update=false",  # tests/training/levelset/test_pipeline.py's
        ],
    )
    stages.run(cfg, ("classifier", "pseudo", "segmenter", "supervised"))
    evaluate_profile(cfg)
    run_levelset_study(cfg)
    profile = json.loads((work / "runs" / "eval" / "results.json").read_text())["rows"]
    levelset = json.loads((work / "study" / "levelset" / "levelset.json").read_text())["rows"]
    test = WSSSDataset(root, "pets", "test", 96)
    labelled = test.masks != 255
    whole_image = float(((test.masks == 1) & labelled).sum() / labelled.sum())
    return {
        "pseudo": profile[0],
        "segmenter": profile[1],
        "supervised": profile[2],
        "levelset": {r["refiner"]: r for r in levelset},
        "whole_image": whole_image,
    }


def test_pretrained_classifier_beats_chance_by_far(study):
    assert study["pseudo"]["accuracy"] >= 0.6  # 10 classes: chance is 0.1


def test_cam_pseudo_masks_beat_marking_the_whole_image(study):
    assert study["pseudo"]["pseudo_iou"] >= study["whole_image"] + 0.08


def test_supervised_bound_beats_the_weakly_supervised_results(study):
    bound = study["supervised"]["seg_iou"]
    assert bound >= 0.75
    assert bound >= study["pseudo"]["pseudo_iou"] + 0.2
    assert bound >= study["segmenter"]["seg_iou"] + 0.2
    assert study["segmenter"]["of_bound"] == pytest.approx(study["segmenter"]["seg_iou"] / bound)


def test_segmenter_learns_from_the_pseudo_masks(study):
    assert study["segmenter"]["seg_iou"] >= study["whole_image"] + 0.08


def test_trained_level_set_beats_its_untrained_initialisation(study):
    from experiments.levelset_study import UNTRAINED

    rows = study["levelset"]
    assert rows["MSE + energy"]["pseudo_iou"] >= rows[UNTRAINED]["pseudo_iou"] + 0.1
    assert rows["MSE only"]["pseudo_iou"] >= rows[UNTRAINED]["pseudo_iou"] + 0.1
    # Paper 003's Table 2: the energy alone, without the MSE to the seeds' distances, learns
    # less (0.277 against 0.327 here, 0.225 against 0.578 full size in reports/synthetic/).
    assert rows["MSE + energy"]["pseudo_iou"] >= rows["energy only"]["pseudo_iou"] + 0.025


def test_every_refiner_is_timed_and_grabcut_is_the_slow_one(study):
    rows = study["levelset"]
    grabcut = rows["CAM + otsu + GrabCut"]["refine_ms"]
    assert grabcut > 5 * rows["CAM + otsu (no level set)"]["refine_ms"]
    assert all(np.isfinite(r["refine_ms"]) and r["refine_ms"] > 0 for r in rows.values())
