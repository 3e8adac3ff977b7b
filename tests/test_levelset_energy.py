"""SDF targets and the Chan-Vese energy."""

import numpy as np
import pytest
import torch

from training.levelset.energy import (
    cam_weighted,
    chan_vese_energy,
    heaviside,
    signed_distance,
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
