"""Decoding client images: limits checked from the header, before any pixel is decoded."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from wsss.served.images import (
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    MAX_JPEG_STRAY,
    ImageError,
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


def test_png_round_trip_and_headers_of_non_images():
    image = np.random.default_rng(0).integers(0, 255, (17, 23, 3), np.uint8)
    assert np.array_equal(decode_image(encode_png(image)), image)
    assert header_size(b"not an image") is None
    with pytest.raises(ImageError, match="cannot decode"):
        decode_image(b"not an image")


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
