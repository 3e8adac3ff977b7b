"""One registry of readers for the on-disk layouts our users' data arrives in, unchanged.

- ``pets``, Oxford-IIIT Pet: ``images/<Breed>_<n>.jpg``, ``annotations/trimaps/<name>.png``
  (1 foreground, 2 background, 3 boundary), ``annotations/{trainval,test}.txt`` with lines
  ``<name> <class id> <species> <breed id>``.
- ``voc``, PASCAL VOC 2012: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette
  PNG, class index per pixel, 255 on boundaries), ``ImageSets/Segmentation/{train,val}.txt``.
- ``voc_aug``, VOC with SBD's augmented training set (the 10,582 images WSSS papers train
  on): ``ImageSets/Segmentation/train_aug.txt`` with masks in ``SegmentationClassAug/``;
  tested on VOC's own ``val.txt`` and ``SegmentationClass/``.
- ``coco`` (``coco2014``, ``coco2017``): ``training.data.coco``.
- ``folder``, your own photos: ``training.data.folder``.

``data.task`` says what the labels mean (pets: one per image, a binary foreground mask;
voc: multi-label, class masks) and ``data.layout`` where they are read from; unset, the
layout is the task's own. Every mask becomes the one convention the rest of the project
uses: class index per pixel, 255 = ignore.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from training.data.base import (
    DataLayoutError,
    Layout,
    Sample,
    check_listed_once,
    image_size,
    png_palette,
    read_image,
    read_names,
    read_png_mask,
    read_resized,
    require,
)
from training.data.coco import CocoLayout
from training.data.folder import FolderLayout
from training.data.imagefolder import ImageFolderLayout
from wsss.config import LAYOUTS as CONFIG_LAYOUTS
from wsss.errors import InputError
from wsss.palette import IGNORE, VOC_PALETTE
from wsss.task import get_task

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


# A photo's name as these layouts list it (<id>.jpg), and as cameras and some copies write
# it: the first that exists; none, the layout's own (the read then says it is missing).
JPEG_SUFFIXES = (".jpg", ".JPG", ".jpeg", ".JPEG", ".Jpg")


def jpeg(folder: Path, stem: str) -> Path:
    """``folder/<stem>.jpg``, or the same photo under another spelling of its suffix."""
    first = folder / f"{stem}{JPEG_SUFFIXES[0]}"
    if first.exists():
        return first
    return next((p for s in JPEG_SUFFIXES[1:] if (p := folder / f"{stem}{s}").exists()), first)


@dataclass(frozen=True)
class PetClass:
    """One class of a Pet listing: its official id (1-37 in the full release), its name from
    the file names, and its species (1 cat, 2 dog) as the lists give them."""

    official_id: int
    name: str
    species: int | None


@lru_cache(maxsize=8)
def _pets_index(root: str) -> tuple[dict[str, int], tuple[PetClass, ...]]:
    """The classifier class of every listed image, and the classes present, in the order of
    their official ids.

    Any subset of the official release reads as it comes: a user who keeps three breeds has
    ids such as 1, 2 and 6, which become classes 0, 1 and 2 (one classifier output per class
    present); the official ids and species are kept in ``PetClass``.
    """
    ann = Path(root) / "annotations"
    official: dict[str, int] = {}
    classes: dict[int, PetClass] = {}
    for split in ("trainval", "test"):
        listing = require(ann / f"{split}.txt", "the Oxford-IIIT Pet annotations lists")
        for line in listing.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) < 1:
                raise DataLayoutError(f"{listing}: bad line {line!r}")
            name, cls = parts[0], int(parts[1])
            species = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None
            breed = name.rsplit("_", 1)[0]
            known = classes.setdefault(cls, PetClass(cls, breed, species))
            if known.name.lower() != breed.lower():
                raise DataLayoutError(
                    f"{listing}: {name} has class id {cls}, which {known.name} images have too"
                )
            official[name] = cls
    order = {cls: i for i, cls in enumerate(sorted(classes))}
    ids = {name: order[cls] for name, cls in official.items()}
    return ids, tuple(classes[c] for c in sorted(classes))


class PetsLayout(Layout):
    title = "Oxford-IIIT Pet"
    tasks = ("pets",)

    def class_names(self, root: Path) -> list[str]:
        return [c.name for c in _pets_index(str(root))[1]]

    def class_info(self, root: Path) -> list[dict]:
        """Each class's official id and species (1 cat, 2 dog), in class order."""
        species = {1: "cat", 2: "dog"}  # the lists' species column
        return [
            dataclasses.asdict(c) | {"alias": species.get(c.species)}
            for c in _pets_index(str(root))[1]
        ]

    def _listing(self, root: Path, split: str) -> Path:
        return root / "annotations" / ("trainval.txt" if split == "train" else "test.txt")

    def source(self, root: Path, split: str) -> str:
        return str(self._listing(root, split))

    @staticmethod
    def _names(listing: Path) -> list[str]:
        lines = listing.read_text().splitlines()
        return [ln.split()[0] for ln in lines if ln.strip() and not ln.startswith("#")]

    def samples(self, root: Path, split: str) -> list[Sample]:
        ids, _ = _pets_index(str(root))
        listing = self._listing(root, split)
        names = check_listed_once(listing, self._names(listing))
        test = self._listing(root, "test")
        if split == "train" and test.exists():
            check_disjoint(listing, names, test, self._names(test))
        # Image files are checked as they are read (training.data.dataset), where a missing
        # or undecodable one is an error naming it, or is skipped and counted.
        return [
            Sample(
                n,
                jpeg(root / "images", n),
                root / "annotations" / "trimaps" / f"{n}.png",
                (ids[n],),
                self.name,
            )
            for n in names
        ]

    def mask(self, sample: Sample) -> np.ndarray:
        """Trimap 1 (pet) -> 1, 2 (background) -> 0, 3 (boundary) -> 255."""
        raw = read_png_mask(require(sample.mask_path, "a trimap"))
        mask = np.full(raw.shape, IGNORE, np.uint8)
        mask[raw == 1] = 1
        mask[raw == 2] = 0
        return mask


