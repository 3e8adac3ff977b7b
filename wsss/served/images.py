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
from pathlib import Path

import cv2
import numpy as np

from .configs import MAX_PIXELS
from .errors import InputError

MAX_ENCODED_BYTES = 64 << 20  # refuse larger uploads before decoding anything
# The file names a folder of photos is read by (wsss infer's walks, the imagefolder layout):
# what the decoder reads, by name (a name given alone is decoded whatever it is called).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
# A progressive JPEG is decoded once per scan over the whole image: a 125 KB file of 4000 x
# 4000 px with its last 14-byte scan repeated 2000 times held the decoder (and every request
# queued behind it) for 15 s, and 64 MiB of such scans would hold it for hours. Encoders
# write 2-10 scans (libjpeg's progression; mozjpeg's optimised ones a few dozen at most).
MAX_JPEG_SCANS = 100
# Each scan decodes the whole image: 100 scans of 40 MP took 3 s, arithmetic-coded 4-7 s
# from a 1-2 KB file. Scans x pixels above this (libjpeg's 10 scans of 40 MP: 0.4e9) are
# refused, and arithmetic coding, which no camera, phone or browser writes, altogether.
MAX_JPEG_SCAN_PIXELS = 20 * MAX_PIXELS
# Segments before the first scan (a phone's or Photoshop's photo holds 10-30), and again
# after it (a 100-scan file holds about 300); each is a step of a Python loop.
MAX_JPEG_SEGMENTS = 1000
MAX_JPEG_STRAY = 64 << 10  # bytes between segments; encoders write none
# Other formats' structures Pillow walks in Python, a block at a time, before the pixels:
# 655k empty PNG chunks took it 3 s (8 MB), 30M one-byte GIF comment sub-blocks 12 s and
# 2.8 GB (63 MB), an animated WebP's 1.26M frames 1.1 GB. Counted first, and capped at a
# fixed number plus one per what a real file's blocks hold (libpng writes 8 KiB IDATs, a
# GIF's sub-blocks are 255 bytes).
MAX_PNG_CHUNKS = 1000  # + one per 4 KiB of the file
MAX_GIF_BLOCKS = 1000  # sub-blocks before the first frame, + one per 32 bytes
# Pillow 12 (the serve-gpu image's) joins a comment's sub-blocks one at a time: 7.8 MiB of
# it took 12 s.
MAX_GIF_COMMENT = 64 << 10
MAX_WEBP_CHUNKS = 10_000  # an animated WebP's frames among them
# A TIFF's first directory, which Pillow parses whole at open: its entries (a real one holds
# 10-50; 65k took 1 s), and its strips or tiles (15M strip offsets took 2 s to parse at
# each open; a 40 MP image in 16 px tiles, 156k of them, 2.3 s to decode).
MAX_TIFF_ENTRIES = 1000
MAX_TIFF_BLOCKS = 65_536
# Numbers in those directories (a 16-bit colour map holds 196,608; 2M fractions in an EXIF
# directory took 5.6 s and 395 MB to unpack).
MAX_TIFF_VALUES = 6 << 16
# What Pillow reads as a TIFF (TiffImagePlugin.PREFIXES: two byte orders it reads either way
# round, and BigTIFF).
TIFF_PREFIXES = (b"MM\x00*", b"II*\x00", b"MM*\x00", b"II\x00*", b"MM\x00+", b"II+\x00")
MAX_SIDE = 16384  # decoded images and requested output sizes stay below this
# What Pillow may read: the photo formats, not every plugin it has (EPS would call Ghostscript).
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # MPO reads as JPEG


def _open(data: bytes, max_pixels: int = MAX_PIXELS):
    """Pillow's lazy open (the header only) of ``data``, in the photo formats alone, its
    structure checked first (``check_structure``) and its coding after (``check_coding``).
    Empty bytes and a file over ``MAX_ENCODED_BYTES`` are refused before anything reads
    them: the structure walks take time in proportion to the file's length."""
    from PIL import Image

    if not data:
        raise ImageError("empty image bytes")
    if len(data) > MAX_ENCODED_BYTES:
        raise ImageError(f"encoded image of {len(data):,} bytes exceeds {MAX_ENCODED_BYTES:,}")
    check_structure(data, max_pixels)
    Image.init()  # every plugin registered: FORMATS names some Pillow loads only here
    image = Image.open(io.BytesIO(data), formats=FORMATS)
    try:
        check_coding(image)
    except ImageError:
        image.close()
        raise
    return image


