"""int8 graphs for CPU instances: ONNX Runtime's dynamic quantization, checked by what it
changes in the masks.

``quantize_dynamic`` stores the weights of MatMul / Gemm / Conv as 8-bit integers and
quantizes activations on the fly (``DynamicQuantizeLinear``, ``MatMulInteger``). How much
faster depends on the CPU's integer kernels: on this project's AMD EPYC without VNNI the
default model's ViT-S/14 took 0.81x its fp32 time on one thread, 0.91x on two
(reports/bench/quantized.md); issue #32 reports 0.39x (53 vs 137 ms) from a CPU with
AVX-512 VNNI, not re-measured here. Its check is not a tolerance on floats, which int8 does
not keep, but the agreement of the masks the two graphs give on the configured photos: the
foreground each saliency map's Otsu threshold keeps, fp32 against int8.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

QUANTIZATIONS = ("none", "dynamic")  # export.<model>.quantize


def quantize_graph(model: bytes) -> bytes:
    """An ONNX graph's bytes -> its dynamically quantized graph (weights uint8, ONNX Runtime's
    default and, on the Pet training photos, no worse than fp32; per-channel int8 weights
    lost 0.004 IoU there)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graph first, every call
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(model)
            quantize_dynamic(src, dst, weight_type=QuantType.QUInt8)
            return dst.read_bytes()
    finally:
        root.setLevel(level)


def is_quantized(model: bytes) -> bool:
    import onnx

    ops = {node.op_type for node in onnx.load_from_string(model).graph.node}
    return bool(ops & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul"})


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
