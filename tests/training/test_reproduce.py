"""``wsss reproduce`` end to end on a tiny profile: every row trained, scored and reported,
the supervised bound as the reference, and a rerun that reuses what it trained."""

from __future__ import annotations

import json

import pytest
import yaml

from benchmarks.refiner_speed import table3
from experiments.reproduce import reproduce
from wsss.config import load_profile

pytestmark = pytest.mark.slow


def _profile(tmp_path):
    tiny = ["train.epochs=2", "train.batch_size=16", "levelset.epochs=1", "data.synth_count=60"]
    spec = {
        "out": str(tmp_path / "report"),
        "runs": str(tmp_path / "runs"),
        "segmenters": {
            "unet": [
                "segmenter.arch=unet",
                "segmenter.base_channels=4",
                "segmenter.depth=2",
                "segmenter.epochs=2",
            ],
            "deeplabv3": [
                "segmenter.arch=deeplabv3",
                "segmenter.backbone=mobilenet_v2",
                "segmenter.pretrained=true",
                "segmenter.epochs=1",
            ],
        },  # fmt: skip
        "benchmarks": {
            "pets": {
                "config": "configs/quick.yaml",
                "set": [f"data.root={tmp_path / 'pets'}", "data.image_size=64", *tiny],
                "classifiers": {"mobilenet_v2": ["classifier.arch=mobilenet_v2"]},
                "sources": [
                    "mobilenet_v2/cam/fixed",
                    "mobilenet_v2/cam/fixed+grabcut",
                    "mobilenet_v2/cam/levelset",
                    "truth",
                ],  # fmt: skip
                "ablation": "mobilenet_v2",
            }
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_profile(path)


def test_reproduce_writes_every_row_against_the_bound_and_reuses_models(tmp_path):
    profile = _profile(tmp_path)
    text = reproduce(profile, "tiny", speed=table3)
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    pets = report["benchmarks"]["pets"]
    rows = {(r["spec"], r["segmenter"]): r for r in pets["rows"]}
    assert len(rows) == 4 * 2
    for seg in ("unet", "deeplabv3"):
        assert rows[("truth", seg)]["of_bound"] == pytest.approx(1.0)
        assert rows[("truth", seg)]["seg_iou"] > 0
        fixed = rows[("mobilenet_v2/cam/fixed", seg)]
        # One set of pseudo-masks per source, scored once: both segmenters' rows share it.
        assert fixed["pseudo_iou"] == rows[("mobilenet_v2/cam/fixed", "unet")]["pseudo_iou"]
        assert fixed["train_seconds"] > 0
        bound = rows[("truth", seg)]["seg_iou"]
        assert fixed["of_bound"] == pytest.approx(fixed["seg_iou"] / bound)
    # Paper 003's tables and the papers' orderings, checked on the measured rows.
    ablation = {r["refiner"] for r in pets["ablation"]["rows"]}
    assert {"MSE only", "energy only", "MSE + energy"} <= ablation
    speeds = [r["refiner"] for r in pets["speed"]["rows"]]
    assert any("GrabCut" in n for n in speeds) and any("Chan-Vese" in n for n in speeds)
    claims = {o["claim"] for o in pets["orderings"]}
    assert "DeepLabV3 ahead of UNet on the same pseudo-masks" in claims
    assert "MSE + energy best of the ablation" in claims
    assert pets["best"]["spec"] != "truth"
    assert "## pets" in text and "ground truth (supervised bound)" in text
    assert (tmp_path / "report" / "pets_segmenters.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "pets_examples.jpg").exists()

    # A rerun with the same profile trains nothing again.
    checkpoints = sorted((tmp_path / "runs").rglob("best.pt"))
    stamps = [p.stat().st_mtime_ns for p in checkpoints]
    reproduce(_profile(tmp_path), "tiny")
    assert [p.stat().st_mtime_ns for p in checkpoints] == stamps
    assert sorted((tmp_path / "runs").rglob("best.pt")) == checkpoints


def test_bad_source_is_refused_by_name(tmp_path):
    profile = _profile(tmp_path)
    profile.benchmarks["pets"].sources = ["resnet18/cam/otsu"]
    with pytest.raises(ValueError, match="resnet18/cam/otsu"):
        reproduce(profile, "tiny")


def test_a_level_set_row_is_marked_by_the_seed_it_learned_from(tmp_path):
    """A level set seeded by masks that read the ViT (saliency, the walk) uses more than the
    image labels: its rows say so, as `wsss study cams` marks them; its run's saved config
    decides, else the classifier's config."""
    from experiments.reproduce import Source, _with_levelset_seed
    from wsss.config import load_config, save_config
    from wsss.served.registry import MORE_THAN_LABELS

    classifiers = {"lite": ("classifier.arch=efficientnet_lite0",)}
    source = Source.parse("lite/cam/levelset", classifiers)
    configs = {"lite": load_config(None, [f"runs={tmp_path}", "levelset.seed=fixed+crf"])}
    assert MORE_THAN_LABELS not in _with_levelset_seed(source, configs, {}).label
    (tmp_path / "levelset").mkdir()
    save_config(
        load_config(None, ["levelset.seed=saliency"]), tmp_path / "levelset" / "config.yaml"
    )
    marked = _with_levelset_seed(source, configs, {})
    assert marked.levelset_seed == "saliency" and MORE_THAN_LABELS in marked.label
    other = _with_levelset_seed(source, configs, {"lite": tmp_path / "other"})
    assert MORE_THAN_LABELS not in other.label  # that run has no saved config: fixed+crf
    plain = Source.parse("lite/cam/otsu", classifiers)
    assert _with_levelset_seed(plain, configs, {}) is plain


def test_a_run_is_reused_only_for_the_settings_its_stage_reads(tmp_path, capsys):
    """``stages.reusable``, the one decider that ``train --resume``, reproduce and the
    level-set tuning ask before they train: a stage's own settings (``STAGE_SETTINGS``)
    decide, another stage's or an export's do not; the checkpoint's meta where given."""
    import torch

    from training.stages import reusable
    from wsss.config import load_config, save_config, with_overrides

    cfg = load_config("configs/quick.yaml")
    save_config(cfg, tmp_path / "config.yaml")
    assert reusable(cfg, "classifier", tmp_path) is None  # no checkpoint yet
    torch.save({"state_dict": {}, "meta": {"classes": 3}}, tmp_path / "best.pt")
    assert reusable(cfg, "classifier", tmp_path)["meta"] == {"classes": 3}
    for other in ("segmenter.epochs=99", "export.opset=18", "evaluate.figure_images=1"):
        assert reusable(with_overrides(cfg, [other]), "classifier", tmp_path) is not None
    assert reusable(with_overrides(cfg, ["segmenter.epochs=99"]), "segmenter", tmp_path) is None
    assert reusable(with_overrides(cfg, ["train.epochs=99"]), "classifier", tmp_path) is None
    # a refiner setting is none of the classifier's, but the one its thresholds are
    # chosen under where it chooses them
    assert reusable(with_overrides(cfg, ["refine.min_score=0.3"]), "classifier", tmp_path)
    folds = with_overrides(cfg, ["classifier.threshold_folds=2"])
    save_config(folds, tmp_path / "config.yaml")
    assert reusable(folds, "classifier", tmp_path) is not None
    assert reusable(with_overrides(folds, ["refine.min_score=0.3"]), "classifier", tmp_path) is None
    save_config(cfg, tmp_path / "config.yaml")
    assert "not kept: it was trained with other train.epochs" in capsys.readouterr().out
    assert reusable(cfg, "classifier", tmp_path, {"classes": 3}) is not None
    assert reusable(cfg, "classifier", tmp_path, {"classes": 4}) is None
    assert "other photos, masks or classes" in capsys.readouterr().out
    (tmp_path / "best.pt").write_bytes(b"cut")
    assert reusable(cfg, "classifier", tmp_path) is None
    assert "its files do not read" in capsys.readouterr().out


def test_the_ablation_is_redone_for_any_change_of_the_study_config(tmp_path):
    """The study's rows depend on its evaluate settings too: reproduce reruns it unless
    the whole config is the one it ran with."""
    from experiments.reproduce import ABLATION_LEVELSET, _ablation_done
    from wsss.config import load_config, save_config, with_overrides

    cfg = load_config("configs/quick.yaml")
    assert not _ablation_done(tmp_path, cfg)
    trained = tmp_path / "levelset" / ABLATION_LEVELSET / "levelset"
    trained.mkdir(parents=True)
    (trained / "best.pt").write_bytes(b"")
    save_config(cfg, tmp_path / "levelset" / "config.yaml")
    assert _ablation_done(tmp_path, cfg)
    assert not _ablation_done(tmp_path, with_overrides(cfg, ["evaluate.levelset_ablation=false"]))