class VocLayout(Layout):
    """PASCAL VOC 2012; ``train_set`` / ``train_masks`` pick the training list and its masks
    (``train`` in ``SegmentationClass/``, or SBD's ``train_aug`` in ``SegmentationClassAug/``).
    The test split is always VOC's ``val``."""

    title = "PASCAL VOC 2012"

    def __init__(self, train_set: str = "train", train_masks: str = "SegmentationClass"):
        self.train_set, self.train_masks = train_set, train_masks

    def class_names(self, root: Path) -> list[str]:
        # Real VOC has fixed class names; a class list beside the data overrides them
        # (class_names.txt, or classes.txt as the folder layout and the shared COCO subset
        # name it).
        for custom in (root / "class_names.txt", root / "classes.txt"):
            if custom.exists():
                names = read_names(custom)
                if names and names[0].lower() in ("background", "__background__", "bg"):
                    raise DataLayoutError(
                        f"{custom}: list the classes without {names[0]!r} (mask value 0 is "
                        "background; the first name is value 1)"
                    )
                return names
        return list(VOC_CLASSES)

    def palette(self, root: Path) -> list[int] | None:
        return png_palette(root / "SegmentationClass")

    def _listing(self, root: Path, split: str) -> Path:
        name = self.train_set if split == "train" else "val"
        return root / "ImageSets" / "Segmentation" / f"{name}.txt"

    def _masks(self, root: Path, split: str) -> Path:
        return root / (self.train_masks if split == "train" else "SegmentationClass")

    def source(self, root: Path, split: str) -> str:
        name = self.train_set if split == "train" else "val"
        return f"{name} ({self._listing(root, split)}, masks in {self._masks(root, split).name}/)"

    def ids(self, listing: Path) -> list[str]:
        """Image ids, one a line; DeepLab's train_aug.txt writes ``/JPEGImages/<id>.jpg
        /SegmentationClassAug/<id>.png`` instead, which gives the same ids."""
        require(listing, f"the VOC segmentation image set {listing.stem}")
        return [Path(ln.split()[0]).stem for ln in listing.read_text().splitlines() if ln.strip()]

    def samples(self, root: Path, split: str) -> list[Sample]:
        listing = self._listing(root, split)
        ids = check_listed_once(listing, self.ids(listing))
        test = self._listing(root, "test")
        if split == "train" and test.exists():
            check_disjoint(listing, ids, test, self.ids(test))
        n_classes = len(self.class_names(root))
        masks = self._masks(root, split)
        out = []
        for n in ids:
            mask_path = require(masks / f"{n}.png", f"a class mask of an image in {listing}")
            # Image-level labels are the classes present in the mask, as the WSSS literature
            # derives them (cls_labels from SegmentationClass); the pixels are never trained on.
            present = [int(c) for c in np.unique(read_png_mask(mask_path)) if c != IGNORE]
            if present and present[-1] > n_classes:
                raise DataLayoutError(
                    f"{mask_path}: class index {present[-1]} is not in the class list "
                    f"({n_classes} classes)"
                )
            image = jpeg(root / "JPEGImages", n)  # missing: read_resized says so, or skips it
            out.append(Sample(n, image, mask_path, tuple(c - 1 for c in present if c), self.name))
        return out


def check_disjoint(train: Path, ids: list[str], test: Path, test_ids: list[str]) -> None:
    """The training list and the scored one must not share images: the scores would be on
    images the models were trained on (VOC's train_aug.txt and val.txt share none, nor do
    Oxford-IIIT Pet's trainval.txt and test.txt)."""
    shared = sorted(set(ids) & set(test_ids))
    if shared:
        raise DataLayoutError(
            f"{train}: {len(shared)} of its images are also in {test.name} (e.g. "
            f"{shared[0]}): evaluation would score images the models trained on"
        )


