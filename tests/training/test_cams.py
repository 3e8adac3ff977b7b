"""Closed-form CAMs against pytorch-grad-cam's autograd implementation, and export parity.

Tolerance: 1e-4 absolute on [0, 1] maps (float32 rounding through two rescalings; measured
differences are ~1e-6).
"""

import functools

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from export.onnx_export import check_parity, export_onnx
from training.cams import CAM_METHODS
from training.models import build_classifier
from training.pipeline import ClassifierGraph
from wsss.tensors import CLASSIFIER, served_models

TOL = 1e-4
# Our method -> the pytorch-grad-cam class it must match. For a GAP + linear head, CAM is
# Grad-CAM up to a positive factor, so both are checked against GradCAM.
REFERENCE = {"cam": GradCAM, "gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}


@functools.lru_cache(maxsize=4)
def _classifier(arch: str, num_classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    # Randomly initialised MobileNetV2 features are ~1e-8 (noise); the bundled ImageNet
    # weights give real activations.
    extra = {"pretrained": True} if arch in ("mobilenet_v2", "efficientnet_lite0") else {}
    net = build_classifier(arch, num_classes=num_classes, output_stride=16, **extra).eval()
    # Random heads give near-zero logits; larger weights make the maps less degenerate.
    with torch.no_grad():
        net.fc.weight.mul_(20)
    return net


METHODS = sorted(CAM_METHODS)
ARCHS = ["resnet18", "mobilenet_v2", "efficientnet_lite0"]
BATCHES = [1, 3]
SIZES = [(64, 64), (80, 48)]
# Every pair of values of any two of (method, arch, batch, size) in at least one case: the
# orthogonal array L9 (its 3-level columns folded onto the 2-level factors), 9 cases where
# the full product is 36. A mismatch that shows only for two factors together is caught.
L9 = [(0, 0, 0, 0), (0, 1, 1, 1), (0, 2, 2, 2), (1, 0, 1, 2), (1, 1, 2, 0), (1, 2, 0, 1),
      (2, 0, 2, 1), (2, 1, 0, 2), (2, 2, 1, 0)]  # fmt: skip
PAIRWISE = [(METHODS[a], ARCHS[b], BATCHES[c % 2], SIZES[d % 2]) for a, b, c, d in L9]


def test_the_cases_cover_every_pair():
    values = (METHODS, ARCHS, BATCHES, SIZES)
    for i in range(4):
        for j in range(i + 1, 4):
            pairs = {(case[i], case[j]) for case in PAIRWISE}
            assert len(pairs) == len(values[i]) * len(values[j]), (i, j)


@pytest.mark.parametrize(("method", "arch", "batch", "size"), PAIRWISE)
def test_matches_pytorch_grad_cam(method, arch, batch, size):
    net = _classifier(arch)
    net.cam_method = method
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        _, ours = net.logits_and_cams(x)
    with REFERENCE[method](model=net, target_layers=[net.features[-1]]) as reference:
        for c in range(ours.shape[1]):
            theirs = reference(input_tensor=x, targets=[ClassifierOutputTarget(c)] * batch)
            np.testing.assert_allclose(
                ours[:, c].numpy(), theirs, atol=TOL, err_msg=f"{method} {arch} class {c}"
            )


def test_methods_differ_where_they_should():
    net = _classifier("resnet18")
    x = torch.randn(2, 3, 64, 64)
    maps = {}
    for method in CAM_METHODS:
        net.cam_method = method
        with torch.no_grad():
            maps[method] = net.logits_and_cams(x)[1]
    assert torch.allclose(maps["cam"], maps["gradcam"], atol=1e-5)
    assert (maps["cam"] - maps["gradcam++"]).abs().max() > 1e-2


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_each_method_exports_with_parity(method, tmp_path):
    net = _classifier("resnet18")
    net.cam_method = method
    module = ClassifierGraph(net, multi_label=False).eval()
    spec = served_models(48, 4, 2)[CLASSIFIER]
    sample = (torch.randint(0, 256, (2, 48, 48, 3), dtype=torch.uint8),)
    path = export_onnx(module, spec, sample, tmp_path / "m.onnx")
    probe = (torch.randint(0, 256, (3, 48, 48, 3), dtype=torch.uint8),)
    errors = check_parity(module, path, spec, probe, atol=1e-4)
    assert errors["CAMS"] < 1e-4


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_class_group_cams_match_pytorch_grad_cam_on_the_group_logit(method):
    """A group's CAM is the map of its logit, logsumexp of its members' ImageNet logits."""
    groups = [[3, 7, 11], [20]]
    torch.manual_seed(0)
    net = build_classifier(
        "resnet18", num_classes=2, output_stride=16, head="imagenet", class_groups=groups
    ).eval()
    with torch.no_grad():
        net.fc.weight.mul_(20)
    net.cam_method = method

    class RawLogits(torch.nn.Module):  # the 1000 ImageNet logits, for the reference
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.forward_head(self.net.forward_features(x))

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, ours = net.logits_and_cams(x)
    with REFERENCE[method](model=RawLogits(net), target_layers=[net.features[-1]]) as reference:
        for g, ids in enumerate(groups):

            def target(output, ids=ids):
                return torch.logsumexp(output[ids], dim=0)

            theirs = reference(input_tensor=x, targets=[target] * 2)
            np.testing.assert_allclose(ours[:, g].numpy(), theirs, atol=TOL, err_msg=f"group {g}")
