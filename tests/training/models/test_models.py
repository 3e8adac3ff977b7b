"""Every registered model through one shared tester: forward on odd sizes, backward, a
gradient check and ONNX export parity. A new model's test is one entry in ``MODELS``."""

import numpy as np
import pytest
import torch

from export.onnx_export import check_parity, export_onnx
from export.parity import ParityError
from training.models import CLASSIFIERS, SEGMENTERS, build_classifier, build_segmenter
from training.pipeline import ClassifierGraph, SegmenterGraph
from wsss.config import load_config
from wsss.errors import InputError
from wsss.tensors import CLASSIFIER, SEGMENTER, served_models

# (family, registry name, a label) -> the arguments that make it small but real. Untrained
# MobileNetV2 / EfficientNet features are ~1e-8 (noise), so those load their offline weights.
MODELS = {
    (CLASSIFIER, "resnet18", "stride 16"): {"output_stride": 16},
    (CLASSIFIER, "resnet18", "stride 32"): {"output_stride": 32},
    (CLASSIFIER, "resnet50", "stride 16"): {"output_stride": 16},
    (CLASSIFIER, "mobilenet_v2", "stride 16"): {"output_stride": 16, "pretrained": True},
    (CLASSIFIER, "mobilenet_v2", "stride 32"): {"output_stride": 32, "pretrained": True},
    (CLASSIFIER, "efficientnet_lite0", "stride 16"): {"output_stride": 16, "pretrained": True},
    (CLASSIFIER, "efficientnet_lite0", "imagenet groups"): {
        "pretrained": True,
        "head": "imagenet",
        "class_groups": [[281, 282, 283], [151, 152], [340]],
    },
    (CLASSIFIER, "efficientnet_lite0", "imagenet groups + learned"): {
        "pretrained": True,
        "head": "imagenet",
        "class_groups": [[281, 282, 283], [], [340]],
    },
    (CLASSIFIER, "efficientnet_lite1", "stride 16"): {"output_stride": 16, "pretrained": True},
    (CLASSIFIER, "efficientnet_lite2", "imagenet groups + learned"): {
        "output_stride": 16,
        "pretrained": True,
        "head": "imagenet",
        "class_groups": [[281, 282, 283], [], [340]],
    },
    (SEGMENTER, "unet", "depth 3"): {"base_channels": 4, "depth": 3},
    (SEGMENTER, "deeplabv3", "resnet50"): {"backbone": "resnet50"},
    (SEGMENTER, "deeplabv3", "mobilenet_v2"): {"backbone": "mobilenet_v2", "pretrained": True},
    (SEGMENTER, "deeplabv3", "efficientnet_lite0 stride 32"): {
        "backbone": "efficientnet_lite0",
        "pretrained": True,
        "output_stride": 32,
    },
}
CASES = [pytest.param(key, id="-".join(key[1:]).replace(" ", "_")) for key in MODELS]


def _build(key):
    family, arch, _ = key
    build = build_classifier if family == CLASSIFIER else build_segmenter
    torch.manual_seed(0)
    return build(arch, num_classes=3, **MODELS[key])


def test_every_registered_model_is_tested():
    assert {a for f, a, _ in MODELS if f == CLASSIFIER} == set(CLASSIFIERS)
    assert {a for f, a, _ in MODELS if f == SEGMENTER} == set(SEGMENTERS)


@pytest.mark.parametrize("key", CASES)
def test_forward_on_odd_sizes_and_backward(key):
    net = _build(key).eval()
    x = torch.rand(2, 3, 69, 50)
    out = net(x)
    if key[0] == CLASSIFIER:
        logits, cams = net.logits_and_cams(x)
        assert out.shape == logits.shape == (2, 3) and cams.shape == (2, 3, 69, 50)
        assert cams.min() >= 0 and cams.max() <= 1 + 1e-6
    else:
        assert out.shape == (2, 3, 69, 50)
    net.train()
    net(x).square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) >= 0.9 * len(grads)