def check_structure(data: bytes, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse, before Pillow parses anything, a file whose structure would take Pillow far
    longer to walk than its pixels to decode: a JPEG by its markers (``check_jpeg``), a
    PNG's chunks, a GIF's blocks before its first frame, a WebP's chunks, a TIFF's first
    directory, each counted."""
    if data[:2] == b"\xff\xd8":  # a JPEG (an MPO too)
        check_jpeg(data, max_pixels)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        _check_png(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        _check_gif(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        _check_webp(data)
    elif data[:4] in TIFF_PREFIXES:
        _check_tiff(data)


def check_coding(image) -> None:
    """Refuse codings whose decoders in Pillow run a Python step per few pixels: BMP's
    run-length codings (a 10 KB RLE8 file took 11 s), and JPEG inside TIFF, which the JPEG
    checks never see (a 1.2 KB arithmetic-coded strip took 3.8 s). Cameras and scanners
    write neither; send the JPEG itself, or PNG."""
    if image.format == "BMP" and image.info.get("compression") in (1, 2):
        raise ImageError("a run-length coded BMP is not read: send it as PNG or plain BMP")
    if image.format == "TIFF" and image.tag_v2.get(259) in (6, 7):
        raise ImageError("a TIFF holding JPEG is not read: send the JPEG itself, or PNG")


def _too_many(kind: str, what: str, limit: int) -> ImageError:
    return ImageError(f"a {kind} of more than {limit:,} {what} (its structure, not its pixels)")


def _check_png(data: bytes) -> None:
    """At most MAX_PNG_CHUNKS chunks plus one per 4 KiB, up to where Pillow stops reading:
    IEND, or in a PNG it reads as animated the next frame's control chunk after the image
    data (it reads the first frame alone). Animated as Pillow decides: one acTL before the
    first image data, frames in (0, 2^31], and more than one or the default image among
    them."""
    i, n, chunks = 8, len(data), 0
    limit = MAX_PNG_CHUNKS + n // 4096
    frames, controls, framed, pixels, animated = 0, 0, False, False, False
    while i + 8 <= n:
        kind = data[i + 4 : i + 8]
        if kind == b"IEND" or (animated and kind == b"fcTL"):
            return
        if not pixels:  # what Pillow's open reads: up to the first image data
            if kind == b"acTL":
                controls += 1
                frames = int.from_bytes(data[i + 8 : i + 12], "big")
            framed = framed or kind == b"fcTL"
            if kind in (b"IDAT", b"fdAT"):
                pixels = True
                valid = controls == 1 and 0 < frames <= 1 << 31
                animated = valid and (frames > 1 or not framed)
        chunks += 1
        if chunks > limit:
            raise _too_many("PNG", "chunks", limit)
        i += 12 + int.from_bytes(data[i : i + 4], "big")  # length, type, data, CRC


def _check_gif(data: bytes) -> None:
    """At most MAX_GIF_BLOCKS blocks plus one per 32 bytes before the first frame (the only
    one read), and MAX_GIF_COMMENT bytes of comments there, walked as Pillow's
    ``GifImageFile._seek`` walks them: a stray byte skipped, a comment's sub-blocks up to an
    empty one, any other extension's first sub-block (and NETSCAPE2.0's loop block) and then
    sub-blocks up to an empty one, even when the first was empty."""
    n = len(data)
    if n < 13:
        return  # Pillow says why
    i = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # the global colour table
    blocks, limit, comment = 0, MAX_GIF_BLOCKS + n // 32, 0

    def block(step: int = 1) -> int:  # one block: Pillow's data(), or a stray byte
        nonlocal i, blocks
        blocks += 1
        if blocks > limit:
            raise _too_many("GIF", "blocks before its first frame", limit)
        size = data[i] if step and i < n else 0
        i += step + size if step else 1
        return size

    while i < n and data[i] not in (0x2C, 0x3B):  # up to the first frame, or the trailer
        if data[i] != 0x21:
            block(0)  # a stray byte, skipped
            continue
        label, i = (data[i + 1] if i + 1 < n else -1), i + 2
        size = block()
        if label == 0xFE:  # a comment, whose sub-blocks Pillow joins
            while size:
                comment += size
                if comment > MAX_GIF_COMMENT:
                    raise ImageError(f"a GIF comment of more than {MAX_GIF_COMMENT:,} bytes")
                size = block()
            continue
        if label == 0xFF and size and data[i - size : i - size + 11] == b"NETSCAPE2.0":
            block()  # its loop count, whatever its size
        while block():
            pass


def _check_tiff(data: bytes) -> None:
    """The first directory (the only image read) and the EXIF, GPS and interoperability
    directories Pillow reads with it: at most MAX_TIFF_ENTRIES entries each, at most
    MAX_TIFF_BLOCKS strips or tiles, and at most MAX_TIFF_VALUES numbers in all (Pillow
    unpacks each into a Python object, a fraction four times the cost); classic TIFF and
    BigTIFF."""
    order = "little" if data[:2] == b"II" else "big"
    big = data[2] == 0x2B  # BigTIFF, as Pillow reads the header: 8-byte counts and offsets
    word = 8 if big else 4
    count_size, entry_size = (8, 20) if big else (2, 12)

    def number(at: int, size: int) -> int:
        return int.from_bytes(data[at : at + size], order)

    values, seen = 0, set()
    directories = [number(8 if big else 4, word)]
    while directories:
        at = directories.pop()
        if at in seen or at + count_size > len(data):
            continue  # Pillow says why, or reads it once
        seen.add(at)
        entries = number(at, count_size)
        if entries > MAX_TIFF_ENTRIES:
            raise _too_many("TIFF", "directory entries", MAX_TIFF_ENTRIES)
        for k in range(entries):
            entry = at + count_size + k * entry_size
            if entry + entry_size > len(data):
                break
            tag, kind, count = number(entry, 2), number(entry + 2, 2), number(entry + 4, word)
            if tag in (273, 279, 324, 325) and count > MAX_TIFF_BLOCKS:
                raise _too_many("TIFF", "strips or tiles", MAX_TIFF_BLOCKS)
            if kind not in (1, 2, 6, 7):  # bytes, text and undefined stay bytes
                values += count * (4 if kind in (5, 10) else 1)  # (signed) fractions
                if values > MAX_TIFF_VALUES:
                    raise _too_many("TIFF", "numbers in its directories", MAX_TIFF_VALUES)
            if tag in (34665, 34853, 40965):  # EXIF, GPS, interoperability: a directory
                directories.append(number(entry + 4 + word, word))


def _check_webp(data: bytes) -> None:
    """At most MAX_WEBP_CHUNKS chunks (an animated WebP's frames are chunks)."""
    i, n, chunks = 12, len(data), 0
    while i + 8 <= n:
        chunks += 1
        if chunks > MAX_WEBP_CHUNKS:
            raise _too_many("WebP", "chunks (an animation's frames)", MAX_WEBP_CHUNKS)
        size = int.from_bytes(data[i + 4 : i + 8], "little")
        i += 8 + size + (size & 1)


class ImageError(InputError):
    """Bytes that are not a decodable image, or a size out of range."""


def header_size(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int] | None:
    """(height, width) from the image's header, without decoding its pixels; None when the
    header is not one Pillow reads (``decode_image`` then refuses it)."""
    try:
        with _open(data, max_pixels) as image:
            width, height = image.size
    except ImageError:  # refused: decode_image says why
        return None
    except Exception as exc:
        if not raised_by_pillow(exc):  # our own code's: a bug, not the file's
            raise
        return None  # not a header Pillow reads: decode_image says why
    return height, width


def raised_by_pillow(exc: BaseException) -> bool:
    """Whether ``exc`` came out of Pillow's own code (its innermost Python frame is in the
    PIL package): what a malformed file makes Pillow raise, of any type, is the file's
    fault; an error of this module's code, or memory running out, is not."""
    if isinstance(exc, MemoryError):
        return False
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "PIL" in Path(tb.tb_frame.f_code.co_filename).parts


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
    masks are drawn on the stored pixels) or served, so the masks line up with both. A
    TIFF's own orientation tag (274) is the one exception: Pillow turns the image as the
    tag says (as OpenCV and libtiff's readers do), in training and served alike.

    Images over ``max_pixels`` are refused from their header, before any pixel is decoded.
    """
    return _decode(data, max_pixels)[0]


def decode_resized(
    data: bytes, size: tuple[int, int], max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """``data`` decoded as ``decode_image`` decodes it and resized to ``size`` (height,
    width) by ``resize_image``, and the image's own (height, width): what the server's
    preprocess model, training's datasets and a client sending pixels all read a photo as.

    A JPEG at least four times ``size`` on both sides is decoded at 1/2, 1/4 or 1/8 of its
    size, the smallest that stays at or above twice ``size`` (libjpeg's scaled inverse DCT,
    through Pillow's ``draft``), then resized: the area resize still averages 2 x 2 pixels
    or more, so the pixels stay within half a level of the full decode's (0.12 on average
    over the 16 largest Pet photos; at ``size`` itself they moved 1.5, up to 2.9), and a
    12 MP photo takes 30 ms instead of 150 (docs/serving.md). Other formats decode whole.
    """
    image, original = _decode(data, max_pixels, (2 * size[0], 2 * size[1]))
    return resize_image(image, size), original


def _decode(
    data: bytes, max_pixels: int, at_least: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """``decode_image``'s pixels (a JPEG's scaled down towards ``at_least``, (height,
    width), where given) and the image's own (height, width)."""
    from PIL import Image

    try:
        image = _open(data, max_pixels)
    except ImageError:  # _open's own refusal, said as it is
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, far above ours
        pixels = re.search(r"\((\d+) pixels\)", str(exc))  # it says the count, not the sides
        what = f"image of {int(pixels.group(1)):,} pixels" if pixels else "the image"
        pillows = 2 * (Image.MAX_IMAGE_PIXELS or 0)  # where it refuses rather than warns
        limit = f"{max_pixels:,}" if max_pixels < pillows else f"{pillows:,} (Pillow's own)"
        raise ImageError(f"{what} exceeds the limit of {limit}: send it smaller") from None
    except Exception as exc:
        if not raised_by_pillow(exc):
            raise
        raise ImageError(
            "cannot decode the bytes as an image (JPEG, PNG, GIF, BMP, WebP, TIFF)"
        ) from None
    with image:
        width, height = image.size
        if max(width, height) > MAX_SIDE:
            raise ImageError(f"image of {width}x{height} exceeds {MAX_SIDE} px")
        check_pixels((height, width), max_pixels)
        try:
            image.seek(0)  # before draft: an MPO's seek sets its frame's decoding anew
            if at_least is not None and image.format in ("JPEG", "MPO"):
                image.draft(None, (at_least[1], at_least[0]))
            rgb = _rgb(image)
        except Exception as exc:
            if isinstance(exc, ImageError) or not raised_by_pillow(exc):
                raise
            # A malformed file, whatever Pillow raises (OSError and ValueError mostly; a
            # TIFF tag of the wrong type a TypeError, a bad colour map an OverflowError):
            # the file's fault, never the server's 500.
            # Pillow's "image file is truncated (N bytes not processed)" counts a buffer's
            # leftover, not what is missing: say plainly that the file ends early.
            reason = "the file ends before its pixels do" if "truncated" in str(exc) else exc
            raise ImageError(f"cannot decode the image ({reason})") from None
    return rgb, (height, width)