def _named(layouts: dict[str, Layout]) -> dict[str, Layout]:
    for name, layout in layouts.items():
        layout.name = name  # recorded in its samples, so their masks are read by it
    return layouts


# The one registry: data.layout names one of these, by the config's names (wsss.config's
# LAYOUTS, in their order).
LAYOUTS: dict[str, Layout] = _named(
    dict(
        zip(
            CONFIG_LAYOUTS,
            (
                PetsLayout(),
                VocLayout(),
                VocLayout("train_aug", "SegmentationClassAug"),
                CocoLayout(),
                CocoLayout(2014),
                CocoLayout(2017),
                FolderLayout(),
                ImageFolderLayout(),
            ),
            strict=True,
        )
    )
)
TASK_LAYOUTS = {"pets": "pets", "voc": "voc"}  # each task's own layout


def get_layout(task: str, layout: str | None = None) -> Layout:
    """The reader of ``layout`` (default: the task's own), checked to fit the task."""
    if task not in TASK_LAYOUTS:
        raise DataLayoutError(f"unknown task {task!r}: expected pets or voc")
    name = layout or TASK_LAYOUTS[task]
    if name not in LAYOUTS:
        raise DataLayoutError(f"unknown layout {name!r}: one of {', '.join(LAYOUTS)}")
    reader = LAYOUTS[name]
    if task not in reader.tasks:
        raise DataLayoutError(
            f"the {name} layout does not fit data.task={task}: its labels suit "
            f"data.task={' or '.join(reader.tasks)}"
        )
    return reader


def read_class_names(root: str | Path, task: str, layout: str | None = None) -> list[str]:
    return get_layout(task, layout).class_names(Path(root))


def list_samples(
    root: str | Path, task: str, split: str, layout: str | None = None
) -> list[Sample]:
    """The samples of ``split`` ("train" or "test"); an empty split is an error."""
    root = Path(root)
    if split not in ("train", "test"):
        raise InputError(f"split must be train or test, not {split!r}")
    reader = get_layout(task, layout)
    samples = reader.samples(root, split)
    if not samples:
        raise DataLayoutError(f"{reader.source(root, split)}: the {split} split is empty")
    if not get_task(task).multi_label:
        for s in samples:
            if len(s.labels) != 1:
                raise DataLayoutError(
                    f"{reader.source(root, split)}: {s.name} has {len(s.labels)} labels, but "
                    "data.task=pets takes one per image (data.task=voc is multi-label)"
                )
    return samples


def describe(root: str | Path, task: str, split: str, layout: str | None = None) -> str:
    """What ``split`` is read from, e.g. ``PASCAL VOC 2012 train_aug (.../train_aug.txt,
    masks in SegmentationClassAug/)``: VOC's train and train_aug are easily mixed up."""
    reader = get_layout(task, layout)
    return f"{reader.title} {reader.source(Path(root), split)}"


def read_palette(root: str | Path, task: str, layout: str | None = None) -> list[int]:
    """The colours of the data's masks (256 RGB triples): theirs, else VOC's colour map."""
    return get_layout(task, layout).palette(Path(root)) or list(VOC_PALETTE)


def read_mask(
    sample: Sample,
    task: str,
    size: tuple[int, int] | None = None,
    num_classes: int | None = None,
) -> np.ndarray:
    """The ground-truth mask as class index per pixel (pets: 0 bg / 1 pet), 255 = ignore.

    ``size`` (height, width) is its image's: a mask of another size is an error, as is a
    class index past ``num_classes``. A sample without a mask is ignored everywhere.
    """
    if sample.mask_path is None:
        return np.full(size or image_size(sample.image_path), IGNORE, np.uint8)
    mask = get_layout(task, sample.layout).mask(sample)
    if size is not None and mask.shape != tuple(size):
        raise DataLayoutError(
            f"{sample.mask_path}: the mask of {sample.name} is {mask.shape[1]}x{mask.shape[0]} "
            f"but its image {sample.image_path} is {size[1]}x{size[0]}"
        )
    labelled = mask[mask != IGNORE]
    if num_classes is not None and labelled.size and labelled.max() > num_classes:
        raise DataLayoutError(
            f"{sample.mask_path}: class index {labelled.max()} in the mask of {sample.name} is "
            f"not in the class list ({num_classes} classes)"
        )
    if get_task(task).binary_masks:  # binary foreground: any class is the pet
        mask = np.where((mask > 0) & (mask != IGNORE), 1, mask).astype(np.uint8)
    return mask


__all__ = [
    "IGNORE",
    "LAYOUTS",
    "VOC_CLASSES",
    "DataLayoutError",
    "Sample",
    "describe",
    "get_layout",
    "list_samples",
    "read_class_names",
    "read_image",
    "read_mask",
    "read_palette",
    "read_resized",
]
