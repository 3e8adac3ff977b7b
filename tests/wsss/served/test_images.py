"""Decoding client images: limits checked from the header, before any pixel is decoded."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from wsss.served.images import (
    MAX_GIF_BLOCKS,
    MAX_JPEG_SCAN_PIXELS,
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    MAX_JPEG_STRAY,
    MAX_PNG_CHUNKS,
    MAX_TIFF_BLOCKS,
    MAX_TIFF_ENTRIES,
    MAX_TIFF_VALUES,
    MAX_WEBP_CHUNKS,
    ImageError,
    check_jpeg,
    decode_image,
    encode_png,
    header_size,
    jpeg_scans,
)


def _png(size, mode="1") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_huge_image_is_refused_from_its_header(monkeypatch):
    blob = _png((12_000, 12_000))
    assert len(blob) < 1_000_000 and header_size(blob) == (12_000, 12_000)
    # Decoding would take seconds and 430 MB: it must not even start.
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a: pytest.fail("decoded"))
    with pytest.raises(ImageError, match="144,000,000 pixels exceeds the limit"):
        decode_image(blob)
    monkeypatch.undo()
    with pytest.raises(ImageError, match="exceeds the limit of 100"):
        decode_image(_png((20, 10), "RGB"), max_pixels=100)
    # A header past Pillow's own limit (2 x 89.5 MP) stops at its open: said alike, with
    # the count Pillow gives (it said "the image exceeds the limit", no size).
    blob = bytearray(_png((2, 2)))
    blob[16:24] = struct.pack(">II", 14_000, 14_000)  # IHDR's width and height
    blob[29:33] = struct.pack(">I", zlib.crc32(bytes(blob[12:29])))
    with pytest.raises(ImageError, match="image of 196,000,000 pixels exceeds the limit of 40"):
        decode_image(bytes(blob))
    with pytest.raises(ImageError, match="limit of 178,956,970 \\(Pillow's own\\)"):
        decode_image(bytes(blob), max_pixels=500_000_000)  # a limit raised past Pillow's


def test_png_round_trip_and_headers_of_non_images():
    image = np.random.default_rng(0).integers(0, 255, (17, 23, 3), np.uint8)
    assert np.array_equal(decode_image(encode_png(image)), image)
    assert header_size(b"not an image") is None
    with pytest.raises(ImageError, match="cannot decode"):
        decode_image(b"not an image")


def test_an_upload_over_the_byte_limit_is_refused_before_its_structure_is_walked(monkeypatch):
    """The structure walks take time in proportion to the file: preprocess reads each
    item's header first, so the byte limit is checked there, not after a 2 GB walk."""
    from wsss.served import images

    walked = []
    monkeypatch.setattr(images, "check_structure", lambda data, max_pixels: walked.append(1))
    big = b"GIF89a" + bytes(images.MAX_ENCODED_BYTES)
    assert header_size(big) is None and header_size(b"") is None
    with pytest.raises(ImageError, match="exceeds 67,108,864"):
        decode_image(big)
    with pytest.raises(ImageError, match="empty image bytes"):
        decode_image(b"")
    assert not walked
    header_size(encode_png(np.zeros((2, 2, 3), np.uint8)))
    assert walked  # the stand-in is the one the header read calls


