"""Image decoding and resizing, shared by training, clients and the Triton pre/post-processing
models.

One implementation on both sides of the wire means that training, the bytes-in ensemble and a
client that resizes before sending produce identical pixels: Pillow decodes (by content, not
by the file's name: a GIF saved as .jpg reads as its first frame), OpenCV resizes (area
downsampling).
"""

from __future__ import annotations

import io
import re

import cv2
import numpy as np

from .configs import MAX_PIXELS
from .errors import InputError

MAX_ENCODED_BYTES = 64 << 20  # refuse larger uploads before decoding anything
# A progressive JPEG is decoded once per scan over the whole image: a 125 KB file of 4000 x
# 4000 px with its last 14-byte scan repeated 2000 times held the decoder (and every request
# queued behind it) for 15 s, and 64 MiB of such scans would hold it for hours. Encoders
# write 2-10 scans (libjpeg's progression; mozjpeg's optimised ones a few dozen at most).
MAX_JPEG_SCANS = 100
MAX_JPEG_SEGMENTS = 1000  # before the first scan: a phone's or Photoshop's photo holds 10-30
MAX_JPEG_STRAY = 64 << 10  # bytes between segments; encoders write none
MAX_SIDE = 16384  # decoded images and requested output sizes stay below this
# What Pillow may read: the photo formats, not every plugin it has (EPS would call Ghostscript).
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # MPO reads as JPEG


def _open(data: bytes):
    """Pillow's lazy open (the header only) of ``data``, in the photo formats alone."""
    from PIL import Image

    if data[:2] == b"\xff\xd8":  # a JPEG (an MPO too): its markers, before Pillow reads them
        check_jpeg(data)
    Image.init()  # every plugin registered: FORMATS names some Pillow loads only here
    return Image.open(io.BytesIO(data), formats=FORMATS)


class ImageError(InputError):
    """Bytes that are not a decodable image, or a size out of range."""


def header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the image's header, without decoding its pixels; None when the
    header is not one Pillow reads (``decode_image`` then refuses it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _open(data) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # decode_image says why
    return height, width


def check_pixels(size: tuple[int, int] | None, max_pixels: int = MAX_PIXELS) -> None:
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageError(
            f"image of {size[1]}x{size[0]} = {size[0] * size[1]:,} pixels exceeds the limit of "
            f"{max_pixels:,}: send it smaller"
        )


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded JPEG/PNG/GIF/BMP/WebP/TIFF/... -> RGB uint8 HxWx3, by Pillow: grey, palette,
    CMYK and 16-bit are converted, alpha dropped, an animated image gives its first frame.
    The pixels are as stored: EXIF orientation is not applied, in training (whose datasets'
    masks are drawn on the stored pixels) or served, so the masks line up with both.

    Images over ``max_pixels`` are refused from their header, before any pixel is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty image bytes")
    if len(data) > MAX_ENCODED_BYTES:
        raise ImageError(f"encoded image of {len(data)} bytes exceeds {MAX_ENCODED_BYTES}")
    unreadable = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError)
    try:
        image = _open(data)
    except ImageError:  # _open's own refusal, said as it is
        raise
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours
        raise ImageError(f"the image exceeds the limit of {max_pixels:,} pixels") from None
    except unreadable:
        image = None
    if image is None:
        raise ImageError("cannot decode the bytes as an image (JPEG, PNG, GIF, BMP, WebP, TIFF)")
    with image:
        width, height = image.size
        if max(width, height) > MAX_SIDE:
            raise ImageError(f"image of {width}x{height} exceeds {MAX_SIDE} px")
        check_pixels((height, width), max_pixels)
        try:
            image.seek(0)
            rgb = _rgb(image)
        except (*unreadable, Image.DecompressionBombError) as exc:
            raise ImageError(f"cannot decode the image ({exc})") from None
    return rgb


# Fill bytes (any run of 0xFF), then a marker.
_MARKER = re.compile(rb"\xff+([^\xff])")
# Where a scan's entropy-coded data ends: 0xFF followed by neither a stuffed 0x00 nor a
# restart marker (RST0-7) is the next marker.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")