@pytest.mark.parametrize("key", CASES)
def test_gradient_matches_finite_differences(key):
    """Autograd's directional derivative of a random projection of the output, in float64,
    against a central finite difference: the backward pass computes the forward's gradient."""
    net = _build(key).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 40, 40, dtype=torch.float64, generator=g, requires_grad=True)
    direction = torch.randn(x.shape, dtype=torch.float64, generator=g)
    weights = torch.randn(net(x).shape, dtype=torch.float64, generator=g)

    def f(inp):
        return (net(inp) * weights).sum()

    (grad,) = torch.autograd.grad(f(x), x)
    eps = 1e-6
    with torch.no_grad():
        numeric = (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)
    analytic = (grad * direction).sum()
    assert float(analytic) == pytest.approx(float(numeric), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("opset", [16, 99])
def test_an_opset_the_exporter_lacks_is_one_line(opset, tmp_path):
    """export.opset 99 was a RuntimeError from inside torch.onnx."""
    from wsss.errors import InputError

    module = ClassifierGraph(_build(next(iter(MODELS))), multi_label=False).eval()
    sample = (torch.zeros((1, 48, 48, 3), dtype=torch.uint8),)
    with pytest.raises(InputError, match=f"export.opset {opset}: 17 to 2\\d"):
        export_onnx(module, served_models(48, 3, 3)[CLASSIFIER], sample, tmp_path / "m", opset)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("key", CASES)
def test_export_parity_with_dynamic_batch(key, tmp_path):
    family = key[0]
    net = _build(key).eval()
    module = (
        ClassifierGraph(net, multi_label=False) if family == CLASSIFIER else SegmenterGraph(net)
    ).eval()
    spec = served_models(48, 3, 3)[family]
    sample = (torch.randint(0, 256, (2, 48, 48, 3), dtype=torch.uint8),)
    path = export_onnx(module, spec, sample, tmp_path / "m.onnx")
    errors = check_parity(module, path, spec, sample, atol=1e-4)
    assert set(errors) == {t.name for t in spec.outputs}
    bigger = (torch.randint(0, 256, (5, 48, 48, 3), dtype=torch.uint8),)
    check_parity(module, path, spec, bigger, atol=1e-4)


def test_output_stride_16_doubles_the_cam_resolution():
    x = torch.randn(1, 3, 64, 64)
    f32 = build_classifier("resnet18", num_classes=2, output_stride=32).forward_features(x)
    f16 = build_classifier("resnet18", num_classes=2, output_stride=16).forward_features(x)
    assert f32.shape[-1] == 2 and f16.shape[-1] == 4


def test_output_stride_8_is_the_same_imagenet_net_with_finer_cams():
    """EfficientNet-Lite at stride 8 (timm's dilation): 4x the stride-32 CAM's side, and the
    same weights read the same photo alike (the dilated stages see the same context)."""
    from skimage.data import chelsea

    photo = torch.from_numpy(chelsea()[:288, :288].copy()).permute(2, 0, 1)[None] / 255
    nets = {
        s: build_classifier(
            "efficientnet_lite0", num_classes=1000, output_stride=s, pretrained=True,
            head="imagenet",
        ).eval()
        for s in (8, 32)
    }  # fmt: skip
    with torch.no_grad():
        sides = {s: n.forward_features(photo).shape[-1] for s, n in nets.items()}
        top = {s: int(n(photo).argmax()) for s, n in nets.items()}
    assert sides == {8: 36, 32: 9}
    assert top[8] == top[32] and 281 <= top[8] <= 285, top  # a cat, at either stride
    with pytest.raises(InputError, match="output_stride 8: efficientnet_lite0/1/2 only"):
        load_config(None, ["classifier.output_stride=8"])  # resnet18 has no dilation


def _served(family):
    if family == CLASSIFIER:
        return ClassifierGraph(build_classifier("resnet18", num_classes=4), multi_label=True)
    return SegmenterGraph(build_segmenter("unet", num_classes=3, base_channels=4, depth=2))


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


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_imagenet_head_names_real_photos(arch):
    """The offline weights, head included, load strictly into timm (Lite1/2 repeat blocks
    the package numbers flat) and get real photos right."""
    from training.models.imagenet import imagenet_class_names

    net = build_classifier(arch, num_classes=1000, pretrained=True, head="imagenet").eval()
    served = ClassifierGraph(net, multi_label=False)
    names = imagenet_class_names()
    for photo, want in (("chelsea", "Egyptian cat"), ("coffee", "espresso")):
        with torch.no_grad():
            scores, _ = served(torch.from_numpy(_photo(photo)[None]))
        assert names[int(scores.argmax())] == want and float(scores.max()) > 0.6, photo


def test_efficientnet_lite_keys_rename_the_package_layout():
    from training.models.registry import bundled_efficientnet_lite_weights, efficientnet_lite_keys

    state = torch.load(bundled_efficientnet_lite_weights(0), weights_only=True)
    renamed = efficientnet_lite_keys(state)
    assert "blocks.6.0.conv_pwl.weight" in renamed and "classifier.weight" in renamed
    assert renamed["blocks.1.1.conv_dw.weight"] is state["_blocks.2._depthwise_conv.weight"]
    assert efficientnet_lite_keys(renamed) == renamed  # timm's names pass through


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_keys_are_timms_for_each_variant(variant):
    """Lite1/2 repeat blocks the package numbers flat: every renamed key is timm's, with
    its shape."""
    import timm

    from training.models.registry import bundled_efficientnet_lite_weights, efficientnet_lite_keys

    net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    stages = tuple(len(stage) for stage in net.blocks)
    state = torch.load(bundled_efficientnet_lite_weights(variant), weights_only=True)
    renamed = efficientnet_lite_keys(state, stages)
    want = net.state_dict()
    assert set(renamed) == set(want)
    assert all(renamed[k].shape == want[k].shape for k in want)


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


def test_learned_classes_beside_imagenet_groups():
    """A group with no ids is a learned class: its own linear head's sigmoid and weight
    row; the groups keep the ImageNet head's values; training moves only the learned head,
    batch-norm statistics included (export: the shared tester's "groups + learned")."""
    torch.manual_seed(0)
    groups = [[1, 2, 3], [], [7]]
    net = build_classifier("resnet18", num_classes=3, head="imagenet", class_groups=groups)
    plain = build_classifier(
        "resnet18", num_classes=2, head="imagenet", class_groups=[[1, 2, 3], [7]]
    )
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if "learned" not in k})
    assert net.frozen and not plain.frozen
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        feats = net.eval().forward_features(x)
        raw = net.forward_head(feats)
        own = net.learned(feats.mean(dim=(2, 3)))[:, 0]
        torch.testing.assert_close(net.class_scores(raw, True)[:, 1], torch.sigmoid(own))
        torch.testing.assert_close(net(x)[:, [0, 2]], plain.eval()(x))
        # CAM in closed form: the learned class's pixel logits average to its logit.
        torch.testing.assert_close(net.pixel_logits(feats, raw).mean(dim=(2, 3))[:, 1], own)
        cams, ref = net.logits_and_cams(x)[1], plain.logits_and_cams(x)[1]
        torch.testing.assert_close(cams[:, [0, 2]], ref)
    net.freeze().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    loss = net(x)[:, 1].sum()
    loss.backward()
    opt.step()
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"learned.weight", "learned.bias"}
    with pytest.raises(ValueError, match="at least one needs ImageNet ids"):
        build_classifier("resnet18", num_classes=1, head="imagenet", class_groups=[[]])


