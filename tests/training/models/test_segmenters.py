"""The segmenters through the one training stage: built, trained, rebuilt, evaluated."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_deeplabv3_trains_and_rebuilds_from_its_checkpoint(trained, tmp_path):
    from experiments.studies import evaluate_profile
    from training import stages
    from training.pipeline import load_model

    runs = tmp_path / "runs"
    for stage in ("classifier", "pseudo"):
        shutil.copytree(Path(trained.runs) / stage, runs / stage)
    seg = dataclasses.replace(
        trained.segmenter,
        arch="deeplabv3",
        backbone="mobilenet_v2",
        pretrained=True,
        loss="bce",
        dice=0.5,
        epochs=1,
    )
    cfg = dataclasses.replace(trained, runs=str(runs), segmenter=seg)
    stages.run(cfg, ("segmenter",))
    net, meta = load_model(runs / "segmenter" / "best.pt")
    # Rebuilt from the checkpoint alone: no ImageNet weights asked for again.
    assert meta["arch"] == "deeplabv3" and "pretrained" not in meta["kwargs"]
    assert meta["kwargs"]["backbone"] == "mobilenet_v2" and meta["targets"] == "pseudo-masks"
    table = evaluate_profile(cfg)
    assert "| segmenter (deeplabv3 mobilenet_v2, trained on the pseudo-masks) |" in table