def jpeg_scans(data: bytes) -> int:
    """The scans of a JPEG's first image, walked as libjpeg reads it: segments stepped over
    by their lengths (metadata may hold any byte: a Pet photo's hold 45 stray 0xFF 0xDA
    pairs), a scan's entropy-coded data to the next marker, stray bytes between segments
    skipped to the next 0xFF (the decoder skips them and reads on), an end-of-image before
    any scan read past (libjpeg takes what precedes it for tables), the walk ending at the
    first image's end (a Motion Photo's video after it is not read). Raises ImageError
    where more than MAX_JPEG_SEGMENTS segments, fill and stray bytes come before the image
    (Pillow reads those one at a time in Python: 30 MiB of fill took it 7 s) or more than
    MAX_JPEG_STRAY stray and fill bytes in all (libjpeg skips them at 14 MB/s)."""
    i, n, scans, before, stray = 2, len(data), 0, 0, 0  # after SOI
    while i < n:
        j = data.find(b"\xff", i)
        if j < 0:
            break
        found = _MARKER.match(data, j)
        if found is None:  # 0xFF at the very end
            break
        skipped = (j - i) + (found.start(1) - j - 1)  # stray bytes, then fill
        marker, i = found.group(1)[0], found.end()
        if marker == 0x00:  # a stuffed 0xFF outside a scan: stray bytes too
            skipped += 2
        stray += skipped
        if scans == 0:
            before += skipped + 1
        if before > MAX_JPEG_SEGMENTS or stray > MAX_JPEG_STRAY:
            raise ImageError(
                f"a JPEG of {stray:,} stray bytes and {before:,} segments before its image "
                f"(at most {MAX_JPEG_STRAY:,} and {MAX_JPEG_SEGMENTS:,})"
            )
        if marker == 0xD9:
            if scans:  # the first image's end
                break
            continue  # before any scan: tables only, and the image may follow
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length
            continue
        i += int.from_bytes(data[i : i + 2], "big")
        if marker == 0xDA:
            scans += 1
            end = _SCAN_END.search(data, i)
            if end is None:
                break
            i = end.start()
    return scans


def check_jpeg(data: bytes) -> None:
    """Refuse a JPEG whose reading would take far longer than its pixels' (``jpeg_scans``)."""
    if (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
        raise ImageError(f"a JPEG of {scans} scans exceeds {MAX_JPEG_SCANS}")


def _rgb(image) -> np.ndarray:
    """A writable RGB uint8 array of a Pillow image; 16- and 32-bit greyscale scaled to 8
    bits (Pillow's own conversion would clip them to white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.asarray(image).astype(np.int64)
        bits = 16 if image.mode.startswith("I;16") or grey.max(initial=0) < 1 << 16 else 32
        grey = (np.clip(grey, 0, (1 << bits) - 1) >> (bits - 8)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(image.convert("RGB"))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixels to (height, width): area averaging when shrinking, bilinear when enlarging."""
    h, w = size
    shrink = h <= image.shape[0] and w <= image.shape[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interp)


def output_size(size, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of ``size``, refused before anything of that size is allocated when a
    side is out of 1..MAX_SIDE or it has more than ``max_pixels`` pixels."""
    h, w = int(size[0]), int(size[1])  # Python ints: an int32 product would wrap
    if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE):
        raise ImageError(f"output size {h}x{w} is out of range (1..{MAX_SIDE})")
    if h * w > max_pixels:
        raise ImageError(
            f"output size {h}x{w} = {h * w:,} pixels exceeds the limit of {max_pixels:,} "
            "(an image's, export.max_image_pixels)"
        )
    return h, w


def resize_mask(
    mask: np.ndarray, size: tuple[int, int], max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """A class-index map to (height, width) by nearest neighbour (labels never blend); sizes
    as ``output_size`` allows."""
    h, w = output_size(size, max_pixels)
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)


def encode_png(image: np.ndarray) -> bytes:
    """RGB uint8 -> PNG bytes (lossless: the bytes ensemble decodes the same pixels)."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageError("cannot encode the image as PNG")
    return data.tobytes()