def test_sixteen_bit_grey_scales_to_eight_bits_and_a_pillow_bomb_is_a_size_error():
    grey = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    decoded = decode_image(buf.getvalue())
    np.testing.assert_array_equal(decoded[..., 0], (grey >> 8).astype(np.uint8))
    assert decoded.flags.writeable and (decoded[..., 0] == decoded[..., 2]).all()
    # Past Pillow's own limit (179 MP) it refuses at open: still our 400, not a crash.
    bomb = _png((14_000, 14_000))
    assert header_size(bomb) is None
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(bomb)


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding(monkeypatch):
    """A progressive JPEG decodes once per scan over the whole image: one whose last scan is
    repeated (a few bytes each) would hold the decoder for as long as it is long. A real
    progressive JPEG decodes; one with more scans than any encoder writes is refused from
    its markers, no pixel decoded."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG", progressive=True)
    real = buf.getvalue()
    assert 2 <= jpeg_scans(real) == real.count(b"\xff\xda") <= 10  # libjpeg's progression
    assert decode_image(real).shape == (48, 64, 3)
    # Metadata may hold any bytes: stray 0xFF 0xDA pairs in it are no scans.
    icc = b"\xff\xda\x00\x07" * 500
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, "JPEG", progressive=True, icc_profile=icc)
    assert buf.getvalue().count(b"\xff\xda") > MAX_JPEG_SCANS
    assert jpeg_scans(buf.getvalue()) == jpeg_scans(real)
    assert decode_image(buf.getvalue()).shape == (48, 64, 3)
    last = real.rindex(b"\xff\xda")
    scan = real[last:-2]  # the last scan: its header and data, up to the end-of-image marker
    bomb = real[:-2] + scan * MAX_JPEG_SCANS + real[-2:]
    # The decoder skips stray bytes between segments and reads on: so does the count (an
    # empty comment and a junk byte after the first scan hid every scan after it).
    second = real.index(b"\xff\xda", real.index(b"\xff\xda") + 2)
    junk = real[:second] + b"\xff\xfe\x00\x02\x12" + bomb[second:]
    assert jpeg_scans(junk) == jpeg_scans(bomb) > MAX_JPEG_SCANS
    mpo = io.BytesIO()  # two pictures in one file, as phones write: Pillow's format MPO
    Image.new("RGB", (64, 48)).save(
        mpo, "MPO", save_all=True, append_images=[Image.new("RGB", (64, 48))], progressive=True
    )
    mpo = mpo.getvalue()
    end = mpo.index(b"\xff\xd9")  # the first picture's end
    mpo_bomb = mpo[:end] + scan * MAX_JPEG_SCANS + mpo[end:]
    # Before the first scan, Pillow reads each segment and fill byte in Python (30 MiB of
    # fill took it 7 s): more than MAX_JPEG_SEGMENTS is refused first.
    first = real.index(b"\xff\xda")
    filled = real[:first] + b"\xff" * (MAX_JPEG_SEGMENTS + 1) + real[first:]
    comments = real[:first] + b"\xff\xfe\x00\x02" * (MAX_JPEG_SEGMENTS + 1) + real[first:]
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a: pytest.fail("decoded"))
    # Stray bytes anywhere (libjpeg skips them, Pillow reads them one at a time before the
    # image): zeros, stuffed 0xFF 0x00 pairs.
    zeros = real[:first] + b"\x00" * (MAX_JPEG_SEGMENTS + 1) + real[first:]
    stuffed = real[:2] + b"\xff\x00" * MAX_JPEG_SEGMENTS + real[2:]
    late = real[:second] + b"\x00" * (MAX_JPEG_STRAY + 1) + real[second:]
    # An end-of-image before any scan is read past (libjpeg takes it for tables only).
    tables_first = b"\xff\xd8\xff\xd9" + bomb
    for data in (bomb, junk, mpo_bomb, tables_first):
        with pytest.raises(ImageError, match=f"scans exceeds {MAX_JPEG_SCANS}"):
            decode_image(data)
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("parsed"))
    for data in (filled, comments, zeros, stuffed, late):
        with pytest.raises(ImageError, match="stray bytes and .* segments before its image"):
            decode_image(data)
        assert header_size(data) is None  # preprocess reads the header first: refused too
    monkeypatch.undo()
    # What follows the first image's end is not read: a Motion Photo's video (random bytes
    # hold a 0xFF 0xDA pair every 64 KiB) is no scans.
    video = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    assert video.count(b"\xff\xda") > MAX_JPEG_SCANS
    assert jpeg_scans(real + video) == jpeg_scans(real)
    assert decode_image(real + video).shape == (48, 64, 3)


def _jpeg(size=(64, 48), **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def _with_size(jpeg: bytes, height: int, width: int) -> bytes:
    """``jpeg`` with its frame header saying another size (the walk reads only that)."""
    sof = max(jpeg.find(b"\xff\xc0"), jpeg.find(b"\xff\xc2"))
    at = sof + 5  # marker, length, precision
    return jpeg[:at] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[at + 4 :]


def test_jpeg_codings_and_scans_that_decode_far_slower_than_their_pixels_are_refused(
    monkeypatch,
):
    """Each scan decodes the whole frame: 100 scans of 40 MP took 3 s, arithmetic-coded
    ones 4-7 s from a 1 KB file. Scans x pixels are capped, arithmetic coding (no camera or
    browser writes it) refused, and segments between scans counted like those before."""
    real = _jpeg(progressive=True)
    last = real.rindex(b"\xff\xda")
    thirty = real[:-2] + real[last:-2] * (30 - jpeg_scans(real)) + real[-2:]
    assert jpeg_scans(thirty) == 30
    assert 30 * 6000 * 6000 > MAX_JPEG_SCAN_PIXELS >= 30 * 1000 * 1000
    check_jpeg(_with_size(thirty, 1000, 1000))  # 30 scans of 1 MP: read
    check_jpeg(_with_size(thirty, 6000, 6000), max_pixels=100_000_000)  # a raised limit
    check_jpeg(_with_size(thirty, 9000, 9000))  # over the pixel limit, which says so itself
    second = real.index(b"\xff\xda", real.index(b"\xff\xda") + 2)
    between = real[:second] + b"\xff\xfe\x00\x02" * (MAX_JPEG_SEGMENTS + 1) + real[second:]
    arithmetic = real.replace(b"\xff\xc2", b"\xff\xca", 1)  # progressive, arithmetic-coded
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("parsed"))
    cases = {
        _with_size(thirty, 6000, 6000): "30 scans of 36,000,000 pixels each",
        between: "more than 1,000 segments between scans",
        arithmetic: "an arithmetic-coded JPEG is not read",
        _jpeg().replace(b"\xff\xc0", b"\xff\xc9", 1): "an arithmetic-coded JPEG is not read",
    }
    for data, said in cases.items():
        with pytest.raises(ImageError, match=said):
            decode_image(data)
        assert header_size(data) is None  # preprocess reads the header first: refused too


def _chunk(kind: bytes, data: bytes = b"") -> bytes:
    body = kind + data
    return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")


def test_structures_pillow_walks_a_block_at_a_time_are_counted_first(monkeypatch):
    """Pillow walks PNG chunks, GIF blocks, WebP chunks and a TIFF's directory in Python
    before the pixels: 655k empty PNG chunks took it 3 s, one-byte GIF sub-blocks 12 s and
    2.8 GB. Each is counted before Pillow parses anything; real files are far below."""
    png = _png((40, 30), "RGB")
    iend = png.rindex(b"IEND") - 4
    few = png[:iend] + _chunk(b"abCd") * 100 + png[iend:]
    assert decode_image(few).shape == (30, 40, 3)
    many = png[:iend] + _chunk(b"abCd") * (MAX_PNG_CHUNKS + 1) + png[iend:]
    gif = io.BytesIO()
    Image.new("P", (8, 8)).save(gif, "GIF")
    gif = gif.getvalue()
    image = gif.index(b"\x2c", 13)  # the first frame's descriptor
    comment = b"\x21\xfe" + b"\x01x" * (2 * MAX_GIF_BLOCKS) + b"\x00"  # one-byte sub-blocks
    assert decode_image(gif[:image] + b"\x21\xfe\x03abc\x00" + gif[image:]).shape == (8, 8, 3)
    # XMP, as GIF holds it: raw bytes a reader walks as sub-blocks of 60-100 (100 KB here)
    xmp = b"\x21\xffXMP DataXMP" + (b"\x50" + b"x" * 0x50) * 1250 + b"\x00"
    assert decode_image(gif[:image] + xmp + gif[image:]).shape == (8, 8, 3)
    apng = io.BytesIO()  # 600 frames: two chunks each, after the first frame (never read)
    frames = [Image.new("RGB", (16, 16), (k % 256, 0, 0)) for k in range(600)]
    frames[0].save(apng, "PNG", save_all=True, append_images=frames[1:])
    assert apng.getvalue().count(b"fdAT") >= 599 and len(apng.getvalue()) < 600 * 4096
    assert decode_image(apng.getvalue()).shape == (16, 16, 3)
    chunks = b"".join(b"XYZW" + (0).to_bytes(4, "little") for _ in range(MAX_WEBP_CHUNKS + 1))
    webp = b"RIFF" + (4 + len(chunks)).to_bytes(4, "little") + b"WEBP" + chunks
    # A TIFF directory naming more strips than any real image has, or more entries, under
    # each header Pillow reads as a classic TIFF.
    tiffs = {}
    for prefix in (b"II*\x00", b"MM\x00*", b"MM*\x00", b"II\x00*"):
        order = "little" if prefix[:2] == b"II" else "big"
        strips = prefix + (8).to_bytes(4, order) + (1).to_bytes(2, order)
        strips += (273).to_bytes(2, order) + (4).to_bytes(2, order)
        strips += (MAX_TIFF_BLOCKS + 1).to_bytes(4, order) + (0).to_bytes(4, order)
        tiffs[strips] = f"a TIFF of more than {MAX_TIFF_BLOCKS:,} strips or tiles"
    entries = b"MM\x00*" + (8).to_bytes(4, "big") + (MAX_TIFF_ENTRIES + 1).to_bytes(2, "big")
    tiffs[entries] = f"a TIFF of more than {MAX_TIFF_ENTRIES:,} directory entries"
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("parsed"))
    cases = {
        many: f"a PNG of more than {MAX_PNG_CHUNKS + len(many) // 4096:,} chunks",
        gif[:image] + comment + gif[image:]: "a GIF of more than .* blocks before its first",
        # Pillow skips a stray byte and reads on: so does the count
        gif[:image] + b"\x00" + comment + gif[image:]: "a GIF of more than .* blocks before",
        webp: f"a WebP of more than {MAX_WEBP_CHUNKS:,} chunks",
        **tiffs,
    }
    for data, said in cases.items():
        with pytest.raises(ImageError, match=said):
            decode_image(data)


def test_codings_decoded_a_python_step_at_a_time_are_refused():
    """BMP's run-length codings (a 10 KB RLE8 file took 11 s) and JPEG inside TIFF (which
    the JPEG checks never see): refused from the header; plain BMP and LZW TIFF read."""
    bmp = io.BytesIO()
    Image.new("P", (16, 8)).save(bmp, "BMP")
    bmp = bmp.getvalue()
    assert decode_image(bmp).shape == (8, 16, 3)
    rle8 = bmp[:30] + (1).to_bytes(4, "little") + bmp[34:]  # biCompression = BI_RLE8
    with pytest.raises(ImageError, match="a run-length coded BMP is not read"):
        decode_image(rle8)
    for compression, read in (("tiff_lzw", True), ("jpeg", False)):
        tiff = io.BytesIO()
        Image.new("RGB", (16, 8)).save(tiff, "TIFF", compression=compression)
        if read:
            assert decode_image(tiff.getvalue()).shape == (8, 16, 3)
        else:
            with pytest.raises(ImageError, match="a TIFF holding JPEG is not read"):
                decode_image(tiff.getvalue())


def test_thirty_two_bit_grey_scales_to_eight_bits():
    grey = (np.arange(64 * 64, dtype=np.int32).reshape(64, 64) << 12) - 5  # past 16 bits
    buf = io.BytesIO()
    Image.fromarray(grey, "I").save(buf, "TIFF")
    decoded = decode_image(buf.getvalue())
    want = (np.maximum(grey, 0) >> 24).astype(np.uint8)
    np.testing.assert_array_equal(decoded[..., 0], want)


def test_integer_and_float_grey_read_by_the_range_they_use():
    """A 32-bit integer TIFF of 0-255 is 8-bit grey, not black; a float TIFF in [0, 1] is
    scaled to 0-255, a wider one clipped, NaN read as 0."""
    eight = np.arange(64 * 64, dtype=np.int32).reshape(64, 64) % 256
    buf = io.BytesIO()
    Image.fromarray(eight, "I").save(buf, "TIFF")
    np.testing.assert_array_equal(decode_image(buf.getvalue())[..., 1], eight.astype(np.uint8))
    sixteen = eight * 256 + 255  # 16 bits used in a 32-bit container
    buf = io.BytesIO()
    Image.fromarray(sixteen, "I").save(buf, "TIFF")
    np.testing.assert_array_equal(decode_image(buf.getvalue())[..., 0], eight.astype(np.uint8))
    unit = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    unit[0, 0] = np.nan
    buf = io.BytesIO()
    Image.fromarray(unit, "F").save(buf, "TIFF")
    decoded = decode_image(buf.getvalue())
    assert decoded[0, 0, 0] == 0 and decoded[-1, -1, 0] == 255
    np.testing.assert_allclose(decoded[1:, :, 2], np.rint(unit[1:] * 255), atol=0)
    wide = unit * 500
    wide[0, 0] = -3.0
    buf = io.BytesIO()
    Image.fromarray(wide, "F").save(buf, "TIFF")
    np.testing.assert_array_equal(
        decode_image(buf.getvalue())[..., 0], np.clip(np.rint(wide), 0, 255).astype(np.uint8)
    )


def _retype_tag(tiff: bytes, tag: int, kind: int) -> bytes:
    """A little-endian TIFF with ``tag``'s field type in its first directory set to ``kind``."""
    data = bytearray(tiff)
    assert data[:2] == b"II"
    first = int.from_bytes(data[4:8], "little")
    for k in range(int.from_bytes(data[first : first + 2], "little")):
        entry = first + 2 + 12 * k
        if int.from_bytes(data[entry : entry + 2], "little") == tag:
            data[entry + 2 : entry + 4] = kind.to_bytes(2, "little")
            return bytes(data)
    raise AssertionError(f"no tag {tag}")


