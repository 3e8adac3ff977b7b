import cv2
import numpy as np
import pytest

from training.torch_refiners import (
    ChanVese,
    FixedThreshold,
    Followed,
    GrabCut,
    OtsuThreshold,
    SaliencyRefiner,
    build_refiner,
    present_classes,
)
from wsss.config import RefineConfig
from wsss.served.registry import REFINERS


def _blob_cam(h=32, w=32, cy=16, cx=16, r=8):
    yy, xx = np.mgrid[:h, :w]
    return np.clip(1 - np.hypot(yy - cy, xx - cx) / (2 * r), 0, 1).astype(np.float32)


IMAGE = np.zeros((32, 32, 3), np.uint8)


def _call(refiner, cams, scores):
    """One image through the batched interface."""
    return refiner(IMAGE[None], np.asarray(scores, np.float32)[None], cams[None])[0]


@pytest.mark.parametrize("refiner", [FixedThreshold(False, 0.5), OtsuThreshold(False)])
def test_binary_blob(refiner):
    cams = np.stack([np.zeros((32, 32), np.float32), _blob_cam()])
    mask = _call(refiner, cams, [0.2, 0.8])
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert mask[16, 16] == 1 and mask[0, 0] == 0
    assert 50 < mask.sum() < 600


def test_multiclass_overlap_goes_to_the_stronger_cam():
    a, b = _blob_cam(cx=10), _blob_cam(cx=22)
    cams = np.stack([a, b, np.zeros_like(a)])
    mask = _call(FixedThreshold(True, 0.3), cams, [0.9, 0.8, 0.1])
    assert mask[16, 8] == 1 and mask[16, 24] == 2 and mask[0, 0] == 0
    assert set(np.unique(mask)) == {0, 1, 2}


def test_flat_cam_gives_background():
    cams = np.full((2, 32, 32), 0.7, np.float32)
    assert _call(OtsuThreshold(False), cams, [0.9, 0.1]).sum() == 0


def test_present_classes():
    s = np.array([0.1, 0.7, 0.6])
    assert present_classes(s, False, 0.5) == [1]
    assert present_classes(s, True, 0.5) == [1, 2]
    assert present_classes(np.array([0.1, 0.2]), True, 0.5) == [1]
    # min_score: nothing is refined when even the top class is unlikely.
    assert present_classes(np.array([0.01, 0.02]), False, 0.5, min_score=0.1) == []
    assert present_classes(np.array([0.01, 0.02]), True, 0.5, min_score=0.1) == []
    assert present_classes(s, True, 0.5, min_score=0.65) == [1]


def test_min_score_gives_an_empty_mask():
    cams = np.stack([np.zeros((32, 32), np.float32), _blob_cam()])
    refiner = build_refiner(RefineConfig("otsu", min_score=0.5), multi_label=False)
    assert _call(refiner, cams, [0.1, 0.3]).sum() == 0
    assert _call(refiner, cams, [0.1, 0.6]).sum() > 50


def test_registry_builds_every_refiner_from_config():
    seeds = {n for n, e in REFINERS.items() if e.part == "seed"}
    assert seeds == {"fixed", "otsu", "levelset", "vit", "saliency", "walk"}
    assert set(REFINERS) - seeds == {"grabcut", "chanvese", "crf"}
    cams = np.stack([np.stack([_blob_cam(), _blob_cam(cx=8)])] * 3)
    scores = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    refiner = build_refiner(RefineConfig("otsu"), multi_label=True)
    masks = refiner(np.stack([IMAGE] * 3), scores, cams)
    assert masks.shape == (3, 32, 32) and set(np.unique(masks[2])) == {0, 1, 2}
    assert build_refiner(RefineConfig("fixed", grabcut=True), False).name == "fixed+grabcut"
    assert build_refiner(RefineConfig("otsu", chanvese=True), False).name == "otsu+chanvese15"
    assert not build_refiner(RefineConfig("otsu"), False).needs_features
    with pytest.raises(ValueError, match="one of fixed, otsu, saliency, vit, walk, levelset"):
        build_refiner(RefineConfig("magic"), False)
    with pytest.raises(ValueError, match="trained level-set network"):
        build_refiner(RefineConfig("levelset"), False)
    with pytest.raises(ValueError, match="exclude each other"):
        build_refiner(RefineConfig("otsu", grabcut=True, chanvese=True), False)
    with pytest.raises(ValueError, match="threshold"):
        FixedThreshold(False, 1.5)


