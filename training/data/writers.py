"""The bundled benchmark written in each layout the readers take (``training.data.layouts``).

Every writer gets the same records, ``(index, classes, image, label map, boundary band,
split)``, so a layout's reader can be checked against the exact masks that were drawn.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from wsss.palette import IGNORE, VOC_PALETTE

# MS COCO's 80 categories by id, 1..90 with gaps (None), as instances_*.json lists them.
_COCO_BY_ID = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", None, "backpack",
    "umbrella", None, None, "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", None, "dining table", None, None, "toilet",
    None, "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", None, "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip
COCO_CATEGORIES = {i: n for i, n in enumerate(_COCO_BY_ID, start=1) if n is not None}
CROWD_EVERY = 4  # every 4th COCO image marks one animal as a crowd region (ignored)


def _palette_png(mask: np.ndarray, path: Path, palette: list[int] = VOC_PALETTE) -> None:
    png = Image.fromarray(mask, mode="P")
    png.putpalette(palette)
    png.save(path)


def folder_palette(n: int) -> list[int]:
    """Someone's own mask colours: black background, ``n`` classes round the hue wheel, the
    rest VOC's (so that a palette that follows the data can be told from VOC's)."""
    hues = np.linspace(0, 180, n, endpoint=False).astype(np.uint8)
    hsv = np.stack([hues, np.full(n, 255, np.uint8), np.full(n, 230, np.uint8)], -1)
    rgb = cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]
    return [0, 0, 0, *rgb.ravel().tolist(), *VOC_PALETTE[3 * (n + 1) :]]


def _banded(label: np.ndarray, band: np.ndarray) -> np.ndarray:
    mask = label.copy()
    mask[band] = IGNORE
    return mask


# Oxford-IIIT Pet's species column.
PET_SPECIES = {"cat": 1, "dog": 2}


def write_pets(root: Path, records, names) -> None:
    images, trimaps = root / "images", root / "annotations" / "trimaps"
    images.mkdir(parents=True, exist_ok=True)
    trimaps.mkdir(parents=True, exist_ok=True)
    lists = {"train": [], "test": []}
    for i, classes, image, label, band, split in records:
        cls = classes[0]
        # Oxford-IIIT Pet names files <Breed>_<n>; cats capitalised, dogs lower case.
        name = f"{names[cls]}_{i + 1}"
        Image.fromarray(image).save(images / f"{name}.jpg", quality=95)
        trimap = np.where(label > 0, 1, 2).astype(np.uint8)
        trimap[band] = 3
        Image.fromarray(trimap).save(trimaps / f"{name}.png")
        # <name> <class id 1..N> <species 1 cat / 2 dog> <breed id within species>; the
        # benchmark's other animals are neither: 0, which names no species (all were "1",
        # so a cat/dog model scored on them took a zebra for a cat)
        species = PET_SPECIES.get(names[cls].lower(), 0)
        lists[split].append(f"{name} {cls + 1} {species} {cls + 1}")
    (root / "annotations" / "trainval.txt").write_text("\n".join(lists["train"]) + "\n")
    (root / "annotations" / "test.txt").write_text("\n".join(lists["test"]) + "\n")


def _voc_name(i: int) -> str:
    return f"2026_{i:06d}"


def write_voc(root: Path, records, names) -> None:
    jpeg, seg = root / "JPEGImages", root / "SegmentationClass"
    sets = root / "ImageSets" / "Segmentation"
    for d in (jpeg, seg, sets):
        d.mkdir(parents=True, exist_ok=True)
    lists = {"train": [], "test": []}
    for i, _classes, image, label, band, split in records:
        name = _voc_name(i)
        Image.fromarray(image).save(jpeg / f"{name}.jpg", quality=95)
        _palette_png(_banded(label, band), seg / f"{name}.png")
        lists[split].append(name)
    (sets / "train.txt").write_text("\n".join(lists["train"]) + "\n")
    (sets / "val.txt").write_text("\n".join(lists["test"]) + "\n")
    (sets / "trainval.txt").write_text("\n".join(lists["train"] + lists["test"]) + "\n")
    # Real VOC has fixed class names; a class list beside the data overrides them.
    (root / "class_names.txt").write_text("\n".join(names) + "\n")


def write_voc_aug(root: Path, records, names) -> None:
    """VOC with SBD's augmented set, as it is distributed: every image's mask in
    ``SegmentationClassAug/`` (greyscale PNGs), ``train_aug.txt`` listing all training
    images, and VOC's own smaller ``train.txt`` (a third of them here, as VOC's 1,464 are
    of the 10,582) with masks in ``SegmentationClass/`` beside val's."""
    write_voc(root, records, names)
    aug, sets = root / "SegmentationClassAug", root / "ImageSets" / "Segmentation"
    aug.mkdir(exist_ok=True)
    train = []
    for i, _classes, _image, label, band, split in records:
        name = _voc_name(i)
        Image.fromarray(_banded(label, band), mode="L").save(aug / f"{name}.png")
        if split == "train":
            train.append(name)
    voc_train = train[: max(1, len(train) // 3)]
    for name in train[len(voc_train) :]:
        (root / "SegmentationClass" / f"{name}.png").unlink()
    val = (sets / "val.txt").read_text()
    (sets / "train_aug.txt").write_text("\n".join(train) + "\n")
    (sets / "train.txt").write_text("\n".join(voc_train) + "\n")
    (sets / "trainval.txt").write_text("\n".join(voc_train) + "\n" + val)


def write_folder(root: Path, records, names) -> None:
    """``images/``, ``labels.csv`` (image, labels, split), ``classes.txt`` and ``masks/`` in
    colours of their own (``folder_palette``)."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(exist_ok=True)
    rows, palette = [], folder_palette(len(names))
    for i, classes, image, label, band, split in records:
        name = f"photo_{i + 1:04d}"
        Image.fromarray(image).save(images / f"{name}.jpg", quality=95)
        _palette_png(_banded(label, band), masks / f"{name}.png", palette)
        # The animals that show: a photo's labels say what is in it.
        shown = [c for c in classes if (label == c + 1).any()] or classes
        rows.append([f"{name}.jpg", ";".join(names[c] for c in shown), split])
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "labels", "split"])
        writer.writerows(rows)
    (root / "classes.txt").write_text("\n".join(names) + "\n")


def write_imagefolder(root: Path, records, names) -> None:
    """``train/<class>/`` and ``test/<class>/``, one JPEG per photo in its class's folder;
    no masks (the layout has none)."""
    for i, classes, image, _label, _band, split in records:
        folder = root / split / names[classes[0]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"photo_{i + 1:04d}.jpg", quality=95)


def _rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major pixels, zeros first."""
    flat = np.asfortranarray(mask).ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat[0]:  # the first run counts zeros
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def _polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours through the boundary pixels' centres (pycocotools fills them)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [(c.reshape(-1) + 0.5).astype(float).tolist() for c in contours if len(c) >= 3]


def _segmentation(mask: np.ndarray, ann_id: int) -> dict | list:
    """Polygons for odd annotation ids, compressed RLE for even ones: both of COCO's forms."""
    polygons = _polygons(mask) if ann_id % 2 else []
    if polygons:
        return polygons
    import pycocotools.mask

    rle = pycocotools.mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def write_coco(root: Path, records, names, year: int = 2017) -> None:
    """``train<year>/``, ``val<year>/`` and ``annotations/instances_*<year>.json`` with COCO's
    80 categories at their ids; the animals are COCO categories of the same names. One
    instance per drawn animal; every ``CROWD_EVERY``-th image marks one as a crowd."""
    by_name = {n: i for i, n in COCO_CATEGORIES.items()}
    categories = [{"id": i, "name": n} for i, n in COCO_CATEGORIES.items()]
    files = {
        split: {"images": [], "annotations": [], "categories": categories}
        for split in ("train", "test")
    }
    ann_id = 0
    for i, classes, image, label, _band, split in records:
        folder = f"{'train' if split == 'train' else 'val'}{year}"
        (root / folder).mkdir(parents=True, exist_ok=True)
        image_id = i + 1
        name = f"{image_id:012d}.jpg" if year == 2017 else f"COCO_{folder}_{image_id:012d}.jpg"
        Image.fromarray(image).save(root / folder / name, quality=95)
        h, w = label.shape
        out = files[split]
        out["images"].append({"id": image_id, "file_name": name, "height": h, "width": w})
        visible = [c for c in classes if (label == c + 1).any()]
        for k, cls in enumerate(visible):
            ann_id += 1
            mask = label == cls + 1
            crowd = i % CROWD_EVERY == 0 and k == len(visible) - 1
            ys, xs = np.nonzero(mask)
            bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
            out["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": by_name[names[cls]],
                    "segmentation": _rle(mask) if crowd else _segmentation(mask, ann_id),
                    "area": int(mask.sum()),
                    "bbox": bbox,
                    "iscrowd": int(crowd),
                }
            )
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, content in files.items():
        folder = f"{'train' if split == 'train' else 'val'}{year}"
        (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(content))


WRITERS: dict[str, Callable] = {
    "pets": write_pets,
    "voc": write_voc,
    "voc_aug": write_voc_aug,
    "coco": write_coco,
    "coco2014": partial(write_coco, year=2014),
    "coco2017": write_coco,
    "folder": write_folder,
    "imagefolder": write_imagefolder,
}