def test_whatever_pillow_raises_on_a_malformed_file_is_a_decoding_error():
    """A TIFF whose StripOffsets are ASCII made Pillow raise TypeError, which left the
    decoder as a 500 (and stopped `wsss infer`); any exception from the file is the file's."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "TIFF")
    bad = _retype_tag(buf.getvalue(), 273, 2)  # StripOffsets as ASCII
    with pytest.raises(ImageError, match="cannot decode"):
        decode_image(bad)
    # a JPEG cut short says so, not Pillow's count of its buffer's leftover bytes
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(
        jpeg, "JPEG"
    )
    with pytest.raises(ImageError, match="the file ends before its pixels do"):
        decode_image(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])


@pytest.mark.parametrize("error", [NameError("bug"), MemoryError()])
def test_an_error_of_our_own_code_or_of_memory_is_no_decoding_error(monkeypatch, error):
    """Only what Pillow raises is the file's: a bug in this module, or memory running out,
    stays the server's 500 (a caught NameError would list every photo as unreadable)."""
    import wsss.served.images as images

    def broken(*args, **kwargs):
        raise error

    good = encode_png(np.zeros((8, 8, 3), np.uint8))
    for name in ("_rgb", "check_structure"):
        monkeypatch.setattr(images, name, broken)
        with pytest.raises(type(error)):
            decode_image(good)
        monkeypatch.undo()


