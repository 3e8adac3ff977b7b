"""The level-set refiner: shapes (binary and multi-class), mask reading, losses, export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.onnx_export import check_parity, export_onnx
from training.levelset.energy import cam_weighted, chan_vese_energy, weighted_chan_vese_energy
from training.levelset.model import (
    FNOGroup,
    LevelSetGraph,
    LevelSetHead,
    levelset_mask,
    present_classes_mask,
)
from training.levelset.train import LevelSetLoss, LevelSetModel, sdf_targets
from training.models import build_classifier
from wsss.config import LevelSetConfig
from wsss.tensors import REFINER, served_models


@pytest.mark.parametrize("classes", [1, 2, 20])
def test_head_shapes_multi_class(classes):
    head = LevelSetHead(feature_channels=24, num_classes=classes, image_size=40)
    feats, x = torch.randn(3, 24, 5, 5), torch.randn(3, 3, 40, 40)
    phi0, phi = head(feats, x, torch.rand(3, classes, 40, 40))
    assert phi0.shape == phi.shape == (3, classes, 40, 40)
    assert phi0.abs().max() <= 1  # tanh: the range of the clipped SDF targets
    assert head.modes == 12


def test_modes_capped_at_half_the_side():
    assert LevelSetHead(8, 3, image_size=16).modes == 8


def test_untrained_evolution_stays_near_identity():
    phi0 = torch.rand(2, 5, 32, 32) * 2 - 1
    torch.manual_seed(0)
    out = FNOGroup(5, 8, 4)(phi0)
    # Identity residual plus a damped update: the untrained group must not scramble phi0.
    assert torch.corrcoef(torch.stack([out.flatten(), phi0.flatten()]))[0, 1] > 0.9


def test_cam_prior_starts_at_the_cams_fixed_threshold_masks():
    """With cam_prior, an untrained head's initial level sets are the CAM's own masks at that
    level; without it (the paper's f_LSI) they are not."""
    torch.manual_seed(0)
    feats, x, cams = torch.randn(2, 24, 5, 5), torch.randn(2, 3, 40, 40), torch.rand(2, 3, 40, 40)
    phi0, _ = LevelSetHead(24, 3, 40, cam_prior=0.3)(feats, x, cams)
    assert torch.equal(phi0 < 0, cams > 0.3)
    phi0, _ = LevelSetHead(24, 3, 40)(feats, x, cams)
    assert (phi0 < 0).eq(cams > 0.3).float().mean() < 0.75


def test_cam_prior_is_a_level_inside_the_cams_range():
    with pytest.raises(ValueError, match="cam_prior"):
        LevelSetConfig(cam_prior=1.5)


def test_channel_attention_mixes_classes():
    """Changing one class's level set changes another's evolution (SE attention + 1x1)."""
    torch.manual_seed(0)
    group = FNOGroup(3, 4, 2)
    phi = torch.rand(1, 3, 16, 16)
    other = phi.clone()
    other[:, 0] = -other[:, 0]
    assert not torch.allclose(group(phi)[:, 2], group(other)[:, 2])


def test_present_classes_mask():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.55, 0.1], [0.2, 0.3, 0.4]])
    assert present_classes_mask(scores, False, 0.5).tolist() == [
        [False, True, False],
        [True, False, False],
        [False, False, True],
    ]
    assert present_classes_mask(scores, True, 0.5).tolist() == [
        [False, True, False],
        [True, True, False],
        [False, False, True],  # nothing above the threshold: the top class
    ]


def test_levelset_mask_reading():
    phi = torch.ones(1, 3, 4, 4)
    phi[0, 0, :2, :2] = -0.5  # class 0 inside the top-left
    phi[0, 1, :2, :] = -0.2  # class 1 inside the top half, shallower
    phi[0, 2, 2:, :] = -0.9  # class 2 inside the bottom half, but absent
    present = torch.tensor([[True, True, False]])
    multi = levelset_mask(phi, present, binary=False)[0]
    assert multi.dtype == torch.uint8
    assert multi[:2, :2].eq(1).all()  # deepest inside class 0 there
    assert multi[:2, 2:].eq(2).all()
    assert multi[2:].eq(0).all()  # absent classes never claim pixels
    binary = levelset_mask(phi, present, binary=True)[0]
    assert binary[:2].eq(1).all() and binary[2:].eq(0).all()