def test_binary_or_class_index_encoding():
    """Level-set seeds of a binary task need the class index, served masks need 1."""
    cams = np.stack([_blob_cam(), _blob_cam(cx=8)])
    served = _call(build_refiner(RefineConfig("otsu"), False), cams, [0.1, 0.9])
    seeds = _call(build_refiner(RefineConfig("otsu"), False, binary=False), cams, [0.1, 0.9])
    assert set(np.unique(served)) == {0, 1} and set(np.unique(seeds)) == {0, 2}
    np.testing.assert_array_equal(served > 0, seeds > 0)


def test_pipeline_refines_labels_or_predictions_per_image():
    """Labelled images use their labels; an image with None uses its predictions."""
    import torch

    from training.pipeline import Pipeline

    pipe = Pipeline(None, None, OtsuThreshold(False, binary=False))
    cams = torch.from_numpy(np.stack([np.stack([_blob_cam(), _blob_cam(cx=8)])] * 2))
    outputs = (torch.tensor([[0.1, 0.9], [0.1, 0.9]]), cams)
    masks = pipe.refine(np.stack([IMAGE] * 2), outputs, [(0,), None])
    assert set(np.unique(masks[0])) == {0, 1} and set(np.unique(masks[1])) == {0, 2}


def _scene():
    """A red disc on a textured green background, and a CAM blob that overshoots it."""
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64, 3), np.uint8)
    image[..., 1] = 120 + rng.integers(0, 40, (64, 64))
    yy, xx = np.mgrid[:64, :64]
    disc = np.hypot(yy - 30, xx - 34) < 14
    image[disc] = (200, 30, 30)
    cam = np.clip(1 - np.hypot(yy - 32, xx - 32) / 26, 0, 1).astype(np.float32)
    return image, cam, disc


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_grabcut_snaps_a_sloppy_cam_mask_to_the_object():
    image, cam, disc = _scene()
    seed = FixedThreshold(False, 0.3)
    before = seed.foreground(cam, image)
    after = Followed(seed, GrabCut(iterations=5)).foreground(cam, image)
    assert _iou(before, disc) < 0.8 < 0.95 < _iou(after, disc)


@pytest.mark.parametrize("case", ["all foreground", "all background", "tiny", "one pixel"])
def test_grabcut_degenerate_seeds_return_sensible_masks(case):
    image, cam, _ = _scene()
    refiner = Followed(FixedThreshold(False, 0.5), GrabCut())
    if case == "all foreground":
        cam = np.ones_like(cam)
    elif case == "all background":
        cam = np.zeros_like(cam)
    elif case == "tiny":
        image, cam = image[:5, :5], cam[:5, :5]
    else:
        cam = np.zeros_like(cam)
        cam[10, 10] = 1.0
    mask = refiner.foreground(cam, image)
    assert mask.shape == cam.shape and mask.dtype == bool
    assert np.array_equal(mask, FixedThreshold(False, 0.5).foreground(cam, image))


def test_grabcut_settings_are_checked():
    with pytest.raises(ValueError, match="iterations"):
        GrabCut(iterations=0)
    with pytest.raises(ValueError, match="sure_background"):
        GrabCut(sure_fg=0.1, sure_bg=0.5)


def test_grabcut_is_deterministic_whatever_ran_before():
    """OpenCV's global RNG state (left by any earlier code) must not change the mask."""
    import cv2

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # noise: k-means init matters
    yy, xx = np.mgrid[:64, :64]
    cam = np.clip(1 - np.hypot(yy - 32, xx - 32) / 26, 0, 1).astype(np.float32)
    refiner = Followed(FixedThreshold(False, 0.3), GrabCut(iterations=3))
    masks = []
    for seed in (1, 2, 3):
        cv2.setRNGSeed(seed)
        masks.append(refiner.foreground(cam, image))
    assert all(np.array_equal(m, masks[0]) for m in masks)


def test_chan_vese_moves_an_overshooting_seed_onto_the_object():
    """Classical Chan-Vese from the thresholded CAM: more iterations, closer to the disc."""
    image, cam, truth = _scene()
    seed = FixedThreshold(False, 0.3)
    start = seed.foreground(cam, image)
    ious = [_iou(Followed(seed, ChanVese(n)).foreground(cam, image), truth) for n in (1, 15, 50)]
    assert ious[-1] > _iou(start, truth) + 0.1
    assert ious == sorted(ious)


