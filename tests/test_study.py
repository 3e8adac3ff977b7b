"""`wsss evaluate --study`: the full grid, scored and timed, with figures."""

import dataclasses
import json

import pytest

from training.study import run_study
from wsss.config import EvaluateConfig

pytestmark = pytest.mark.slow


def test_study_scores_every_combination(trained, tmp_path):
    cfg = dataclasses.replace(
        trained,
        evaluate=EvaluateConfig(
            runs=[trained.runs, trained.runs], figure_images=2, out=str(tmp_path)
        ),
    )
    rows = run_study(cfg)
    assert len(rows) == 2 * 3 * 2 * 2  # runs x CAM methods x thresholds x GrabCut
    keys = {(r["cam"], r["threshold"], r["grabcut"]) for r in rows}
    assert len(keys) == 12
    for r in rows:
        assert 0 <= r["iou"] <= 1 and 0 <= r["dice"] <= 1 and r["refine_ms_per_image"] > 0
    by = {(r["cam"], r["threshold"], r["grabcut"]): r for r in rows[:12]}
    # CAM and Grad-CAM coincide for a GAP + linear head: same masks, same scores.
    assert by["cam", "otsu", False]["iou"] == pytest.approx(
        by["gradcam", "otsu", False]["iou"], abs=0.01
    )
    assert json.loads((tmp_path / "study.json").read_text()) == rows
    table = (tmp_path / "study.md").read_text()
    assert table.count("\n| resnet18 |") == 24
    for method in ("cam", "gradcam", "gradcam++"):
        assert (tmp_path / "figures" / f"resnet18_{method}.png").stat().st_size > 1000
