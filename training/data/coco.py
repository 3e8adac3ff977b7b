"""MS COCO 2014 / 2017, read with pycocotools.

Layout: ``train2017/``, ``val2017/`` (images), ``annotations/instances_train2017.json`` and
``instances_val2017.json`` (or the same with 2014); train is COCO's train, test its val.

- Classes: the annotation file's categories, sorted by id and numbered from 0, names kept:
  COCO's ids run 1..90 with gaps, so id 90 (toothbrush) is class 79, mask value 80.
- Image-level labels: the categories of an image's annotations, crowd ones included (a
  crowd of people is people).
- Masks, for evaluation only: each instance's polygons or RLE rasterised by pycocotools, the
  larger instances first so that smaller ones drawn over them stay visible; crowd regions
  (``iscrowd``) are then set to 255, ignored, as their pixels are not one instance each.
"""

from __future__ import annotations

import contextlib
import io
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from training.data.base import IGNORE, DataLayoutError, Layout, Sample, require

YEARS = (2014, 2017)


class CocoIndex:
    """One annotation file: pycocotools' index, and category id -> contiguous class."""

    def __init__(self, path: Path):
        from pycocotools.coco import COCO

        self.path = path
        try:
            dataset = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataLayoutError(f"{path}: not a JSON file ({exc})") from exc
        keys = ("images", "annotations", "categories")
        missing = [k for k in keys if k not in dataset] if isinstance(dataset, dict) else keys
        if missing:
            raise DataLayoutError(
                f"{path}: not COCO instance annotations (no {', '.join(missing)})"
            )
        _check_fields(path, dataset)
        self.coco = COCO()
        self.coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "creating index..."
            self.coco.createIndex()
        self.cat_ids = sorted(self.coco.cats)
        self.names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.index = {c: i for i, c in enumerate(self.cat_ids)}
        for ann in dataset["annotations"]:
            if ann["category_id"] not in self.index:
                raise DataLayoutError(
                    f"{path}: annotation {ann.get('id')} has category_id {ann['category_id']}, "
                    "which is not in its categories"
                )

    def labels(self, image_id: int) -> tuple[int, ...]:
        anns = self.coco.imgToAnns.get(image_id, [])
        return tuple(sorted({self.index[a["category_id"]] for a in anns}))

    def mask(self, image_id: int) -> np.ndarray:
        """Class index per pixel (category's class + 1), crowd regions 255."""
        info = self.coco.imgs[image_id]
        mask = np.zeros((info["height"], info["width"]), np.uint8)
        crowd = np.zeros(mask.shape, bool)
        instances = []
        for ann in self.coco.imgToAnns.get(image_id, []):
            try:
                pixels = self.coco.annToMask(ann).astype(bool)
            except Exception as exc:  # pycocotools raises plain Exception ("input type ...")
                raise DataLayoutError(
                    f"{self.path}: annotation {ann.get('id')}'s segmentation is neither "
                    f"polygons nor an RLE that pycocotools reads ({type(exc).__name__}: {exc})"
                ) from None
            if pixels.shape != mask.shape:  # an RLE's own size against the image's
                raise DataLayoutError(
                    f"{self.path}: annotation {ann.get('id')} is {pixels.shape[1]}x"
                    f"{pixels.shape[0]} but its image {info['file_name']} is declared "
                    f"{mask.shape[1]}x{mask.shape[0]}"
                )
            if ann.get("iscrowd"):
                crowd |= pixels
            else:
                instances.append((pixels, self.index[ann["category_id"]] + 1))
        for pixels, value in sorted(instances, key=lambda p: -int(p[0].sum())):
            mask[pixels] = value
        mask[crowd] = IGNORE
        return mask


# The fields this reader uses, by the type each must have: (entry kind, field, types).
_FIELDS = (
    ("categories", "id", int),
    ("categories", "name", str),
    ("images", "id", int),
    ("images", "file_name", str),
    ("images", "height", int),
    ("images", "width", int),
    ("annotations", "image_id", int),
    ("annotations", "category_id", int),
    ("annotations", "segmentation", (list, dict)),
)


def _check_fields(path: Path, dataset: dict) -> None:
    """Every entry a mapping with the fields this reader uses, of their types: one line
    naming the first that is not, where pycocotools would raise a KeyError or TypeError of
    its own. (An annotation of an image not listed is never read: no image asks for it.)"""
    for kind in ("images", "annotations", "categories"):
        entries = dataset[kind]
        if not isinstance(entries, list):
            raise DataLayoutError(f"{path}: {kind} is {type(entries).__name__}, not a list")
        if not all(isinstance(e, dict) for e in entries):
            raise DataLayoutError(f"{path}: each of {kind} must be a JSON object")
    for kind, name, types in _FIELDS:
        for i, entry in enumerate(dataset[kind]):
            value = entry.get(name)
            # bool is an int to Python, not an id or a size to COCO
            if not isinstance(value, types) or isinstance(value, bool):
                what = "missing" if value is None else f"{value!r}"
                raise DataLayoutError(
                    f"{path}: {kind}[{i}] (id {entry.get('id')}) has {name} {what}: "
                    f"expected {getattr(types, '__name__', 'a list or an object')}"
                )


@lru_cache(maxsize=4)
def load_index(path: str) -> CocoIndex:
    return CocoIndex(Path(path))


class CocoLayout(Layout):
    """``year`` None: whichever of 2014 and 2017 the annotations folder holds."""

    title = "MS COCO"

    def __init__(self, year: int | None = None):
        self.year = year

    def _year(self, root: Path) -> int:
        if self.year is not None:
            return self.year
        found = [y for y in YEARS if (root / "annotations" / f"instances_train{y}.json").exists()]
        if len(found) > 1:
            raise DataLayoutError(
                f"{root / 'annotations'} holds both COCO 2014 and 2017: set "
                "data.layout=coco2014 or coco2017"
            )
        if not found:
            raise DataLayoutError(
                f"{root / 'annotations' / 'instances_train2017.json'} is missing: expected "
                "COCO instance annotations (instances_train2017.json or instances_train2014.json)"
            )
        return found[0]

    def _folder(self, root: Path, split: str) -> str:
        return f"{'train' if split == 'train' else 'val'}{self._year(root)}"

    def _annotations(self, root: Path, split: str) -> Path:
        return root / "annotations" / f"instances_{self._folder(root, split)}.json"

    def source(self, root: Path, split: str) -> str:
        return f"{self._folder(root, split)} ({self._annotations(root, split)})"

    def _index(self, root: Path, split: str) -> CocoIndex:
        path = require(self._annotations(root, split), "COCO instance annotations")
        return load_index(str(path))

    def class_names(self, root: Path) -> list[str]:
        return self._index(root, "train").names

    def samples(self, root: Path, split: str) -> list[Sample]:
        index = self._index(root, split)
        if split == "test" and index.names != self.class_names(root):
            raise DataLayoutError(
                f"{index.path}: its categories differ from those of "
                f"{self._annotations(root, 'train').name}"
            )
        folder = root / self._folder(root, split)
        out = []
        for image_id in sorted(index.coco.imgs):
            file_name = index.coco.imgs[image_id]["file_name"]
            image = folder / file_name  # missing: read_resized says so, or skips it
            name = Path(file_name).stem
            out.append(Sample(name, image, index.path, index.labels(image_id), self.name, image_id))
        return out

    def mask(self, sample: Sample) -> np.ndarray:
        return load_index(str(sample.mask_path)).mask(sample.image_id)
