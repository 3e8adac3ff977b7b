"""int8 graphs for CPU instances: ONNX Runtime's dynamic or static quantization, checked by
what it changes in the masks.

``quantize_dynamic`` stores the weights of MatMul / Gemm / Conv as 8-bit integers and
quantizes activations on the fly (``DynamicQuantizeLinear``, ``MatMulInteger``);
``quantize_static`` quantizes the activations too, with ranges calibrated on photos, so
nothing is measured at run time. How much faster depends on the CPU's integer kernels: on
this project's AMD EPYC with AVX-512 VNNI the default model's ViT-S/14 at 168 px took
33-35 ms dynamic and 20-22 ms static against 47 ms fp32 on one thread in two runs
(reports/bench/quantized.md; an earlier host without VNNI gave dynamic 0.81x its fp32 time).
The check is not a tolerance on floats, which int8 does not keep, but the agreement of what
the two graphs decide on the configured photos: for the ViT the foreground each saliency
map's Otsu threshold keeps, for a network its classes, its CAMs' masks and its masks
(``network_agreement``), fp32 against int8.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from pathlib import Path

import numpy as np

QUANTIZATIONS = ("none", "dynamic", "static")  # export.<model>.quantize


def quantize_graph(model: bytes) -> bytes:
    """An ONNX graph's bytes -> its dynamically quantized graph (weights uint8, ONNX Runtime's
    default and, on the Pet training photos, no worse than fp32; per-channel int8 weights
    lost 0.004 IoU there). Its upsampling ConvTransposes, which ``quantize_dynamic`` leaves
    in fp32, become Convs it quantizes first (``phase_convs``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = phase_convs(model)
    with _quiet(), tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model)
        quantize_dynamic(src, dst, weight_type=QuantType.QUInt8)
        return dst.read_bytes()


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantizer logs its advice (pre-process the graph first) and its
    calibration's progress on the root logger at every call: errors only, while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# The last static graphs made, by their fp32 graph and calibration inputs: a calibration is
# deterministic (min-max ranges) and takes about a minute for the ViT, which `wsss bench
# --quantized` would otherwise spend twice per side (its in-process rows, then its export).
_STATIC: dict[str, bytes] = {}
_STATIC_KEEP = 2


def quantize_static_graph(model: bytes, inputs: list[np.ndarray]) -> bytes:
    """``_quantize_static``, made once per graph and calibration inputs (the last two)."""
    digest = hashlib.sha256(model)
    for x in inputs:
        digest.update(repr((x.dtype.str, x.shape)).encode())
        digest.update(np.ascontiguousarray(x).tobytes())
    key = digest.hexdigest()
    if key not in _STATIC:
        while len(_STATIC) >= _STATIC_KEEP:
            del _STATIC[next(iter(_STATIC))]
        _STATIC[key] = _quantize_static(model, inputs)
    return _STATIC[key]


