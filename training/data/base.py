"""What every layout reader gives the rest of the project, whatever the files look like.

A reader lists the ``Sample`` s of a split, each with its image-level labels (0-based indices
into the reader's class names), and turns a sample's annotation into the one mask
convention the project uses: class index per pixel (0 background, class c as c + 1), 255 =
ignore. Training sees the labels only; masks are for evaluation and the supervised bound.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.errors import WsssError
from wsss.palette import IGNORE, VOC_PALETTE
from wsss.served.images import MAX_PIXELS, ImageError, decode_image, decode_resized


class DataLayoutError(WsssError, ValueError):
    """A data folder that is not in the layout it was said to be in; names the file."""


@dataclass(frozen=True)
class Sample:
    name: str
    image_path: Path
    # The file its mask comes from: a PNG, or for COCO the annotation file; None: no mask
    # (a plain folder without masks/), so nothing of it is scored.
    mask_path: Path | None
    labels: tuple[int, ...]  # 0-based classifier class ids present in the image
    layout: str | None = None  # the reader that listed it (None: the task's own layout)
    image_id: int | None = None  # COCO: the image's id in its annotation file


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataLayoutError(f"{path} is missing: expected {what}")
    return path


def read_png_mask(path: Path) -> np.ndarray:
    """A class-index PNG (palette or greyscale, as VOC and SBD write them) as uint8.

    Only a PNG: a lossy format (a JPEG saved under a mask's name) blurs the class indices
    at every edge into values of other classes, read as labels the photo does not hold.
    """
    try:
        with Image.open(path) as png:
            kind, mode, pixels = png.format, png.mode, np.asarray(png)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL: unreadable, truncated, empty
        raise DataLayoutError(f"{path}: not a readable PNG mask ({exc})") from None
    if kind != "PNG":
        raise DataLayoutError(
            f"{path}: a mask must be a PNG of class indices, not {kind} "
            "(a lossy format changes the indices at every edge)"
        )
    if mode not in ("P", "L"):
        raise DataLayoutError(
            f"{path}: a mask must be a palette or greyscale PNG of class indices, not {mode}"
        )
    return pixels.astype(np.uint8)


def read_text(path: Path) -> str:
    """A text file the user wrote (a class list, a labels CSV) as UTF-8, a byte-order mark
    (Excel's "CSV UTF-8") dropped; another encoding is one line saying so."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataLayoutError(
            f"{path}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}): "
            "save it as UTF-8 (in Excel: CSV UTF-8)"
        ) from None


def read_names(path: Path) -> list[str]:
    """A class-list file: one name a line, blank lines skipped; a name listed twice is
    refused (its masks' values would go to the last copy)."""
    names = [n.strip() for n in read_text(path).splitlines() if n.strip()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataLayoutError(f"{path}: {', '.join(repeated)} listed more than once")
    return names


def check_listed_once(listing: Path, ids: list[str]) -> list[str]:
    """``ids`` as ``listing`` gives them, each once: an image listed twice would be trained
    on twice, and could land in both the training and the validation part of the split."""
    seen: set[str] = set()
    twice = sorted({i for i in ids if i in seen or seen.add(i)})
    if twice:
        shown = ", ".join(twice[:3]) + (", ..." if len(twice) > 3 else "")
        raise DataLayoutError(f"{listing}: {len(twice)} image(s) listed more than once ({shown})")
    return ids


def png_palette(folder: Path) -> list[int] | None:
    """The colours of the first palette PNG in ``folder`` (256 RGB triples, VOC's past its
    end), or None where there is none: masks coloured as their authors chose."""
    first = next(iter(sorted(folder.glob("*.png"))), None) if folder.is_dir() else None
    if first is None:
        return None
    with Image.open(first) as png:
        colours = png.getpalette() if png.mode == "P" else None
    return None if colours is None else (colours + VOC_PALETTE[len(colours) :])[:768]


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image's header, without decoding it."""
    with Image.open(path) as img:
        return img.height, img.width


class Layout(abc.ABC):
    """One on-disk layout: its class names, the samples of a split, and their masks.

    Splits are ``train`` and ``test``; each layout maps them onto its own files.
    """

    name = ""  # its key in the registry (training.data.layouts.LAYOUTS)
    title = ""  # what the data is, for the line that says what was read
    tasks: tuple[str, ...] = ("voc",)  # the label semantics it can feed (wsss.config.TaskName)

    @abc.abstractmethod
    def class_names(self, root: Path) -> list[str]:
        """The classes, in the order of their indices (mask value n is the n-th)."""

    @abc.abstractmethod
    def samples(self, root: Path, split: str) -> list[Sample]:
        """The samples of ``split`` (train or test), with their image-level labels."""

    @abc.abstractmethod
    def source(self, root: Path, split: str) -> str:
        """Which files ``split`` is read from, e.g. ``ImageSets/Segmentation/train.txt``."""

    def mask(self, sample: Sample) -> np.ndarray:
        """Class index per pixel, 255 = ignore (the default: a class-index PNG)."""
        return read_png_mask(sample.mask_path)

    def palette(self, root: Path) -> list[int] | None:
        """The colours of the data's masks (768 ints), or None: VOC's colour map."""
        return None

    def class_info(self, root: Path) -> list[dict]:
        """What the data says of each class beyond its name (Pet: official id, species)."""
        return []


class UnreadableImageError(DataLayoutError):
    """A listed image that is missing or does not decode; names the file."""


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """RGB uint8 HxWx3 of whatever decodes, by content rather than by name: a PNG or GIF
    saved as ``.jpg`` (Oxford-IIIT Pet has a few), greyscale, palette, CMYK, or with an
    alpha channel (dropped). The server's decoder (``wsss.served.images.decode_image``), so
    training and serving read the same pixels. A missing or undecodable file, or one over
    ``max_pixels``, is an ``UnreadableImageError``."""
    return _read(path, lambda data: decode_image(data, max_pixels))


def read_resized(
    path: str | Path, size: tuple[int, int], max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """``read_image``'s photo at ``size`` (height, width), and its own (height, width): the
    server's ``decode_resized``, which decodes a large JPEG scaled down first, so a dataset
    holds the pixels the server classifies."""
    return _read(path, lambda data: decode_resized(data, size, max_pixels))


def _read(path: str | Path, decode):
    path = Path(path)
    if not path.is_file():
        what = "a folder, not an image" if path.is_dir() else "the image is missing"
        raise UnreadableImageError(f"{path}: {what}")
    try:
        return decode(path.read_bytes())
    except ImageError as exc:
        raise UnreadableImageError(f"{path}: {exc}") from None


__all__ = [
    "IGNORE",
    "DataLayoutError",
    "Layout",
    "UnreadableImageError",
    "Sample",
    "image_size",
    "png_palette",
    "read_image",
    "read_png_mask",
    "read_resized",
    "require",
]
