"""Image decoding and resizing, shared by clients and the Triton pre/post-processing models.

One implementation on both sides of the wire means the bytes-in ensemble and a client that
resizes before sending produce identical pixels (OpenCV decode, area downsampling).
"""

from __future__ import annotations

import cv2
import numpy as np

MAX_ENCODED_BYTES = 64 << 20  # refuse larger uploads before decoding anything
MAX_SIDE = 16384  # decoded images and requested output sizes stay below this


class ImageError(ValueError):
    """Bytes that are not a decodable image, or a size out of range."""


def decode_image(data: bytes) -> np.ndarray:
    """Encoded JPEG/PNG/BMP/WebP/... -> RGB uint8 HxWx3 (grey and alpha are converted)."""
    if not data:
        raise ImageError("empty image bytes")
    if len(data) > MAX_ENCODED_BYTES:
        raise ImageError(f"encoded image of {len(data)} bytes exceeds {MAX_ENCODED_BYTES}")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError("cannot decode the bytes as an image (JPEG, PNG, BMP, WebP, TIFF)")
    if max(bgr.shape[:2]) > MAX_SIDE:
        raise ImageError(f"image of {bgr.shape[1]}x{bgr.shape[0]} exceeds {MAX_SIDE} px")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixels to (height, width): area averaging when shrinking, bilinear when enlarging."""
    h, w = size
    shrink = h <= image.shape[0] and w <= image.shape[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interp)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A class-index map to (height, width) by nearest neighbour (labels never blend)."""
    h, w = int(size[0]), int(size[1])
    if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE):
        raise ImageError(f"output size {h}x{w} is out of range (1..{MAX_SIDE})")
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