def test_chan_vese_passes_degenerate_seeds_through():
    image, cam, _ = _scene()
    assert not Followed(FixedThreshold(False, 0.99), ChanVese(5)).foreground(cam * 0, image).any()
    assert not ChanVese(5)(image, cam, np.zeros(cam.shape, bool)).any()  # after saliency too
    with pytest.raises(ValueError, match=">= 1"):
        ChanVese(0)


class _Saliency:
    """A stand-in saliency model: the same [224, 224] map for every image."""

    def __init__(self, blob):
        self.map = cv2.resize(blob, (224, 224), interpolation=cv2.INTER_LINEAR)

    def __call__(self, images):
        return np.stack([self.map] * len(images))


def _saliency_case():
    """A salient blob where the class's CAM is (left) and one the CAM never reaches
    (right); a CAM-confident spot (top) outside every salient part."""
    salient = np.maximum(_blob_cam(cx=9, r=5), _blob_cam(cx=25, r=4))
    cam = _blob_cam(cx=9, r=5) * 0.9 + _blob_cam(cy=3, cx=3, r=1.5)
    return salient, np.stack([np.zeros_like(cam), np.clip(cam, 0, 1)])


@pytest.mark.parametrize("doubt, other", [("keep", 1), ("background", 0), ("ignore", 255)])
def test_saliency_gives_the_extent_and_the_cam_the_doubts(doubt, other):
    salient, cams = _saliency_case()
    refiner = SaliencyRefiner(False, _Saliency(salient), doubt, cam_threshold=0.5, sure_fg=0.8)
    mask = _call(refiner, cams, [0.1, 0.9])
    assert mask[16, 9] == 1 and mask[31, 16] == 0  # the labelled object; background
    assert mask[16, 25] == other  # salient, but no CAM of a present class reaches it
    assert mask[3, 3] == (0 if doubt == "keep" else other)  # CAM-sure, not salient


def test_saliency_pixels_go_to_the_strongest_present_class():
    salient = np.maximum(_blob_cam(cx=9, r=5), _blob_cam(cx=24, r=5))
    cams = np.stack([_blob_cam(cx=9, r=5), _blob_cam(cx=24, r=5), np.zeros((32, 32), np.float32)])
    mask = _call(SaliencyRefiner(True, _Saliency(salient)), cams, [0.9, 0.8, 0.1])
    assert mask[16, 9] == 1 and mask[16, 24] == 2 and mask[0, 0] == 0
    # No class present (min_score): an empty mask, whatever is salient.
    empty = SaliencyRefiner(False, _Saliency(salient), min_score=0.95)
    assert _call(empty, cams[:2], [0.5, 0.5]).sum() == 0


def test_saliency_is_built_from_config_with_its_follow_ups():
    cases = (
        ({}, "saliency"),
        ({"grabcut": True}, "saliency+grabcut"),
        ({"chanvese": True, "chanvese_iterations": 3}, "saliency+chanvese3"),
    )
    for extra, name in cases:
        refiner = build_refiner(RefineConfig(method="saliency", **extra), multi_label=False)
        assert isinstance(refiner, SaliencyRefiner) and refiner.name == name
    with pytest.raises(ValueError, match="saliency_doubt"):
        build_refiner(RefineConfig(method="saliency", saliency_doubt="maybe"), False)


def test_the_dense_crf_snaps_to_the_object_and_never_erases_a_class():
    """A red square on green, its seed a CAM blob off its centre: the CRF moves the mask
    onto the square; a seed under half of the square, which the CRF's smoothing votes to
    background whole at the defaults, is kept rather than the class lost."""
    pytest.importorskip("pydensecrf.densecrf")
    from training.crf import DenseCRF

    rng = np.random.default_rng(0)
    image = np.zeros((96, 96, 3), np.uint8)
    image[...] = (40, 160, 40)
    square = np.zeros((96, 96), bool)
    square[30:70, 20:60] = True
    image[square] = (200, 30, 30)
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:96, :96]
    cam = np.exp(-(((yy - 52) / 18) ** 2 + ((xx - 45) / 18) ** 2))
    cam = (cam - cam.min()) / (cam.max() - cam.min())

    def iou(mask):
        return (mask & square).sum() / (mask | square).sum()

    shifted = np.zeros_like(square)
    shifted[34:74, 26:66] = True  # the square moved by a few pixels
    assert iou(DenseCRF()(image, cam, shifted)) > iou(shifted) + 0.2
    small = cam >= 0.5  # under half of the square
    kept = DenseCRF()(image, cam, small)
    assert kept.any() and np.array_equal(kept, small)
    assert not DenseCRF()(image, cam, np.zeros_like(square)).any()  # nothing stays nothing
