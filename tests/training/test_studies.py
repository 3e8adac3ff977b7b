"""`wsss study cams`: the full grid in one harness pass, with figures and the bound."""

import dataclasses
import json
import shutil

import pytest

from experiments.studies import cam_study
from wsss.config import EvaluateConfig

pytestmark = pytest.mark.slow


def test_study_scores_every_combination(trained, tmp_path):
    second = tmp_path / "second"
    shutil.copytree(f"{trained.runs}/classifier", second / "classifier")
    refiners = ["fixed", "otsu", "fixed+grabcut", "otsu+chanvese", "levelset"]
    cfg = dataclasses.replace(
        trained,
        evaluate=EvaluateConfig(
            runs=[trained.runs, str(second)],
            refiners=refiners,
            figure_images=2,
            out=str(tmp_path / "out"),
        ),
    )
    table = cam_study(cfg)
    rows = json.loads((tmp_path / "out" / "study.json").read_text())["rows"]
    # runs x CAM methods x refiners (no run has a level set: that row is skipped).
    assert len(rows) == 2 * 3 * 4
    keys = {(r["CAM"], r["refiner"]) for r in rows}
    assert len(keys) == 3 * 4
    assert all(r["refine_ms"] > 0 and "accuracy" in r for r in rows)
    assert {r["supervision"] for r in rows} == {"image labels"}  # no ViT read: none marked
    by = {(r["CAM"], r["refiner"]): r for r in rows[:12]}
    # CAM and Grad-CAM coincide for a GAP + linear head: same masks, same scores.
    assert by["cam", "otsu"]["pseudo_iou"] == pytest.approx(by["gradcam", "otsu"]["pseudo_iou"])
    assert table.count("\n| resnet18 |") == 12 and table.count(f"\n| resnet18 [{second}] |") == 12
    for method in ("cam", "gradcam", "gradcam++"):
        assert (tmp_path / "out" / "figures" / f"resnet18_{method}.png").stat().st_size > 1000