def test_presence_from_corner_tiles():
    """classifier.tiles: each ImageNet group's score is the mean of the image's and of its
    best corner tile's (each corner, 0.6 of the side, enlarged to the image's size); the
    learned class keeps the image's; the CAMs stay the image's; it exports with the same
    values and a free batch axis; off, the scores are the image's alone."""
    torch.manual_seed(0)
    groups = [[1, 2, 3], [], [7]]
    net = build_classifier(
        "resnet18", num_classes=3, head="imagenet", class_groups=groups, tiles=0.6
    ).eval()
    images = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)
    graph = ClassifierGraph(net, multi_label=True).eval()
    with torch.no_grad():
        scores, cams = graph(images)
        x = images.permute(0, 3, 1, 2).float() / 255
        whole = net.class_scores(net.forward_head(net.forward_features(x)), True)
        tiles = []
        sides = (slice(0, 24), slice(16, 40))  # int(40 * 0.6) = 24 px from each edge
        for tile in (x[..., r, c] for r in sides for c in sides):
            big = torch.nn.functional.interpolate(tile, size=(40, 40), mode="bilinear")
            tiles.append(net.class_scores(net.forward_head(net.forward_features(big)), True))
        best = torch.stack(tiles).amax(dim=0)
        torch.testing.assert_close(scores[:, [0, 2]], (whole[:, [0, 2]] + best[:, [0, 2]]) / 2)
        torch.testing.assert_close(scores[:, 1], whole[:, 1])  # learned: the image's
        net.tiles = 0.0
        plain_scores, plain_cams = graph(images)
        torch.testing.assert_close(plain_scores, whole)
        torch.testing.assert_close(plain_cams, cams)
        assert not torch.allclose(plain_scores[:, [0, 2]], scores[:, [0, 2]])
        net.tiles = 0.01  # tiles of under a pixel: one pixel each
        assert graph(images)[0].shape == (2, 3)
        net.tiles = 0.6
        empty = graph(images[:0])
        assert empty[0].shape == (0, 3) and empty[1].shape == (0, 3, 40, 40)
    with pytest.raises(ValueError, match="classifier.tiles"):
        build_classifier("resnet18", num_classes=3, tiles=1.0)


def test_presence_from_tiles_exports_with_a_free_batch(tmp_path):
    torch.manual_seed(0)
    net = build_classifier(
        "resnet18", num_classes=3, head="imagenet", class_groups=[[1, 2], [], [7]], tiles=0.6
    )
    module = ClassifierGraph(net.eval(), multi_label=True).eval()
    spec = served_models(48, 3, 3)[CLASSIFIER]
    sample = (torch.randint(0, 256, (2, 48, 48, 3), dtype=torch.uint8),)
    path = export_onnx(module, spec, sample, tmp_path / "m.onnx")
    check_parity(module, path, spec, sample, atol=1e-4)
    bigger = (torch.randint(0, 256, (3, 48, 48, 3), dtype=torch.uint8),)
    check_parity(module, path, spec, bigger, atol=1e-4)
