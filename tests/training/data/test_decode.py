"""Training reads images with the server's decoder: a GIF named .jpg, an unreadable file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from training.data.base import UnreadableImageError, read_image
from wsss.served.images import ImageError, decode_image, encode_png


def _animated_gif(frames: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    first, *rest = [Image.fromarray(f).quantize(64) for f in frames]
    first.save(buf, format="GIF", save_all=True, append_images=rest)
    return buf.getvalue()


def test_training_and_serving_read_a_gif_named_jpg_as_its_first_frame(tmp_path):
    """The full Oxford-IIIT Pet release ships a GIF named .jpg (Abyssinian_34.jpg): training,
    ``wsss infer`` and the server read it with one decoder, as its first frame."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (12, 20, 3), np.uint8) for _ in range(2)]
    blob = _animated_gif(frames)
    with Image.open(io.BytesIO(blob)) as gif:
        assert gif.n_frames == 2
        expected = np.asarray(gif.convert("RGB"))  # the first frame's palette colours
    path = tmp_path / "Abyssinian_34.jpg"
    path.write_bytes(blob)
    decoded = decode_image(blob)
    assert decoded.shape == (12, 20, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(read_image(path), decoded)
    # The same pixels as a PNG decode the same: the format does not change the input.
    np.testing.assert_array_equal(decode_image(encode_png(decoded)), decoded)
    with pytest.raises(ImageError, match="exceeds the limit of 100"):
        decode_image(blob, max_pixels=100)


def test_unreadable_files_name_themselves(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UnreadableImageError, match="broken.jpg: cannot decode"):
        read_image(bad)
    with pytest.raises(UnreadableImageError, match="missing"):
        read_image(tmp_path / "absent.jpg")
    (tmp_path / "album").mkdir()
    with pytest.raises(UnreadableImageError, match="album: a folder, not an image"):
        read_image(tmp_path / "album")


def test_training_resizes_a_photo_as_the_server_does(tmp_path):
    """A photo smaller than the model size on one side (21 of the shared Pet photos): the
    dataset holds the pixels the server's decoder and resize give (bilinear where a side
    grows, area where it shrinks), not an area resize of both, which differs by up to 56
    grey levels on such a photo."""
    import cv2

    from training.data import list_samples
    from training.data.dataset import WSSSDataset
    from training.data.synth import SynthOptions, write_synth
    from wsss.served.images import resize_image

    size = 48
    root = write_synth(tmp_path / "folder", SynthOptions("pets", 12, size, 5, layout="folder"))
    sample = list_samples(root, "pets", "test", "folder")[0]
    y, x = np.mgrid[0:70, 0:30]
    photo = np.stack([(y * 3) % 256, (x * 8) % 256, (x * y) % 256], -1).astype(np.uint8)
    Image.fromarray(photo).save(sample.image_path)  # 70 x 30: taller, narrower than 48
    mask = np.asarray(Image.open(sample.mask_path))
    Image.fromarray(cv2.resize(mask, (30, 70), interpolation=cv2.INTER_NEAREST)).save(
        sample.mask_path
    )
    data = WSSSDataset(root, "pets", "test", size, layout="folder")
    served = resize_image(decode_image(sample.image_path.read_bytes()), (size, size))
    np.testing.assert_array_equal(data.images[0], served)
    area = cv2.resize(photo, (size, size), interpolation=cv2.INTER_AREA)
    assert np.abs(area.astype(int) - served).max() > 10  # the test tells the two apart


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _scene(h: int, w: int) -> np.ndarray:
    """skimage's cat, stretched to (h, w): a photo's textures at a phone photo's size."""
    import cv2
    import skimage.data

    return cv2.resize(skimage.data.chelsea(), (w, h), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize(("h", "w", "scaled"), [(1200, 1600, True), (800, 1000, False)])
def test_a_large_jpeg_is_decoded_scaled_down_as_training_and_the_server_read_it(
    tmp_path, h, w, scaled
):
    """``decode_resized`` decodes a JPEG four times the size or more at 1/2-1/8 of it
    (libjpeg's scaled IDCT, staying at twice the size or more) before the resize: the pixels
    stay within half a level of the full decode's, the original size is the file's, and the
    dataset holds exactly those pixels. A smaller JPEG, or a PNG of any size, reads exactly
    as the full decode and resize."""
    from training.data.base import read_resized
    from wsss.served.images import decode_resized, resize_image

    size = (224, 224)
    for blob, jpeg in ((_jpeg(_scene(h, w)), True), (encode_png(_scene(h, w)), False)):
        got, shape = decode_resized(blob, size)
        full = resize_image(decode_image(blob), size)
        assert shape == (h, w) and got.shape == (*size, 3) and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - full)
        if jpeg and scaled:
            assert 0 < diff.mean() < 0.5 and np.percentile(diff, 99) <= 2, diff.mean()
        else:
            np.testing.assert_array_equal(got, full)
        path = tmp_path / f"photo_{h}.{'jpg' if jpeg else 'png'}"
        path.write_bytes(blob)
        pixels, shape = read_resized(path, size)
        np.testing.assert_array_equal(pixels, got)
        assert shape == (h, w)
    with pytest.raises(ImageError, match="exceeds the limit of 1,000"):
        decode_resized(_jpeg(_scene(h, w)), size, max_pixels=1000)


@pytest.mark.parametrize("mode", ["L", "CMYK", "progressive"])
def test_every_jpeg_kind_is_scaled_as_it_is_decoded(mode):
    """Greyscale, CMYK and progressive JPEGs take the scaled decode too, close to their full
    decode; a wide photo at a wide size is scaled only when both of its sides allow it, so
    its width and height are not swapped: (h, w) = (400, 1600) at (100, 400) is decoded at
    half (800 x 200, twice the size), which it would not be with the sides swapped."""
    from wsss.served.images import decode_resized, resize_image

    scene = _scene(1200, 1600)
    buf = io.BytesIO()
    if mode == "progressive":
        Image.fromarray(scene).save(buf, "JPEG", quality=90, progressive=True)
    else:
        Image.fromarray(scene).convert(mode).save(buf, "JPEG", quality=90)
    blob = buf.getvalue()
    got, shape = decode_resized(blob, (224, 224))
    full = resize_image(decode_image(blob), (224, 224))
    assert shape == (1200, 1600) and got.shape == (224, 224, 3)
    assert 0 < np.abs(got.astype(int) - full).mean() < 0.5

    wide = _jpeg(_scene(400, 1600))
    got, shape = decode_resized(wide, (100, 400))
    full = resize_image(decode_image(wide), (100, 400))
    assert shape == (400, 1600) and got.shape == (100, 400, 3)
    assert 0 < np.abs(got.astype(int) - full).mean() < 0.5