# Fill bytes (any run of 0xFF), then a marker.
_MARKER = re.compile(rb"\xff+([^\xff])")
# Where a scan's entropy-coded data ends: 0xFF followed by neither a stuffed 0x00 nor a
# restart marker (RST0-7) is the next marker.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")


# Start-of-frame markers (the frame's size follows), and those of arithmetic coding.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_ARITHMETIC = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_scans(data: bytes) -> int:
    """The scans of a JPEG's first image (``jpeg_walk``)."""
    return jpeg_walk(data)[0]


def jpeg_walk(data: bytes) -> tuple[int, int]:
    """The scans of a JPEG's first image and its frame's pixels, walked as libjpeg reads
    it: segments stepped over by their lengths (metadata may hold any byte: a Pet photo's
    hold 45 stray 0xFF 0xDA pairs), a scan's entropy-coded data to the next marker, stray
    bytes between segments skipped to the next 0xFF (the decoder skips them and reads on),
    an end-of-image before any scan read past (libjpeg takes what precedes it for tables),
    the walk ending at the first image's end (a Motion Photo's video after it is not read).
    Raises ImageError where more than MAX_JPEG_SEGMENTS segments, fill and stray bytes come
    before the image (Pillow reads those one at a time in Python: 30 MiB of fill took it
    7 s), more than MAX_JPEG_SEGMENTS segments after its first scan (empty comments or
    restart markers between scans: 8 MB of them held the walk itself 4 s), more than
    MAX_JPEG_STRAY stray and fill bytes in all (libjpeg skips them at 14 MB/s), or for
    arithmetic coding."""
    i, n, scans, before, after, stray, pixels = 2, len(data), 0, 0, 0, 0, 0  # after SOI
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
        else:
            after += 1
        if before > MAX_JPEG_SEGMENTS or stray > MAX_JPEG_STRAY:
            raise ImageError(
                f"a JPEG of {stray:,} stray bytes and {before:,} segments before its image "
                f"(at most {MAX_JPEG_STRAY:,} and {MAX_JPEG_SEGMENTS:,})"
            )
        if after > MAX_JPEG_SEGMENTS:
            raise ImageError(f"a JPEG of more than {MAX_JPEG_SEGMENTS:,} segments between scans")
        if marker == 0xD9:
            if scans:  # the first image's end
                break
            continue  # before any scan: tables only, and the image may follow
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length
            continue
        if marker in _ARITHMETIC:
            raise ImageError(
                "an arithmetic-coded JPEG is not read (no camera or browser writes one): "
                "send it Huffman-coded, or as PNG"
            )
        if marker in _SOF and not pixels and i + 7 <= n:  # length, precision, height, width
            pixels = int.from_bytes(data[i + 3 : i + 5], "big") * int.from_bytes(
                data[i + 5 : i + 7], "big"
            )
        i += int.from_bytes(data[i : i + 2], "big")
        if marker == 0xDA:
            scans += 1
            end = _SCAN_END.search(data, i)
            if end is None:
                break
            i = end.start()
    return scans, pixels


