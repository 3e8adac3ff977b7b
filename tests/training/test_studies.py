"""`wsss study cams`: the full grid in one harness pass, with figures and the bound."""

import dataclasses
import json
import shutil

import pytest

from experiments.studies import _supervision, cam_study, trained_levelset_seed
from wsss.config import EvaluateConfig, load_config, save_config
from wsss.errors import InputError
from wsss.served.registry import LABELS_ONLY, MORE_THAN_LABELS

pytestmark = pytest.mark.slow


def test_study_scores_every_combination(trained, tmp_path, capsys):
    second = tmp_path / "second"
    shutil.copytree(f"{trained.runs}/classifier", second / "classifier")
    refiners = ["fixed", "otsu", "fixed+grabcut", "otsu+chanvese", "levelset", "vit"]
    cfg = dataclasses.replace(
        trained,
        evaluate=EvaluateConfig(
            runs=[trained.runs, str(second)],
            refiners=refiners,
            figure_images=2,
            out=str(tmp_path / "out"),
        ),
    )
    (tmp_path / "out" / "figures").mkdir(parents=True)
    (tmp_path / "out" / "figures" / "resnet50_cam.png").write_bytes(b"an earlier study's")
    table = cam_study(cfg)
    assert "no trained level set in" in capsys.readouterr().err  # its row left out, said
    assert not (tmp_path / "out" / "figures" / "resnet50_cam.png").exists()
    rows = json.loads((tmp_path / "out" / "study.json").read_text())["rows"]
    # runs x CAM methods x refiners (no run has a level set: that row is skipped), and one
    # row for the ViT's attention, which reads no CAM: the one marked as more than labels.
    (vit,) = [r for r in rows if r["CAM"] == "-"]
    rows.remove(vit)
    assert vit["supervision"] == MORE_THAN_LABELS
    assert len(rows) == 2 * 3 * 4
    keys = {(r["CAM"], r["refiner"]) for r in rows}
    assert len(keys) == 3 * 4
    assert all(r["refine_ms"] > 0 and "accuracy" in r for r in rows)
    assert {r["supervision"] for r in rows} == {"image labels"}
    by = {(r["CAM"], r["refiner"]): r for r in rows[:12]}
    # CAM and Grad-CAM coincide for a GAP + linear head: same masks, same scores.
    assert by["cam", "otsu"]["pseudo_iou"] == pytest.approx(by["gradcam", "otsu"]["pseudo_iou"])
    assert table.count("\n| resnet18 |") == 12 and table.count(f"\n| resnet18 [{second}] |") == 12
    for method in ("cam", "gradcam", "gradcam++"):
        assert (tmp_path / "out" / "figures" / f"resnet18_{method}.png").stat().st_size > 1000


def test_a_level_set_is_marked_as_its_seed():
    """The level set learns its initial level sets from its seed's masks: a level set seeded
    by saliency or the walk uses more than the image labels, and its rows say so."""
    assert _supervision("levelset", "saliency") == MORE_THAN_LABELS
    assert _supervision("levelset", "walk+crf") == MORE_THAN_LABELS
    assert _supervision("levelset", "fixed+crf") == LABELS_ONLY
    assert _supervision("saliency+grabcut") == MORE_THAN_LABELS


def test_a_level_set_is_marked_by_the_seed_it_was_trained_from(tmp_path):
    """wsss evaluate marks a run's level set by its saved config's seed, not by what the
    config asks now."""
    assert trained_levelset_seed(tmp_path, "otsu") == "otsu"  # no level set trained
    (tmp_path / "levelset").mkdir()
    save_config(load_config(None, ["levelset.seed=walk"]), tmp_path / "levelset" / "config.yaml")
    assert trained_levelset_seed(tmp_path, "otsu") == "walk"


def test_a_study_of_refiners_that_read_no_cam_draws_no_cam_figure(trained, tmp_path):
    """Only the ViT's attention (no CAM read): one row, and no CAM figure to draw."""
    cfg = dataclasses.replace(
        trained,
        evaluate=EvaluateConfig(refiners=["vit"], figure_images=2, out=str(tmp_path / "out")),
    )
    cam_study(cfg)
    rows = json.loads((tmp_path / "out" / "study.json").read_text())["rows"]
    marks = [r["supervision"] for r in rows if r["supervision"] != "true masks"]
    assert marks == [MORE_THAN_LABELS]  # the attention row (and a bound, where trained)
    assert not (tmp_path / "out" / "figures").exists()