def test_sdf_targets_per_class():
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 4:10, 4:10] = 2  # class 1 in image 0
    t = sdf_targets(masks, 3, clip=4.0)
    assert t.shape == (2, 3, 16, 16)
    assert (t[0, 1, 5:9, 5:9] < 0).all() and (t[0, 1, 0] > 0).all()
    assert (t[0, 0] == 1).all() and (t[1] == 1).all()  # absent: entirely outside


def test_pixels_in_doubt_teach_the_level_set_nothing():
    """A block in doubt (255) inside an object: its SDF targets are the object's (inside,
    not outside), and the MSE does not read them: any phi0 there costs nothing."""
    from types import SimpleNamespace

    masks = np.zeros((1, 32, 32), np.uint8)
    masks[0, 6:26, 6:26] = 1
    masks[0, 12:20, 12:20] = 255
    t = sdf_targets(masks, 1, clip=3.2)  # levelset.sdf_clip 0.1 of the 32 px side
    whole = masks.copy()
    whole[0, 12:20, 12:20] = 1
    np.testing.assert_array_equal(t, sdf_targets(whole, 1, clip=3.2))
    assert t[0, 0, 16, 16] == -1  # deep inside; it read +0.8 (outside) before
    loss = LevelSetLoss(LevelSetConfig(lambda_energy=0.0), 1, True, 32)
    seeds, labels = torch.from_numpy(masks).long(), torch.ones(1, 1)
    phi0 = torch.from_numpy(t).clone()
    out = SimpleNamespace(phi0=phi0, phi=phi0)
    assert loss(out, (seeds, labels)) == 0
    phi0[0, 0, 12:20, 12:20] = 1.0  # anything at all where the seed is in doubt
    assert loss(out, (seeds, labels)) == 0
    phi0[0, 0, 8, 8] = 1.0  # where it is not, a cost
    assert loss(out, (seeds, labels)) > 0


def test_a_photo_all_in_doubt_does_not_dilute_the_mse():
    """Its present class counted in the mean with no error at all: a batch of it and a
    photo with an error of 1 averaged 0.5."""
    from types import SimpleNamespace

    masks = np.zeros((2, 32, 32), np.uint8)
    masks[0, 6:26, 6:26] = 1
    masks[1] = 255  # no pixel decided
    loss = LevelSetLoss(LevelSetConfig(lambda_energy=0.0), 1, True, 32)
    seeds, labels = torch.from_numpy(masks).long(), torch.ones(2, 1)
    phi0 = torch.from_numpy(sdf_targets(masks, 1, clip=3.2)) + 1.0  # off by 1 everywhere
    out = SimpleNamespace(phi0=phi0, phi=phi0)
    alone = SimpleNamespace(phi0=phi0[:1], phi=phi0[:1])
    assert loss(alone, (seeds[:1], labels[:1])).item() == pytest.approx(1.0)
    assert loss(out, (seeds, labels)).item() == pytest.approx(
        loss(alone, (seeds[:1], labels[:1])).item()
    )


def test_weighted_energy_equals_materialised_form():
    torch.manual_seed(0)
    phi = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    x = torch.randn(2, 5, 12, 12, dtype=torch.float64)
    logits = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    weight = 0.5 + 0.5 * torch.sigmoid(logits)
    per_class = weighted_chan_vese_energy(phi, x, weight, gamma=0.3)
    want = chan_vese_energy(phi, cam_weighted(x, logits, alpha=0.5), gamma=0.3)
    assert per_class.shape == (2, 3)
    assert torch.allclose(per_class.mean(), want, atol=1e-9)


def _model(k: int, finetune: bool = False) -> LevelSetModel:
    net = build_classifier("resnet18", num_classes=k, output_stride=16)
    return LevelSetModel(net, LevelSetHead(512, k, 32, hidden=8, modes=4, layers=2), finetune)


