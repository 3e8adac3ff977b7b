"""Labels, class numbering and presence: the small pieces every stage and study relies on."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from training.metrics import average_precision
from training.pipeline import Pipeline, mask_values, translate_labels
from training.torch_refiners import OtsuThreshold, present_classes

DATA = ["bear", "cat", "dog", "person"]


def test_translate_labels_matches_by_name_and_keeps_what_it_can():
    same = translate_labels([(0,), (1, 2), ()], DATA, DATA)
    assert same == [(0,), (1, 2), ()]
    groups = ["dog", "cat"]  # an ImageNet head's groups: no bear, no person
    got = translate_labels([(1,), (2, 3), (0,), (3,), ()], DATA, groups)
    # cat -> 1; dog kept, person dropped; bear or person alone -> None (predictions decide);
    # no label at all stays empty (an empty mask).
    assert got == [(1,), (0,), None, None, ()]
    assert translate_labels([(0,)], DATA, None) == [(0,)]


def test_a_classifier_of_none_of_the_datas_classes_is_refused():
    """A run trained on pets scored on VOC photos: every label dropped, every mask the
    predictions', scored as the data's classes (mAP nan, a table, exit 0)."""
    from wsss.errors import InputError

    pets = ["Abyssinian", "american_bulldog", "Bengal"]
    with pytest.raises(InputError, match=r"classes \(Abyssinian, .*\) include none of the data's"):
        translate_labels([(0,), (3,)], DATA, pets)
    # a data class known by another name (a breed by its species) is one in common
    assert translate_labels([(0,)], pets, ["cat", "dog"], ["cat", "dog", "cat"]) == [(0,)]


def test_mask_values_renumber_into_the_data_classes():
    table = mask_values(DATA, ["dog", "cat", "fox"])
    mask = np.array([[0, 1, 2, 3, 255]], np.uint8)
    # dog (1) -> 3, cat (2) -> 2, fox (3, not in the data) -> background, 255 stays.
    assert table[mask].tolist() == [[0, 3, 2, 0, 255]]
    assert mask_values(DATA, DATA) is None
    with pytest.raises(ValueError, match="uint8"):
        mask_values(DATA, [str(i) for i in range(1000)])


def _blob():
    yy, xx = np.mgrid[:32, :32]
    return np.clip(1 - np.hypot(yy - 16, xx - 16) / 16, 0, 1).astype(np.float32)


def test_an_image_labelled_with_no_class_gets_an_empty_mask():
    cams = torch.from_numpy(np.stack([np.stack([_blob(), _blob()])] * 2))
    outputs = (torch.tensor([[0.2, 0.8], [0.2, 0.8]]), cams)
    images = np.zeros((2, 32, 32, 3), np.uint8)
    for multi in (False, True):
        pipe = Pipeline(None, None, OtsuThreshold(multi))
        masks = pipe.refine(images, outputs, [(), (1,)])
        assert not masks[0].any() and masks[1].any()


def test_present_classes_mask_is_the_graph_form_of_present_classes():
    from training.torch_refiners import present_classes_mask

    rng = np.random.default_rng(0)
    scores = rng.random((200, 5)).astype(np.float32) ** 3
    scores[:20] = 0.0  # ties at zero: nothing should win below min_score, else the first
    scores[20:40, 1:3] = 0.45  # ties at the top below the threshold: the first of them
    for multi in (False, True):
        for min_score in (0.0, 0.3):
            graph = present_classes_mask(torch.from_numpy(scores), multi, 0.5, min_score).numpy()
            for row, s in zip(graph, scores, strict=True):
                want = present_classes(s, multi, 0.5, min_score)
                assert sorted(np.flatnonzero(row).tolist()) == want
    # A two-class photo scored 0.5 / 0.5 takes one class in both forms, not both.
    tie = np.array([[0.5, 0.5]], np.float32)
    assert present_classes(tie[0], False, 0.5) == [0]
    assert present_classes_mask(torch.from_numpy(tie), False, 0.5).tolist() == [[True, False]]


def test_per_class_thresholds_in_both_forms():
    """One threshold per class: the numpy and graph forms agree, and each class is cut at
    its own threshold (a class that no other threshold would keep is kept)."""
    from training.torch_refiners import present_classes_mask

    rng = np.random.default_rng(1)
    scores = rng.random((100, 4)).astype(np.float32)
    cuts = [0.9, 0.2, 0.5, 0.99]
    graph = present_classes_mask(torch.from_numpy(scores), True, cuts).numpy()
    for row, s in zip(graph, scores, strict=True):
        want = present_classes(s, True, cuts)
        assert sorted(np.flatnonzero(row).tolist()) == want
    assert present_classes(np.array([0.3, 0.25, 0.1, 0.1]), True, cuts) == [1]
    assert present_classes(np.array([0.95, 0.25, 0.6, 0.1]), True, cuts) == [0, 1, 2]


def test_label_thresholds_beat_any_flat_threshold_on_mixed_scales():
    """Two classes on different scales (a softmax mass, a sigmoid): per-class thresholds
    find both, where any one threshold misses one of them."""
    from training.metrics import label_f1
    from training.stages import label_thresholds

    rng = np.random.default_rng(0)
    truth = rng.random((200, 2)) < 0.5
    scores = np.where(truth, 0.6, 0.4) + rng.normal(0, 0.05, truth.shape)
    scores[:, 0] *= 0.05  # small masses: present at ~0.03, absent at ~0.02
    cuts = label_thresholds(scores, truth)
    assert 0.02 < cuts[0] < 0.03 and 0.45 < cuts[1] < 0.55

    def f1(t):
        predicted = np.zeros_like(truth)
        for row, s in zip(predicted, scores, strict=True):
            row[present_classes(s, True, t)] = True
        return label_f1(predicted, truth)

    assert f1(cuts) > max(f1(t) for t in np.linspace(0, 1, 101)) + 0.1


def test_label_thresholds_are_chosen_under_the_refiners_min_score():
    """The cuts are chosen for the rule they are served under: with ``refine.min_score``
    no class is present where even the top score is below it, in the tuning objective as
    in ``wsss evaluate`` (the objective ignored it: cuts tuned for one rule, scored on
    another)."""
    from training.metrics import label_f1
    from training.stages import _label_f1, label_thresholds

    # Found by a search over small cases: photo 3 (truth: class 1) scores 0.25 at its
    # top, below min_score (0.5), so served it holds nothing whatever the cuts; blind to
    # that, the cuts are chosen low to take it, and take class 1 on photos 1 and 5 too.
    scores = np.array(
        [[0.15, 0.7], [0.55, 0.55], [0.85, 0.75], [0.25, 0.25], [0.3, 0.95], [0.95, 0.5]],
        np.float32,
    )
    truth = np.array([[0, 1], [1, 0], [0, 1], [0, 1], [1, 0], [1, 0]], bool)

    def f1(cuts, min_score):  # as evaluate scores it: the served refiner's rule
        predicted = np.zeros_like(truth)
        for row, s in zip(predicted, scores, strict=True):
            row[present_classes(s, True, cuts, min_score)] = True
        return label_f1(predicted, truth)

    plain, under = label_thresholds(scores, truth), label_thresholds(scores, truth, min_score=0.5)
    assert _label_f1(scores, under, truth, None, 0.5) == pytest.approx(f1(under, 0.5))
    assert f1(under, 0.5) > f1(plain, 0.5) + 0.1, (f1(under, 0.5), f1(plain, 0.5))


def test_a_class_never_worth_predicting_still_passes_on_its_labels():
    """Class 2's highest scores are saturated false positives, so cross-validation keeps it
    from ever being predicted: its cut stays at most 1, and a photo labelled with it (its
    labels refined as scores of 1) still gets its mask. A cut of 1 + 1e-6 dropped it."""
    from training.pipeline import resolved_refine
    from training.stages import label_thresholds
    from wsss.config import load_config

    scores = np.array(
        [
            [0.99, 0.10, 0.9999995],
            [0.95, 0.20, 0.9999993],
            [0.10, 0.97, 0.30],
            [0.20, 0.96, 0.20],
            [0.10, 0.20, 0.95],
            [0.15, 0.10, 0.90],
            [0.90, 0.85, 0.10],
            [0.10, 0.10, 0.80],
        ],
        np.float32,
    )
    truth = np.zeros_like(scores, bool)
    for row, ls in zip(truth, [[0], [0], [1], [1], [2], [2], [0, 1], [2]], strict=True):
        row[ls] = True
    cuts = label_thresholds(scores, truth)
    assert cuts.max() <= 1.0 and cuts[2] > 0.99
    assert present_classes(np.array([1.0, 0.0, 1.0]), True, cuts) == [0, 2]
    # A checkpoint from before keeps working: its cuts are read at most 1.
    cfg = load_config(None, ["classifier.threshold_folds=3"])
    refine = resolved_refine(cfg, {"score_thresholds": [0.4, 0.4, 1.0000005]})
    assert present_classes(np.array([1.0, 0.0, 1.0]), True, refine.score_threshold) == [0, 2]


def test_pseudo_mask_shares_count_the_class_pixels_and_the_empty_masks():
    """What the pseudo stage says of its masks: a tiny training's masks were all empty and
    nothing said so before the segmenter trained on them."""
    from training.stages import _mask_shares

    masks = np.zeros((4, 2, 2), np.uint8)
    masks[0, 0] = 3  # half of one mask a class's
    masks[1] = 255  # all ignored (a photo the refiner left out): not an empty mask
    masks[2, 0, 0] = 255
    expected = {"foreground": round(2 / 11, 4), "empty": 2}
    assert _mask_shares(masks) == expected and _mask_shares(masks, chunk=3) == expected
    assert _mask_shares(np.zeros((0, 2, 2), np.uint8)) == {"foreground": 0.0, "empty": 0}


def test_label_f1_and_the_class_counts():
    from training.metrics import ConfusionMatrix, label_f1

    predicted = np.array([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0]], bool)
    truth = np.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]], bool)
    assert label_f1(predicted, truth) == pytest.approx((2 / 3 + 1 + 0) / 3)
    cm = ConfusionMatrix(4)
    cm.update(np.array([0, 1, 1, 0], np.uint8), np.array([0, 1, 2, 255], np.uint8))
    summary = cm.summary(binary=False)
    assert summary["classes"] == 3  # background, 1 and 2; class 3 is nowhere
    assert cm.per_class()[3] is None and cm.per_class()[2] == 0.0


def test_average_precision():
    truth = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], bool)
    perfect = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.1]])
    assert average_precision(perfect, truth) == pytest.approx(1.0)
    # Class 0 ranked: neg, pos, pos -> precisions 1/2, 2/3 -> AP 7/12; class 1 perfect.
    worse = np.array([[0.5, 0.1], [0.4, 0.2], [0.1, 0.9], [0.9, 0.1]])
    assert average_precision(worse, truth) == pytest.approx((7 / 12 + 1) / 2)


def test_segmentation_loss_ignores_unlabelled_pixels_and_empty_batches():
    import torch.nn.functional as F

    from training.stages import SegmentationLoss

    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0] = 255
    torch.testing.assert_close(
        SegmentationLoss()(logits, target), F.cross_entropy(logits, target, ignore_index=255)
    )
    empty = SegmentationLoss()(logits, torch.full((2, 4, 4), 255))
    assert empty.item() == 0.0
    empty.backward()  # no NaN: the batch simply teaches nothing
    assert torch.isfinite(logits.grad).all()


def test_imagenet_head_without_groups_is_refused_for_class_index_masks():
    from training.stages import classifier_setup
    from wsss.config import load_config

    cfg = load_config(None, ["data.task=voc", "classifier.head=imagenet"])
    with pytest.raises(ValueError, match="class_groups"):
        classifier_setup(cfg, DATA)
    pets = load_config(None, ["data.task=pets", "classifier.head=imagenet"])
    assert classifier_setup(pets, DATA)[0]["num_classes"] == 1000
    # presence from corner tiles: which classes a photo holds, a multi-label question
    with pytest.raises(ValueError, match="classifier.tiles"):
        classifier_setup(load_config(None, ["data.task=pets", "classifier.tiles=0.6"]), DATA)
    with pytest.raises(ValueError, match="classifier.tiles"):  # a task head: whole images
        classifier_setup(load_config(None, ["data.task=voc", "classifier.tiles=0.6"]), DATA)
    groups = "classifier.class_groups={a: [1], b: [2]}"
    voc = load_config(
        None, ["data.task=voc", "classifier.head=imagenet", groups, "classifier.tiles=0.6"]
    )
    assert classifier_setup(voc, DATA)[0]["tiles"] == 0.6


def test_unknown_cam_methods_are_clear_errors():
    from training.models import build_classifier
    from training.pipeline import ClassifierGraph
    from wsss.config import ConfigError, load_config

    net = build_classifier("resnet18", num_classes=2)
    with pytest.raises(ValueError, match=re.escape("unknown CAM method 'gradcam+'")):
        ClassifierGraph(net, False, cam_method="gradcam+")
    with pytest.raises(ConfigError, match="cam_methods"):
        load_config(None, ["evaluate.cam_methods=[cam, scorecam]"])


def test_study_refiner_specs():
    from experiments.studies import parse_refiner
    from wsss.config import RefineConfig

    base = RefineConfig("fixed", grabcut=True)
    assert parse_refiner("otsu", base) == RefineConfig("otsu")
    assert parse_refiner("fixed+chanvese", base).chanvese
    for bad in ("levelset+grabcut", "otsu+magic", "magic"):
        with pytest.raises(ValueError, match="evaluate.refiners"):
            parse_refiner(bad, base)


def test_bundled_data_is_rewritten_only_when_its_options_change(tmp_path):
    from training.data.synth import SynthOptions, ensure_synth

    root = tmp_path / "pets"
    assert ensure_synth(root, SynthOptions("pets", 10, 32))
    assert not ensure_synth(root, SynthOptions("pets", 10, 32))
    assert ensure_synth(root, SynthOptions("pets", 10, 48))  # an older size: rewritten
    assert len(list((root / "images").glob("*.jpg"))) == 10
    own = tmp_path / "mine"  # someone's own data: no record, never touched
    own.mkdir()
    (own / "keep.txt").write_text("x")
    assert not ensure_synth(own, SynthOptions("pets", 10, 32))
    assert (own / "keep.txt").exists() and not (own / "images").exists()


def test_python_versions_without_their_own_helpers_are_not_served(tmp_path):
    """Versions exported before the served code was copied beside model.py import the
    project, which may have changed: only self-contained versions stay servable, each
    judged by its own code (one exported before a helper existed still serves)."""
    from export.repository import servable_versions

    files = {
        1: {"model.py": "from wsss.served.classical import build_classical\n"},
        # before wsss/served/refiners.py existed: its own three helpers
        2: {
            "model.py": "from .classical import build_classical\nfrom .respond import respond\n",
            "classical.py": "import numpy as np\n",
            "respond.py": "",
        },
        3: {  # the refiners module it imports is missing
            "model.py": "from .refiners import build_classical\n",
            "classical.py": "",
        },
        4: {  # refiners.py imports classical.py, which is missing
            "model.py": "from .refiners import build_classical\n",
            "refiners.py": "from .classical import grabcut\n",
        },
    }
    for version, contents in files.items():
        folder = tmp_path / "refiner" / str(version)
        folder.mkdir(parents=True)
        for name, text in contents.items():
            (folder / name).write_text(text)
    assert servable_versions(tmp_path, "refiner", "python", 5, keep=5) == [2, 5]


def test_efficientnet_weights_with_another_head(tmp_path):
    from training.models import build_classifier

    donor = build_classifier("efficientnet_lite0", num_classes=7)
    state = {f"features.{k}": v for k, v in donor.features.state_dict().items()}
    # A fine-tuned 7-class checkpoint in timm's names: its head is not the 3-class task's.
    timm_state = {}
    names = ["conv_stem", "bn1", "blocks", "conv_head", "bn2"]
    for key, value in state.items():
        _, index, rest = key.split(".", 2)
        timm_state[f"{names[int(index)]}.{rest}"] = value
    timm_state |= {"classifier.weight": torch.zeros(7, 1280), "classifier.bias": torch.zeros(7)}
    path = tmp_path / "lite0.pt"
    torch.save(timm_state, path)
    net = build_classifier("efficientnet_lite0", num_classes=3, weights=str(path))
    assert torch.equal(net.features[0].weight, donor.features[0].weight)
    torch.save({"conv_stem.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="does not fit"):
        build_classifier("efficientnet_lite0", num_classes=3, weights=str(path))


def test_bce_and_dice_losses():
    import torch.nn.functional as F

    from training.stages import SegmentationLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, 0] = 255
    onehot = F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    per_pixel = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").mean(1)
    want = per_pixel[target != 255].mean()
    torch.testing.assert_close(SegmentationLoss("bce")(logits, target), want)
    # Dice adds a term that is ~0 for a perfect prediction and grows as it degrades.
    perfect = (onehot * 40 - 20).masked_fill((target == 255)[:, None], 0.0)
    dice = SegmentationLoss("ce", dice=1.0)
    assert dice(perfect, target) < 0.01 < dice(logits, target) - SegmentationLoss()(logits, target)
    with pytest.raises(ValueError, match="segmenter.loss"):
        SegmentationLoss("focal")


def test_a_run_is_read_with_the_tiles_its_classifier_was_trained_with(tmp_path):
    """classifier.tiles is part of the classifier's graph (its thresholds were chosen on
    it): a config asking another than the checkpoint's is refused, not silently ignored."""
    from tests.conftest import random_export_cfg
    from training.pipeline import refine_step
    from wsss.config import with_overrides

    cfg = random_export_cfg(tmp_path)
    assert refine_step(cfg)[0].net.tiles == 0.0
    with pytest.raises(ValueError, match="trained with 0.0"):
        refine_step(with_overrides(cfg, ["classifier.tiles=0.6"]))


def test_the_level_set_stage_refuses_other_tiles_than_its_classifiers(tmp_path, pets_root):
    """Before hours of training, not after: the level set learns on the classifier's graph."""
    from tests.conftest import random_export_cfg
    from training import stages

    cfg = random_export_cfg(
        tmp_path, f"data.root={pets_root}", "refine.method=levelset", "classifier.tiles=0.6"
    )
    with pytest.raises(ValueError, match="trained with 0.0"):
        stages.run(cfg, ("levelset",))
    assert not (tmp_path / "runs" / "levelset").exists()