def test_a_classifier_row_names_its_learned_classes_and_its_tiles(tmp_path):
    from experiments.studies import classifier_label

    meta = {"arch": "efficientnet_lite0", "class_names": ["cat", "person"]}
    meta["kwargs"] = {"class_groups": [[281], []]}
    assert classifier_label(tmp_path, meta) == "efficientnet_lite0 + person learned"
    meta["kwargs"]["tiles"] = 0.6
    assert classifier_label(tmp_path, meta) == "efficientnet_lite0 + person learned + tiles 0.6"
    meta["kwargs"] = {"tiles": 0.0}  # off, and a task head: the arch alone
    assert classifier_label(tmp_path, meta) == "efficientnet_lite0"


def test_a_study_with_no_row_to_score_is_refused(trained, tmp_path):
    """Only the level set asked for, and none trained: refused, not an empty table."""
    out = tmp_path / "out"
    cfg = dataclasses.replace(
        trained, evaluate=EvaluateConfig(refiners=["levelset"], figure_images=0, out=str(out))
    )
    with pytest.raises(InputError, match="nothing to score"):
        cam_study(cfg)
    assert not out.exists()


def test_a_sweep_scores_each_refiner_at_each_value(trained, tmp_path):
    """evaluate.sweep: each refiner row again at each value of a refine setting, labelled
    with it, each scored as that setting scores alone (how a profile's threshold and CRF
    weights are chosen on its training photos)."""
    base = dataclasses.replace(trained.refine, threshold=0.5)
    plain = dataclasses.replace(
        trained,
        refine=base,
        evaluate=EvaluateConfig(
            refiners=["fixed"], cam_methods=["cam"], figure_images=0, out=str(tmp_path / "a")
        ),
    )
    cam_study(plain)
    rows = json.loads((tmp_path / "a" / "study.json").read_text())["rows"]
    (alone,) = [r for r in rows if r["CAM"] == "cam"]
    swept = dataclasses.replace(
        plain,
        evaluate=dataclasses.replace(
            plain.evaluate, sweep={"threshold": [0.2, 0.5, 0.8]}, out=str(tmp_path / "b")
        ),
    )
    table = cam_study(swept)
    rows = json.loads((tmp_path / "b" / "study.json").read_text())["rows"]
    by = {r["refiner"]: r for r in rows if r["CAM"] == "cam"}
    assert list(by) == [f"fixed (threshold {t})" for t in (0.2, 0.5, 0.8)]
    assert by["fixed (threshold 0.5)"]["pseudo_iou"] == pytest.approx(alone["pseudo_iou"])
    assert len({r["pseudo_iou"] for r in by.values()}) == 3  # each value its own masks
    assert "| fixed (threshold 0.8) |" in table


def test_a_sweep_names_numeric_refine_settings_only():
    from experiments.studies import swept

    refine = load_config(None).refine
    with pytest.raises(InputError, match="treshold is not a refine setting of one.*threshold"):
        swept(refine, {"treshold": [0.3]})
    with pytest.raises(InputError, match="crf is not a refine setting of one number"):
        swept(refine, {"crf": [1]})
    with pytest.raises(InputError, match="names a value twice"):
        swept(refine, {"threshold": [0.3, 0.3]})
    with pytest.raises(InputError, match="crf_iterations: .*whole numbers only"):
        swept(refine, {"crf_iterations": [3.2, 3.7]})
    with pytest.raises(InputError, match=r"evaluate.sweep \(threshold 2\): threshold 2.0"):
        swept(refine, {"threshold": [2]})
    grid = swept(refine, {"threshold": [0.2, 0.3], "crf_iterations": [3, 5]})
    assert [said for _, said in grid] == [
        "threshold 0.2, crf_iterations 3",
        "threshold 0.2, crf_iterations 5",
        "threshold 0.3, crf_iterations 3",
        "threshold 0.3, crf_iterations 5",
    ]
    assert isinstance(grid[0][0].crf_iterations, int)