@pytest.mark.parametrize("multi_label", [False, True])
def test_loss_terms_and_gradients(multi_label):
    torch.manual_seed(0)
    k = 4
    model = _model(k).train()
    out = model(torch.randn(2, 3, 32, 32))
    seeds = torch.zeros(2, 32, 32, dtype=torch.long)
    seeds[0, 8:20, 8:20] = 2
    seeds[1, 4:12, 4:30] = 4
    labels = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 1.0]]) if multi_label else torch.tensor([1, 3])
    loss_fn = LevelSetLoss(LevelSetConfig(), k, multi_label, 32)
    loss = loss_fn(out, (seeds, labels))
    assert set(loss_fn.last) == {"mse", "energy"} and torch.isfinite(loss)
    loss.backward()
    assert model.head.init.head[-1].weight.grad is not None
    assert model.head.evolution.layers[0].spectral.weight.grad is not None
    # Frozen backbone: no gradient, and train() keeps its batch-norm statistics fixed.
    assert all(p.grad is None for p in model.classifier.parameters())
    assert not model.classifier.training


def test_feature_energy_is_a_weighted_term():
    torch.manual_seed(0)
    model = _model(3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    present = torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.bool)

    def energy(weight):
        cfg = LevelSetConfig(feature_energy=weight)
        return LevelSetLoss(cfg, 3, True, 32).energy(out, present)

    image_only, full = energy(0.0), energy(1.0)
    assert full > image_only
    torch.testing.assert_close(energy(0.25), image_only + 0.25 * (full - image_only))


def test_finetune_trains_the_backbone_with_a_classification_loss():
    model = _model(3, finetune=True).train()
    out = model(torch.randn(2, 3, 32, 32))
    seeds = torch.zeros(2, 32, 32, dtype=torch.long)
    cfg = LevelSetConfig(finetune=True)
    loss_fn = LevelSetLoss(cfg, 3, False, 32)
    loss_fn(out, (seeds, torch.tensor([0, 2]))).backward()
    assert "classification" in loss_fn.last
    assert model.classifier.fc.weight.grad is not None and model.classifier.training


def test_loss_rejects_no_terms():
    with pytest.raises(ValueError, match="not both 0"):
        LevelSetLoss(LevelSetConfig(lambda_mse=0, lambda_energy=0), 3, False, 32)
    with pytest.raises(ValueError, match="feature_energy"):
        LevelSetLoss(LevelSetConfig(feature_energy=-1.0), 3, False, 32)


@pytest.mark.parametrize("multi_label", [False, True])
def test_served_refiner_exports_with_parity(tmp_path, multi_label):
    torch.manual_seed(0)
    k, size = 5, 32
    head = LevelSetHead(16, k, size, hidden=8, modes=6, layers=4).eval()
    served = LevelSetGraph(head, multi_label).eval()
    spec = served_models(size, k, k + 1, (16, 4, 4))[REFINER]

    def sample(b):
        g = torch.Generator().manual_seed(b)
        images = torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g)
        scores, cams = torch.rand(b, k, generator=g), torch.rand(b, k, size, size, generator=g)
        return images, scores, cams, torch.randn(b, 16, 4, 4, generator=g)

    path = export_onnx(served, spec, sample(2), tmp_path / "refiner.onnx")
    errors = check_parity(served, path, spec, sample(3), atol=1e-4)
    assert errors["PSEUDO_MASK"] <= 1e-3
    names = ("IMAGE", "SCORES", "CAMS", "FEATURES")
    feeds = {n: t.numpy() for n, t in zip(names, sample(3), strict=True)}
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, feeds)
    assert got.shape == (3, size, size) and got.dtype == np.uint8
    assert got.max() <= (k if multi_label else 1)
    # A non-finite input (a direct call to the refiner model) reads as an empty mask for
    # that image only, in the graph as in PyTorch: NaN level sets are never inside.
    feeds["CAMS"][0, 0, 3, 3] = np.nan
    (bad,) = session.run(None, feeds)
    assert got[0].any() and not bad[0].any()
    np.testing.assert_array_equal(bad[1:], got[1:])
    with torch.no_grad():
        ref = served(*(torch.from_numpy(feeds[n]) for n in names)).numpy()
    np.testing.assert_array_equal(ref[0], bad[0])
