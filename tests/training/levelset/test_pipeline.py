"""The level-set refiner end to end: trained from the classifier, evaluated, exported, served."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serving.server import on_free_ports
from tests.conftest import TINY
from wsss.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def levelset_cfg(trained, tmp_path_factory):
    """The session's tiny pets run, with its classifier and segmenter, refined by level sets."""
    from training import stages

    work = tmp_path_factory.mktemp("levelset")
    for family in ("classifier", "segmenter"):
        shutil.copytree(f"{trained.runs}/{family}", work / "runs" / family)
    cfg = dataclasses.replace(
        trained,
        runs=str(work / "runs"),
        refine=dataclasses.replace(trained.refine, method="levelset"),
        levelset=dataclasses.replace(trained.levelset, epochs=2, hidden=8),
        export=dataclasses.replace(trained.export, repository=str(work / "repo")),
        serve=on_free_ports(trained.serve),
        evaluate=dataclasses.replace(trained.evaluate, out=str(work / "study")),
    )
    stages.run(cfg, ("levelset", "pseudo"))
    return cfg


def test_training_writes_checkpoint_and_pseudo_masks(levelset_cfg):
    from training.loop import load_checkpoint

    runs = Path(levelset_cfg.runs)
    ckpt = load_checkpoint(runs / "levelset" / "best.pt")
    assert ckpt["meta"]["family"] == "levelset" and not ckpt["meta"]["finetune"]
    assert any(k.startswith("head.evolution.layers.3.spectral") for k in ckpt["state_dict"])
    lines = (runs / "levelset" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(np.isfinite(json.loads(x)["val_loss"]) for x in lines)
    masks = np.load(runs / "pseudo" / "train_masks.npz")["masks"]
    assert set(np.unique(masks)) <= {0, 1}  # binary task: background / pet


def test_a_level_set_is_fed_only_the_cams_it_was_trained_on(levelset_cfg):
    """Grad-CAM++'s maps are not CAM's: asked of a level set trained on CAM, the served and
    in-process refiners were built without a word (11% of its mask pixels moved)."""
    from training.pipeline import refine_step
    from wsss.errors import InputError

    assert levelset_cfg.classifier.cam_method == "cam"
    other = dataclasses.replace(
        levelset_cfg,
        classifier=dataclasses.replace(levelset_cfg.classifier, cam_method="gradcam++"),
    )
    with pytest.raises(InputError, match="trained on cam CAMs: --set classifier.cam_method=cam"):
        refine_step(other)
    refine_step(levelset_cfg)  # its own method: built


def ckpt_finetuned(runs: Path) -> bool:
    from training.loop import load_checkpoint

    return load_checkpoint(runs / "levelset" / "best.pt")["meta"]["finetune"]


def test_levelset_study_reports_every_row(levelset_cfg):
    from experiments.levelset_study import (
        ABLATION,
        CHANVESE_ITERATIONS,
        UNTRAINED,
        run_levelset_study,
    )

    # From a profile whose own refiner is fixed + GrabCut (as the quick profile's is): the
    # classical rows and the level sets must not inherit it.
    cfg = dataclasses.replace(
        levelset_cfg,
        levelset=dataclasses.replace(levelset_cfg.levelset, epochs=1),
        refine=dataclasses.replace(levelset_cfg.refine, method="fixed", grabcut=True),
    )
    table = run_levelset_study(cfg)
    out = Path(cfg.evaluate.out) / "levelset"
    rows = json.loads((out / "levelset.json").read_text())["rows"]
    names = [r["refiner"] for r in rows]
    # + the backbone update: its level set and its CAMs with the seed's threshold.
    assert len(names) == 2 + len(CHANVESE_ITERATIONS) + len(ABLATION) + 1 + 2
    assert "CAM + otsu (no level set)" in names and "MSE + energy" in names and UNTRAINED in names
    assert all("pseudo_iou" in r and r["refine_ms"] > 0 for r in rows)
    by = {r["refiner"]: r for r in rows}
    plain, grabcut = by["CAM + otsu (no level set)"], by["CAM + otsu + GrabCut"]
    assert plain["refine_ms"] < grabcut["refine_ms"] / 3  # the seed row ran no GrabCut
    # The updated backbone is another classifier: its scores and CAMs moved in training.
    updated = by["CAM + otsu, updated backbone"]
    assert updated["pseudo_iou"] != plain["pseudo_iou"]
    assert updated["refine_ms"] < grabcut["refine_ms"] / 3
    assert ckpt_finetuned(out / "updated_backbone")
    assert "| level set | MSE + energy |" in table
    assert (out / "levelset.md").exists() and (out / "levelset.png").stat().st_size > 1000


def test_refiner_speed_benchmark_prints_ratios(levelset_cfg):
    from benchmarks.refiner_speed import refiner_speed, speed_table

    result = refiner_speed(levelset_cfg, size=48, images=2, repeat=2)
    rows = {r["refiner"]: r for r in result["rows"]}
    assert rows["FNO evolution (PyTorch)"]["ratio_to_fno"] == 1.0
    assert {"Chan-Vese (50 it.)", "GrabCut (5 it.)", "level-set refiner (ONNX Runtime)"} <= set(
        rows
    )
    assert all(r["ms_per_image"] > 0 for r in rows.values())
    assert "time / FNO evolution" in speed_table(result)


@pytest.mark.triton
def test_served_levelset_pipeline_matches_in_process(levelset_cfg, tmp_path):
    from export.repository import export_repository
    from serving.client import PipelineClient
    from serving.server import TritonServer
    from training.data.dataset import WSSSDataset
    from training.pipeline import pipeline_from_config

    result = export_repository(levelset_cfg)
    assert result.parity["refiner"]["PSEUDO_MASK"] <= 1e-3
    assert "FEATURES" in result.parity["classifier"]
    cfg = levelset_cfg
    data = WSSSDataset(cfg.data.root, "pets", "test", cfg.data.image_size, 10)
    images = data.images[:4]
    want = pipeline_from_config(cfg)(images)
    with TritonServer(Path(cfg.export.repository), cfg.serve, tmp_path) as srv:
        for protocol, url in (("grpc", srv.grpc_url), ("http", srv.http_url)):
            got = PipelineClient(url, protocol).infer(images)
            assert (got["PSEUDO_MASK"] != want["PSEUDO_MASK"]).mean() <= 1e-3
            np.testing.assert_allclose(got["SCORES"], want["SCORES"], atol=1e-4)


def test_multi_class_levelset_trains_and_exports(tmp_path):
    """VOC layout: multi-label classifier, one level set per class, class-index masks."""
    from export.check import check_repository
    from export.repository import export_repository
    from training import stages
    from training.data.synth import SynthOptions, write_synth

    root = write_synth(tmp_path / "voc", SynthOptions("voc", 30, 48, seed=2))
    cfg = load_config(
        None,
        TINY
        + [
            f"data.root={root}",
            "data.task=voc",
            "data.image_size=48",
            f"runs={tmp_path / 'runs'}",
            f"export.repository={tmp_path / 'repo'}",
            "refine.method=levelset",
            "levelset.epochs=1",
            "levelset.hidden=8",
            "levelset.finetune=true",
        ],
    )
    stages.run(cfg)
    masks = np.load(tmp_path / "runs" / "pseudo" / "train_masks.npz")["masks"]
    assert masks.max() <= 10 and masks.dtype == np.uint8
    result = export_repository(cfg)
    assert check_repository(cfg.export.repository).ok
    assert result.parity["refiner"]["PSEUDO_MASK"] <= 1e-3


def test_cli_bench_refiners(levelset_cfg):
    args = [
        "--set",
        f"data.root={levelset_cfg.data.root}",
        "--set",
        f"runs={levelset_cfg.runs}",
        "--set",
        "refine.method=levelset",
        *sum((["--set", o] for o in TINY), []),
    ]
    out = subprocess.run(
        [sys.executable, "-m", "cli", "bench", "--refiners", "--images-count", "1", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "FNO evolution (PyTorch)" in out and "Chan-Vese (15 it.)" in out


def test_folds_cover_the_images_once_and_refuse_nonsense():
    from experiments.levelset_tuning import fold_indices

    folds = fold_indices(10, 3, seed=0)
    assert [len(f) for f in folds] == [4, 3, 3]
    assert sorted(np.concatenate(folds).tolist()) == list(range(10))
    assert [f.tolist() for f in fold_indices(10, 3, seed=0)] == [f.tolist() for f in folds]
    with pytest.raises(ValueError, match="--folds"):
        fold_indices(10, 1, seed=0)


@pytest.mark.slow
def test_cross_validation_scores_each_variant_on_held_out_images(trained, tmp_path):
    from experiments.levelset_tuning import cross_validate

    cfg = dataclasses.replace(
        trained,
        evaluate=dataclasses.replace(trained.evaluate, out=str(tmp_path)),
        levelset=dataclasses.replace(trained.levelset, epochs=1),
    )
    variants = {"paper": [], "lab": ["levelset.colour=lab", "levelset.edge=10"]}
    table = cross_validate(cfg, variants, folds=2)
    report = json.loads((tmp_path / "levelset_cv" / "levelset_cv.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["seed: CAM + otsu", "CAM + otsu + GrabCut", "paper", "lab"]
    assert all(len(r["folds"]) == 2 for r in report["rows"])
    assert report["chosen"] in variants and f"Chosen: **{report['chosen']}**" in table
    # Each variant trained per fold on the other fold only, with its own settings saved.
    saved = tmp_path / "levelset_cv" / "lab" / "fold1" / "levelset" / "config.yaml"
    assert "colour: lab" in saved.read_text()


def test_merge_studies_averages_rows_over_seeds(tmp_path):
    from experiments.levelset_study import merge_studies

    for seed, (seed_iou, ls_iou) in enumerate([(0.50, 0.56), (0.54, 0.58)]):
        rows = [
            {
                "group": "classical",
                "refiner": "CAM + otsu",
                "pseudo_iou": seed_iou,
                "accuracy": 0.9,
            },
            {"group": "level set", "refiner": "MSE + energy", "pseudo_iou": ls_iou},
        ]
        if seed == 0:  # a row only one study has is left out
            rows.append({"group": "level set", "refiner": "MSE only", "pseudo_iou": 0.1})
        folder = tmp_path / f"seed{seed}" / "levelset"
        folder.mkdir(parents=True)
        (folder / "levelset.json").write_text(json.dumps({"rows": rows}))
    table = merge_studies([tmp_path / "seed0", tmp_path / "seed1"], tmp_path / "merged")
    merged = json.loads((tmp_path / "merged" / "levelset_seeds.json").read_text())["rows"]
    assert [r["refiner"] for r in merged] == ["CAM + otsu", "MSE + energy"]
    assert merged[0]["pseudo_iou"]["mean"] == pytest.approx(0.52)
    assert merged[0]["pseudo_iou"]["std"] == pytest.approx(0.02)
    assert "accuracy" not in merged[1]
    assert "| level set | MSE + energy | 0.570 ± 0.010 |" in table
    with pytest.raises(FileNotFoundError, match="seed2"):
        merge_studies([tmp_path / "seed0", tmp_path / "seed2"], tmp_path / "merged")


def test_merge_studies_of_multi_label_rows_gives_each_seeds_gain(tmp_path):
    """Multi-label studies score mIoU, mAP and label F1; each row's gain over the seed row
    is listed per study, so "level set >= its seed + 3 points, on each seed" can be read."""
    from experiments.levelset_study import merge_studies

    seed_row = "CAM + fixed+crf (no level set)"
    for k, (seed_miou, ls_miou) in enumerate([(0.38, 0.40), (0.39, 0.37)]):
        rows = [
            {"group": "classical", "refiner": seed_row, "pseudo_miou": seed_miou, "map": 0.68},
            {"group": "level set", "refiner": "MSE + energy", "pseudo_miou": ls_miou, "map": 0.68},
        ]
        folder = tmp_path / f"seed{k}" / "levelset"
        folder.mkdir(parents=True)
        (folder / "levelset.json").write_text(json.dumps({"rows": rows}))
    table = merge_studies([tmp_path / "seed0", tmp_path / "seed1"], tmp_path / "merged")
    merged = json.loads((tmp_path / "merged" / "levelset_seeds.json").read_text())["rows"]
    assert merged[1]["pseudo_miou"]["mean"] == pytest.approx(0.385)
    assert merged[1]["gain_points"] == [2.0, -2.0] and merged[0]["gain_points"] == [0.0, 0.0]
    assert "| mIoU | mAP | vs seed, points per study |" in table
    assert "| level set | MSE + energy | 0.385 ± 0.015 | 0.680 ± 0.000 | +2.0 / -2.0 |" in table