def check_jpeg(data: bytes, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse a JPEG whose reading would take far longer than its pixels' (``jpeg_walk``):
    more than MAX_JPEG_SCANS scans, or scans x pixels above MAX_JPEG_SCAN_PIXELS (scaled
    with a pixel limit raised above the default). A frame over ``max_pixels`` is left to
    the pixel limit, which says so."""
    scans, pixels = jpeg_walk(data)
    if scans > MAX_JPEG_SCANS:
        raise ImageError(f"a JPEG of {scans} scans exceeds {MAX_JPEG_SCANS}")
    cap = MAX_JPEG_SCAN_PIXELS * max(max_pixels, MAX_PIXELS) // MAX_PIXELS
    if pixels <= max_pixels and scans * pixels > cap:
        raise ImageError(
            f"a JPEG of {scans} scans of {pixels:,} pixels each: more than "
            f"{cap // pixels} scans at that size are not read"
        )


def _rgb(image) -> np.ndarray:
    """A writable RGB uint8 array of a Pillow image; 16- and 32-bit greyscale scaled to 8
    bits (Pillow's own conversion would clip them to white): a 16-bit PNG (``I;16``) by its
    16 bits, a 32-bit integer one (``I``, TIFF) by the bits its values use (8, 16 or 32: a
    TIFF of 0-255 in 32-bit integers is 8-bit grey, not black), floats (``F``) in [0, 1]
    scaled to 0-255 and others clipped to it (NaN as 0)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.asarray(image)  # uint16 (I;16) or int32 (I): no wider copy (40 MP: 0.8 GB)
        if grey.dtype.kind == "i":
            grey = np.maximum(grey, 0).view(np.uint32 if grey.itemsize == 4 else np.uint16)
        top = int(grey.max(initial=0))
        bits = 16 if grey.itemsize == 2 else 8 if top < 1 << 8 else 16 if top < 1 << 16 else 32
        grey = (grey >> (bits - 8)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        grey = np.nan_to_num(np.asarray(image, np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if grey.max(initial=0.0) <= 1.0:
            grey = grey * 255.0
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    # convert() of an RGB image copies it: 0.15 of the 1.65 ms a Pet test photo takes to decode
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))


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
    """A class-index map to (height, width) by nearest neighbour (labels never blend), each
    output pixel taking the label under its centre, as the photo's pixels are resized
    (OpenCV's INTER_NEAREST takes the one under its top-left corner: half a source pixel
    off, which moved a 4x smaller mask by 1.5 photo pixels); sizes as ``output_size``
    allows."""
    h, w = output_size(size, max_pixels)
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)


def encode_png(image: np.ndarray) -> bytes:
    """RGB uint8 -> PNG bytes (lossless: the bytes ensemble decodes the same pixels)."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageError("cannot encode the image as PNG")
    return data.tobytes()
