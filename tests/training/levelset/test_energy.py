"""SDF targets and the Chan-Vese energy."""

import numpy as np
import pytest
import torch

from training.levelset.energy import (
    cam_weighted,
    chan_vese_energy,
    edge_stop,
    heaviside,
    rgb_to_lab,
    seed_region_energy,
    signed_distance,
    weighted_chan_vese_energy,
)


def _disc(size=40, cy=20, cx=20, r=9):
    yy, xx = np.mgrid[:size, :size]
    return np.hypot(yy - cy, xx - cx) < r


def test_sdf_sign_and_scale():
    mask = _disc()
    sdf = signed_distance(mask, clip=5.0)
    assert (sdf[mask] < 0).all() and (sdf[~mask] > 0).all()
    assert sdf.min() == -1.0 and sdf.max() == 1.0  # clipped far from the boundary
    # One pixel outside the boundary is 1 px away: 1 / clip.
    row = sdf[20]
    edge = np.flatnonzero(~mask[20] & (np.arange(40) > 20))[0]
    assert row[edge] == pytest.approx(1 / 5.0)
    assert row[20] == -1.0  # the centre, 9 px deep, clipped
    assert signed_distance(np.zeros((4, 4)), 3).min() == 1.0
    assert signed_distance(np.ones((4, 4)), 3).max() == -1.0
    with pytest.raises(ValueError):
        signed_distance(mask, 0)


def test_heaviside_is_one_inside():
    phi = torch.tensor([-1.0, 0.0, 1.0])
    h = heaviside(phi, 0.1)
    assert h[0] > 0.9 and h[1] == pytest.approx(0.5) and h[2] < 0.1


def test_energy_decreases_and_the_contour_finds_the_object():
    """Gradient descent on phi alone, from a misplaced square, onto a bright disc."""
    truth = _disc()
    image = torch.from_numpy(np.where(truth, 0.9, 0.1)).float()[None, None]
    image = image + 0.05 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    start = np.zeros((40, 40), bool)
    start[5:22, 8:25] = True  # overlaps the disc, offset and the wrong shape
    phi = torch.from_numpy(signed_distance(start, 5.0))[None, None].clone().requires_grad_()
    inputs = cam_weighted(image, torch.zeros(1, 1, 40, 40), alpha=0.5)
    opt = torch.optim.Adam([phi], lr=0.05)
    energies = []
    for _ in range(150):
        opt.zero_grad()
        energy = chan_vese_energy(phi, inputs, gamma=0.01)
        energy.backward()
        opt.step()
        energies.append(energy.item())
    assert energies[-1] < 0.5 * energies[0]
    assert all(b <= a + 1e-4 for a, b in zip(energies[::10], energies[10::10], strict=False))
    found = phi.detach()[0, 0].numpy() < 0

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    assert iou(start, truth) < 0.4 and iou(found, truth) > 0.85


def test_cam_weighting_shapes_and_extremes():
    image = torch.ones(2, 3, 8, 8)
    cams = torch.full((2, 4, 8, 8), 50.0)  # sigmoid ~ 1
    out = cam_weighted(image, cams, alpha=0.3)
    assert out.shape == (2, 4, 3, 8, 8) and torch.allclose(out, torch.ones_like(out))
    low = cam_weighted(image, -cams, alpha=0.3)
    assert torch.allclose(low, torch.full_like(low, 0.7))


def test_lab_is_scikit_images_lab_scaled():
    from skimage.color import rgb2lab

    pixels = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    pixels[0, :, 0, 0] = 0.0  # black and white: the formulas' two branches
    pixels[0, :, 0, 1] = 1.0
    ours = rgb_to_lab(pixels).numpy()
    theirs = np.stack([rgb2lab(p.permute(1, 2, 0).numpy()) for p in pixels]) / 25
    np.testing.assert_allclose(ours, theirs.transpose(0, 3, 1, 2), atol=2e-3)


def test_edges_make_a_contour_along_them_cheaper():
    truth = _disc()
    image = torch.from_numpy(np.where(truth, 1.0, 0.0)).float()[None, None].expand(1, 3, 40, 40)
    g = edge_stop(image, beta=50.0)
    assert g.shape == (1, 1, 40, 40)
    assert g[0, 0, 2, 2] == pytest.approx(1.0) and g[0, 0, 20, 20] == pytest.approx(1.0)
    ring = torch.from_numpy(truth ^ np.roll(truth, 1, axis=1))
    assert g[0, 0][ring].max() < 0.2  # on the disc's edge
    # The same contour on the disc's edge, with and without the edge weight: only its
    # length term changes, and it is cheaper along the edge.
    phi = torch.from_numpy(signed_distance(truth, 5.0))[None, None]
    weight = torch.ones(1, 1, 40, 40)
    plain = weighted_chan_vese_energy(phi, image, weight, gamma=1.0)
    along = weighted_chan_vese_energy(phi, image, weight, gamma=1.0, edges=g)
    assert along < plain
    shifted = torch.from_numpy(signed_distance(np.roll(truth, 8, axis=1), 5.0))[None, None]
    # Off the edge, the weight saves (nearly) nothing.
    off_saving = weighted_chan_vese_energy(shifted, image, weight, 1.0) - weighted_chan_vese_energy(
        shifted, image, weight, 1.0, edges=g
    )
    assert off_saving < 0.5 * (plain - along)


def test_seed_region_energy_counts_disagreement_and_skips_doubt():
    seed = torch.zeros(1, 40, 40, dtype=torch.long)
    seed[0][torch.from_numpy(_disc())] = 1
    phi = torch.from_numpy(signed_distance(_disc(), 0.05))[None, None]  # sharp: H ~ 0 or 1
    close = seed_region_energy(phi, seed).item()  # H is smooth: 0.97 deep inside, not 1
    assert close < 0.05
    wrong = torch.from_numpy(signed_distance(np.roll(_disc(), 10, axis=1), 0.05))[None, None]
    far = seed_region_energy(wrong, seed).item()
    assert far > 3 * close + 0.1
    doubt = seed.clone()
    doubt[0, :, 20:] = 255  # the half where the shifted disc disagrees most: not counted
    assert seed_region_energy(wrong, doubt).item() < far
