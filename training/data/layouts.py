"""Readers for the two on-disk layouts our users' data arrives in, unchanged.

- Oxford-IIIT Pet: ``images/<Breed>_<n>.jpg``, ``annotations/trimaps/<name>.png``
  (1 foreground, 2 background, 3 boundary), ``annotations/{trainval,test}.txt`` with lines
  ``<name> <class id> <species> <breed id>``.
- PASCAL VOC 2012: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNG, class
  index per pixel, 255 on boundaries), ``ImageSets/Segmentation/{train,val}.txt``.

Training sees image-level labels only; masks are read for evaluation. Every mask is turned
into the one convention the rest of the project uses: class index per pixel, 255 = ignore.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.palette import IGNORE, VOC_PALETTE  # noqa: F401 (re-exported)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


class DataLayoutError(ValueError):
    """A data folder that is not in the layout its task expects."""


@dataclass(frozen=True)
class Sample:
    name: str
    image_path: Path
    mask_path: Path
    labels: tuple[int, ...]  # 0-based classifier class ids present in the image


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataLayoutError(f"{path} is missing: expected {what}")
    return path


@lru_cache(maxsize=8)
def _pets_index(root: str) -> tuple[dict[str, int], list[str]]:
    """Class id of every listed image, and class names ordered by id (from the file names)."""
    ann = Path(root) / "annotations"
    ids: dict[str, int] = {}
    names: dict[int, str] = {}
    for split in ("trainval", "test"):
        listing = _require(ann / f"{split}.txt", "the Oxford-IIIT Pet annotations lists")
        for line in listing.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                raise DataLayoutError(f"{listing}: bad line {line!r}")
            name, cls = parts[0], int(parts[1]) - 1
            ids[name] = cls
            names.setdefault(cls, name.rsplit("_", 1)[0])
    if sorted(names) != list(range(len(names))):
        raise DataLayoutError(f"{ann}: class ids are not contiguous from 1: {sorted(names)}")
    return ids, [names[i] for i in range(len(names))]


def read_class_names(root: str | Path, task: str) -> list[str]:
    root = Path(root)
    if task == "pets":
        return _pets_index(str(root))[1]
    if task == "voc":
        custom = root / "class_names.txt"
        if custom.exists():
            return [n.strip() for n in custom.read_text().splitlines() if n.strip()]
        return list(VOC_CLASSES)
    raise DataLayoutError(f"unknown task {task!r}: expected pets or voc")


def segmentation_classes(task: str, num_classes: int) -> int:
    """Segmenter outputs: background + pet (pets) or background + every class (voc)."""
    return 2 if task == "pets" else num_classes + 1


def list_samples(root: str | Path, task: str, split: str) -> list[Sample]:
    """The samples of ``split`` ("train" or "test") in a pets or voc folder."""
    root = Path(root)
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")
    if task == "pets":
        ids, _ = _pets_index(str(root))
        listing = root / "annotations" / ("trainval.txt" if split == "train" else "test.txt")
        names = [ln.split()[0] for ln in listing.read_text().splitlines() if ln.strip()]
        return [
            Sample(
                n,
                _require(root / "images" / f"{n}.jpg", "an image"),
                root / "annotations" / "trimaps" / f"{n}.png",
                (ids[n],),
            )
            for n in names
        ]
    if task == "voc":
        listing = (
            root / "ImageSets" / "Segmentation" / ("train.txt" if split == "train" else "val.txt")
        )
        _require(listing, "the VOC segmentation image set")
        out = []
        for n in (ln.strip() for ln in listing.read_text().splitlines()):
            if not n:
                continue
            mask_path = _require(root / "SegmentationClass" / f"{n}.png", "a VOC class mask")
            # Image-level labels are the classes present in the mask, as the WSSS literature
            # derives them (cls_labels from SegmentationClass); the pixels are never trained on.
            present = np.unique(np.asarray(Image.open(mask_path)))
            labels = tuple(int(c) - 1 for c in present if 0 < c < IGNORE)
            out.append(
                Sample(n, _require(root / "JPEGImages" / f"{n}.jpg", "an image"), mask_path, labels)
            )
        return out
    raise DataLayoutError(f"unknown task {task!r}: expected pets or voc")


def read_mask(sample: Sample, task: str) -> np.ndarray:
    """The ground-truth mask as class index per pixel (pets: 0 bg / 1 pet), 255 = ignore."""
    raw = np.asarray(Image.open(sample.mask_path))
    if task == "pets":
        mask = np.full(raw.shape, IGNORE, np.uint8)
        mask[raw == 1] = 1
        mask[raw == 2] = 0
        return mask
    return raw.astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 HxWx3, whatever the file's mode."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))