def test_the_walks_follow_pillow_where_it_reads_on(monkeypatch):
    """Where Pillow reads further than a format's usual end, so does the count: a PNG with a
    frame control chunk but no animation (Pillow reads past it), a GIF's comment (Pillow 12
    joins its sub-blocks one at a time: 7.8 MiB took 12 s), a TIFF's EXIF directory (2M
    fractions took 5.6 s to unpack). Pillow's own animated GIF (loop, frame controls)
    reads."""
    png = _png((16, 16), "RGB")
    iend = png.rindex(b"IEND") - 4
    control = _chunk(b"fcTL", bytes(26))  # no acTL: not animated, Pillow reads on to IEND
    filler = _chunk(b"abCd") * (MAX_PNG_CHUNKS + 10)
    gif = io.BytesIO()
    frames = [Image.new("P", (8, 8), k) for k in range(3)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], loop=0, duration=50)
    gif = gif.getvalue()
    assert decode_image(gif).shape == (8, 8, 3)
    image = gif.index(b"\x2c", 13)
    comment = b"\x21\xfe" + (b"\xff" + b"x" * 255) * 300 + b"\x00"  # 76 KB: few blocks
    # a 1 x 1 TIFF whose EXIF directory holds one tag of MAX_TIFF_VALUES fractions
    head = b"II*\x00" + (8).to_bytes(4, "little")
    ifd = (1).to_bytes(2, "little") + (34665).to_bytes(2, "little") + (4).to_bytes(2, "little")
    ifd += (1).to_bytes(4, "little") + (26).to_bytes(4, "little") + bytes(4)
    sub = (1).to_bytes(2, "little") + (0x9286).to_bytes(2, "little") + (5).to_bytes(2, "little")
    sub += MAX_TIFF_VALUES.to_bytes(4, "little") + bytes(8)
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("parsed"))
    cases = {
        png[:iend] + control + filler + png[iend:]: "a PNG of more than",
        gif[:image] + comment + gif[image:]: "a GIF comment of more than 65,536 bytes",
        head + ifd + sub: f"a TIFF of more than {MAX_TIFF_VALUES:,} numbers",
    }
    for data, said in cases.items():
        with pytest.raises(ImageError, match=said):
            decode_image(data)


def test_pixels_come_as_stored_but_a_tiff_turns_as_its_own_tag_says():
    """A JPEG's EXIF orientation is not applied (datasets' masks are drawn on the stored
    pixels); a TIFF's orientation tag is, as Pillow, OpenCV and libtiff read it."""
    from PIL import TiffImagePlugin

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:5, :10] = 255  # a mark in the top-left corner
    jpeg, tiff = io.BytesIO(), io.BytesIO()
    exif = Image.Exif()
    exif[274] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(jpeg, format="JPEG", exif=exif.tobytes(), quality=100)
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[274] = 6
    Image.fromarray(stored).save(tiff, format="TIFF", tiffinfo=tags)

    as_stored = decode_image(jpeg.getvalue())
    assert as_stored.shape == (20, 40, 3) and as_stored[:5, :10].mean() > 200
    turned = decode_image(tiff.getvalue())
    assert turned.shape == (40, 20, 3)
    np.testing.assert_array_equal(turned, np.rot90(stored, k=-1))  # the mark at the top right