def _quantize_static(model: bytes, inputs: list[np.ndarray]) -> bytes:
    """An ONNX graph's bytes -> its statically quantized graph: weights int8 per output
    channel, activations uint8 with ranges calibrated (min-max) on ``inputs`` (the graph's
    own input, one array per photo), QDQ around every MatMul and Conv (``phase_convs``
    first). No activation is quantized at run time, which is what dynamic quantization
    spends its time on: the default model's ViT at 168 px took 20-22 ms against dynamic's
    33-35 on one thread (two runs), and on 120 Pet training photos its Otsu masks scored
    0.848 pooled IoU against fp32's 0.846 and dynamic's 0.837 (calibrated on 60 other
    training photos). Weights int8 with activations uint8 can saturate on a CPU without
    VNNI (ONNX Runtime's note on U8S8); export's mask check runs on the exporting machine."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = phase_convs(model)
    from training.attention import image_input

    name = image_input(onnx.load_from_string(model), "the graph to quantize").name

    class Photos(CalibrationDataReader):
        def __init__(self):
            self.left = iter(inputs)

        def get_next(self):
            x = next(self.left, None)
            return None if x is None else {name: x}

    with _quiet(), tempfile.TemporaryDirectory() as tmp:
        src, ready, dst = (Path(tmp) / f for f in ("fp32.onnx", "ready.onnx", "int8.onnx"))
        src.write_bytes(model)
        # ONNX Runtime's own advice before quantizing: its graph optimisations and shapes.
        quant_pre_process(str(src), str(ready), skip_symbolic_shape=True)
        quantize_static(
            str(ready),
            str(dst),
            Photos(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Conv"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_providers=["CPUExecutionProvider"],
            # A MatMul's output stays fp32: its consumer quantizes it where it needs to.
            # Quantized, ONNX Runtime fused each attention's Softmax between two of them
            # into QLinearSoftmax, 3.2 of the ViT's 28 ms against 0.5 for fp32's Softmax;
            # kept fp32, the 168 px ViT ran 18.5 ms against 22.5 on one thread, its masks
            # on 120 Pet training photos 0.848 pooled IoU against 0.847.
            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]},
        )
        return dst.read_bytes()


def phase_convs(model: bytes) -> bytes:
    """Each ConvTranspose that upsamples by its stride s with a kernel of 2s (padding s/2,
    the decoders' usual kernel 4, stride 2, padding 1) as the s x s Convs of a kernel 2 it
    is made of, one per output phase, interleaved by DepthToSpace: the same values (to
    float rounding), and ops ``quantize_dynamic`` quantizes (it has no ConvTranspose
    kernel). The bundled saliency ViT's decoder has three; on one thread of this project's
    CPU (AVX-512 VNNI) the int8 168 px ViT ran 33.4 -> 31.3 ms with them as int8 Convs.
    Every other ConvTranspose stays as it is."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load_from_string(model)
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 11:  # DepthToSpace's mode
        return model
    weights = {t.name: t for t in m.graph.initializer}
    nodes, replaced = [], set()
    for node in m.graph.node:
        made = _phases(node, weights, helper, numpy_helper)
        if made is None:
            nodes.append(node)
            continue
        more, inits = made
        nodes += more
        m.graph.initializer.extend(inits)
        replaced.update(node.input[1:])
    if not replaced:
        return model
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {i for node in nodes for i in node.input} | {o.name for o in m.graph.output}
    gone = {name for name in replaced if name not in used}  # read by nothing else now
    kept = [t for t in m.graph.initializer if t.name not in gone]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    return m.SerializeToString()


def _phases(node, weights, helper, numpy_helper):
    """``node``'s phase Convs and their weights, or None where it is not such a ConvTranspose
    (or its weights are not constants)."""
    if node.op_type != "ConvTranspose" or node.input[1] not in weights:
        return None
    if len(node.input) > 2 and node.input[2] and node.input[2] not in weights:
        return None
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    w = numpy_helper.to_array(weights[node.input[1]])  # [Cin, Cout, k, k]
    if w.ndim != 4 or a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", [1])):
        return None
    s = a.get("strides", [1, 1])
    if len(set(s)) != 1 or s[0] < 2 or s[0] % 2 or list(w.shape[2:]) != [2 * s[0]] * 2:
        return None
    s = s[0]
    if a.get("pads", [0] * 4) != [s // 2] * 4 or any(a.get("output_padding", [0])):
        return None
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or "output_shape" in a:
        return None
    bias = (
        numpy_helper.to_array(weights[node.input[2]])
        if len(node.input) > 2 and node.input[2]
        else np.zeros(w.shape[1], w.dtype)
    )
    # Output row o = s*i + k - s/2. Phase r = o mod s reads input rows m + d (m = o div s)
    # through kernel row k = r + s/2 - s*d: two taps d in {-1, 0} (r < s/2) or {0, 1}.
    inits, outs, nodes = [], [], []
    for rh in range(s):
        for rw in range(s):
            taps = [(-1, 0) if r < s // 2 else (0, 1) for r in (rh, rw)]
            kernel = np.empty((w.shape[1], w.shape[0], 2, 2), w.dtype)
            for i, dh in enumerate(taps[0]):
                for j, dw in enumerate(taps[1]):
                    kh, kw = rh + s // 2 - s * dh, rw + s // 2 - s * dw
                    kernel[:, :, i, j] = w[:, :, kh, kw].T
            pads = [1 if t[0] < 0 else 0 for t in taps] + [1 if t[1] > 0 else 0 for t in taps]
            name = f"{node.name or node.output[0]}_phase{rh}{rw}"
            inits += [
                numpy_helper.from_array(kernel, name + "_w"),
                numpy_helper.from_array(bias.astype(w.dtype), name + "_b"),
            ]
            nodes.append(
                helper.make_node(
                    "Conv",
                    [node.input[0], name + "_w", name + "_b"],
                    [name],
                    kernel_shape=[2, 2],
                    pads=pads,
                )
            )
            outs.append(name)
    stacked = f"{node.name or node.output[0]}_phases"
    nodes += [
        helper.make_node("Concat", outs, [stacked], axis=1),
        helper.make_node("DepthToSpace", [stacked], list(node.output), blocksize=s, mode="DCR"),
    ]
    return nodes, inits


def is_quantized(model: bytes) -> bool:
    import onnx

    ops = {node.op_type for node in onnx.load_from_string(model).graph.node}
    int8 = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul"}
    return bool(ops & (int8 | {"QuantizeLinear"}))


def map_agreement(reference, served, images: np.ndarray) -> dict[str, float]:
    """How far ``served``'s ViT maps are from ``reference``'s on ``images`` (uint8 [N, H, W,
    3]); each is ``images -> [N, 224, 224]`` maps (``OnnxSaliency``, ``OnnxMaps``): the IoU
    of their Otsu foregrounds pooled over the images, the share of pixels that agree, and
    the largest change of a map value."""
    from wsss.served.classical import otsu_foreground

    inter = union = same = pixels = 0
    worst = 0.0
    for image in images:
        sa, sb = reference(image[None])[0], served(image[None])[0]
        fa, fb = otsu_foreground(sa), otsu_foreground(sb)
        inter += int((fa & fb).sum())
        union += int((fa | fb).sum())
        same += int((fa == fb).sum())
        pixels += fa.size
        worst = max(worst, float(np.abs(sa - sb).max()))
    return {
        "mask_iou": inter / union if union else 1.0,
        "pixel_agreement": same / pixels if pixels else 1.0,
        "max_abs_map": worst,
        "images": len(images),
    }


def network_agreement(
    spec,
    fp32: bytes,
    int8: bytes,
    images: np.ndarray,
    labels: list[tuple[int, ...] | None] | None = None,
    presence: float | list[float] | None = None,
    cam_threshold: float = 0.5,
    kept: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, float]:
    """How far a network's int8 graph is from its fp32 graph on ``images`` (uint8 [N, H, W,
    3], one at a time as served), read off its outputs' spec. Its class scores (SCORES, one
    per class): the share of images whose top class stays, and with ``presence`` (the
    served score threshold, one or one per class: a multi-label classifier) the share whose
    set of present classes stays, and the largest change of a score. Its CAMs (CAMS): the
    mIoU of int8's CAM masks with fp32's (each pixel to its strongest class where that CAM
    reaches ``cam_threshold``, else background), what every served mask starts from. Its
    masks (uint8 outputs): the pixels that agree and the mIoU of int8's with fp32's as the
    reference. Any other float output: its largest change. With ``labels`` (each image's
    true classes, indices into SCORES; None where not known), each form's accuracy too: the
    top class against the one true class of single-class photos (``top1_fp32`` /
    ``top1_int8``), and the mAP over every labelled photo (``map_fp32`` / ``map_int8``).
    What the check is for is whether the int8 graph keeps the decisions and the masks,
    which int8 does not keep to a float tolerance. ``kept``: filled with each output's
    (fp32, int8) arrays by name, for a caller that scores them further."""
    import onnxruntime as ort

    from training.metrics import average_precision
    from wsss.tensors import CAMS, SCORES

    sessions = [ort.InferenceSession(g, providers=["CPUExecutionProvider"]) for g in (fp32, int8)]
    names = [o.name for o in spec.outputs]
    got = [[s.run(names, {spec.inputs[0].name: image[None]}) for image in images] for s in sessions]
    out: dict[str, float] = {"images": len(images)}
    for k, t in enumerate(spec.outputs):
        a = np.concatenate([r[k] for r in got[0]])
        b = np.concatenate([r[k] for r in got[1]])
        if kept is not None:
            kept[t.name] = (a, b)
        if t.name == SCORES:
            out["top_class_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
            if presence is not None:
                cut = np.asarray(presence, np.float32)
                same = ((a >= cut) == (b >= cut)).all(1)
                out["present_class_agreement"] = float(same.mean())
            out["max_abs_score"] = float(np.abs(a - b).max())
            if labels is not None:
                out |= _accuracy(a, b, labels, average_precision)
        elif t.name == CAMS:
            masks = [_cam_masks(x, cam_threshold) for x in (a, b)]
            out["cams_miou"] = _label_miou(*masks)
            out["max_abs_cams"] = float(np.abs(a - b).max())
        elif t.dtype == "uint8":
            out[f"{t.name.lower()}_miou"] = _label_miou(a, b)
            out[f"{t.name.lower()}_pixel_agreement"] = float((a == b).mean())
        else:
            out[f"max_abs_{t.name.lower()}"] = float(np.abs(a - b).max())
    return out


def _cam_masks(cams: np.ndarray, threshold: float) -> np.ndarray:
    """CAMs [N, C, H, W] -> masks [N, H, W]: each pixel's strongest class + 1 where its CAM
    reaches ``threshold``, else 0."""
    return np.where(cams.max(1) >= threshold, cams.argmax(1) + 1, 0).astype(np.int64)


def _label_miou(reference: np.ndarray, other: np.ndarray) -> float:
    """mIoU of ``other``'s label masks against ``reference``'s, over the labels either holds."""
    from training.metrics import ConfusionMatrix

    n = int(max(reference.max(), other.max())) + 1
    matrix = ConfusionMatrix(n)
    matrix.update(other, reference)
    return float(np.nanmean(matrix.iou()))


def _accuracy(fp32: np.ndarray, int8: np.ndarray, labels, average_precision) -> dict[str, float]:
    """Each form's top-class accuracy on the photos of one known class and mAP over the
    photos with known classes (``network_agreement``); nothing where no photo is known."""
    known = [i for i, held in enumerate(labels) if held is not None]
    single = [i for i in known if len(labels[i]) == 1]
    out = {}
    if single:
        truth = np.array([labels[i][0] for i in single])
        out["top1_fp32"] = float((fp32[single].argmax(1) == truth).mean())
        out["top1_int8"] = float((int8[single].argmax(1) == truth).mean())
        out["labelled_photos"] = len(single)
    if known and fp32.shape[1] > 1:
        truth = np.zeros((len(known), fp32.shape[1]), bool)
        for row, i in enumerate(known):
            truth[row, list(labels[i])] = True
        out["map_fp32"] = average_precision(fp32[known], truth)
        out["map_int8"] = average_precision(int8[known], truth)
    return out
