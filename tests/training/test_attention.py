"""ViT attention pseudo-masks: the post-processing, both backends, and the refiner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.attention import SIZE, ViTAttention, attention_mask


def test_post_processing_keeps_the_largest_smooth_part():
    yy, xx = np.mgrid[:SIZE, :SIZE]
    big = np.hypot(yy - 120, xx - 100) < 50
    small = np.hypot(yy - 30, xx - 190) < 12
    rng = np.random.default_rng(0)
    attention = 0.8 * big + 0.8 * small + 0.15 * rng.random((SIZE, SIZE))
    mask = attention_mask(attention.astype(np.float32))
    iou = (mask & big).sum() / (mask | big).sum()
    assert iou > 0.85 and not (mask & small).any()
    assert not attention_mask(np.full((SIZE, SIZE), 0.5, np.float32)).any()


def _photos():
    import cv2
    import skimage.data

    return np.stack(
        [cv2.resize(getattr(skimage.data, n)(), (160, 160)) for n in ("chelsea", "coffee")]
    )


def test_bundled_onnx_vit_gives_fused_maps():
    maps = ViTAttention()(_photos())
    assert maps.shape == (2, SIZE, SIZE) and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="no attention node"):
        ViTAttention(layers=(12,))


def test_a_timm_vit_from_a_checkpoint(tmp_path):
    """Any timm ViT: its attention softmax read by hooks (a small random one here)."""
    import timm

    arch = "vit_tiny_patch16_224"
    torch.manual_seed(0)
    path = tmp_path / "vit.pt"
    torch.save(timm.create_model(arch, pretrained=False, num_classes=0).state_dict(), path)
    maps = ViTAttention(layers=(0, 11), weights=str(path), arch=arch)(_photos())
    assert maps.shape == (2, SIZE, SIZE) and np.isfinite(maps).all() and maps.max() > 0.5


def test_vit_refiner_masks_the_present_class():
    from training.torch_refiners import build_refiner
    from wsss.config import RefineConfig

    images = _photos()
    cams = np.zeros((2, 3, 160, 160), np.float32)
    cams[:, 2, :, :80] = 1.0  # class 2 strongest on the left half, class 0 on the right
    cams[:, 0, :, 80:] = 1.0
    scores = np.array([[0.9, 0.0, 0.8], [0.1, 0.1, 0.1]], np.float32)
    binary = build_refiner(RefineConfig("vit"), multi_label=False)(images, scores, cams)
    assert set(np.unique(binary)) <= {0, 1} and 0.05 < binary[0].mean() < 0.95
    multi = build_refiner(RefineConfig("vit", min_score=0.5), multi_label=True)
    masks = multi(images, scores, cams)
    assert set(np.unique(masks[0][:, :80])) <= {0, 3} and set(np.unique(masks[0][:, 80:])) <= {0, 1}
    assert not masks[1].any()  # min_score: nothing present
    with pytest.raises(ValueError, match="saliency optionally \\+grabcut"):
        build_refiner(RefineConfig("vit", grabcut=True), multi_label=False)


@pytest.mark.realdata
def test_bundled_vit_attention_lands_on_the_pet_of_real_photos(real_pets):
    """Real Pet test photos (every 15th: all three breeds): the attention is higher on the
    animal than around it, and its mask overlaps the trimap's pet far better than marking
    the whole photo does."""
    from training.data.dataset import WSSSDataset
    from training.data.layouts import IGNORE, list_samples

    samples = list_samples(real_pets, "pets", "test")[::15]
    data = WSSSDataset(real_pets, "pets", "test", SIZE, samples=samples)
    maps = ViTAttention()(data.images)
    pet, known = data.masks == 1, data.masks != IGNORE
    inside = np.array([m[p].mean() for m, p in zip(maps, pet, strict=True)])
    outside = np.array([m[k & ~p].mean() for m, p, k in zip(maps, pet, known, strict=True)])
    masks = np.stack([attention_mask(m) for m in maps])
    iou = (masks & pet).sum((1, 2)) / ((masks | pet) & known).sum((1, 2))
    whole = pet.sum((1, 2)) / known.sum((1, 2))
    # Measured: attention 0.210 on the pet vs 0.066 around it; IoU 0.559 vs 0.278.
    assert (inside > 2 * outside).mean() >= 0.9
    assert iou.mean() > whole.mean() + 0.2
