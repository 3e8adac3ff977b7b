"""A plain folder of your own photos: no conversion to a benchmark's layout needed.

    images/        the photos (any format Pillow reads; subfolders allowed)
    labels.csv     a header, then ``image,labels[,split]``: the path under images/, its class
                   names separated by ";" (empty: background only), ``train`` or ``test``
    classes.txt    one class name a line, in class order; optional without masks/ (then
                   the sorted names found in labels.csv)
    masks/         optional: ``<image path without its extension>.png``, class index per
                   pixel: 0 background, the n-th class of classes.txt as n, 255 ignored

Where the split column is missing or empty, one image in five is test, chosen by a hash of
its path: adding photos moves none of the others. With ``masks/``, every test image needs
its mask and a training image's is optional (only the supervised bound reads it). Without
``masks/``, training and pseudo-masks work and evaluation scores the classifier only.
"""

from __future__ import annotations

import csv
import difflib
import io
import posixpath
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from training.data.base import (
    DataLayoutError,
    Layout,
    Sample,
    png_palette,
    read_names,
    read_text,
    require,
)

LABELS, CLASSES, IMAGES, MASKS = "labels.csv", "classes.txt", "images", "masks"
SEPARATOR = ";"
SPLITS = ("train", "test")
COLUMNS = ("image", "labels", "split")  # of labels.csv; others are left alone


@dataclass(frozen=True)
class Row:
    line: int  # in labels.csv, for error messages
    image: str
    labels: tuple[str, ...]
    split: str


def default_split(image: str) -> str:
    """One image in five is test, by a hash of its path (stable across runs and additions)."""
    return "test" if zlib.crc32(image.encode()) % 5 == 0 else "train"


def read_rows(path: Path) -> list[Row]:
    """The rows of labels.csv. Columns other than image, labels and split are left alone,
    unless one looks like a misspelt split (``spilt``: the split would silently be the
    hash's); an image listed twice is refused (two labels, or a photo in both splits)."""
    require(path, "labels.csv: image,labels[,split] for each photo")
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    header = [h.strip().lower() for h in reader.fieldnames or []]
    if len(header) == 1 and {"image", "labels"} <= {h.strip() for h in header[0].split(";")}:
        raise DataLayoutError(
            f"{path}: the header is one column, {header[0]!r}: labels.csv separates its "
            "columns with commas (';' separates a photo's labels); save it as CSV with commas"
        )
    if "image" not in header or "labels" not in header:
        raise DataLayoutError(
            f"{path}: the header must name the columns image and labels (and optionally "
            f"split), not {', '.join(header) or 'nothing'}"
        )
    for column in header:
        # 0.8: spilt, splits, splt; not site, plot, slide, list (columns of their own)
        close = difflib.get_close_matches(column, COLUMNS, n=1, cutoff=0.8)
        if column not in COLUMNS and close and close[0] not in header:
            raise DataLayoutError(f"{path}: column {column!r}: did you mean {close[0]!r}?")
    reader.fieldnames = header
    rows, seen = [], {}
    for record in reader:
        extra = [v for v in record.pop(None, None) or [] if (v or "").strip()]
        if not any((v or "").strip() for v in record.values() if isinstance(v, str)) and not extra:
            continue  # an empty row (a spreadsheet's trailing ",,")
        if extra:  # DictReader files them under None: a photo's labels split by commas
            raise DataLayoutError(
                f"{path}, line {reader.line_num}: {len(header) + len(extra)} fields or more, "
                f"the header names {len(header)} ({', '.join(header)}): {', '.join(extra)} "
                "would be lost; separate a photo's labels with ';' (cat;dog), not ','"
            )
        image = (record["image"] or "").strip()
        if not image:
            raise DataLayoutError(f"{path}, line {reader.line_num}: no image named")
        listed = PurePosixPath(posixpath.normpath(image))  # ./cat.jpg is cat.jpg
        if listed.name in ("", ".", ".."):
            raise DataLayoutError(f"{path}, line {reader.line_num}: {image!r} names no photo")
        key = listed.with_suffix("").as_posix()  # its name: its mask's, its outputs'
        if key in seen:
            line, other = seen[key]
            if PurePosixPath(posixpath.normpath(other)) == listed:
                said = f"{image} is listed twice: remove one"
            else:  # in the lines' order
                said = (
                    f"{other} and {image} share the name {key} (one mask, one set of outputs): "
                    "rename one"
                )
            raise DataLayoutError(f"{path}, lines {line} and {reader.line_num}: {said}")
        seen[key] = (reader.line_num, image)
        names = (record["labels"] or "").split(SEPARATOR)
        split = (record.get("split") or "").strip().lower() or default_split(image)
        if split not in SPLITS:
            raise DataLayoutError(
                f"{path}, line {reader.line_num}: split {split!r} is not train or test"
            )
        labels = tuple(n.strip() for n in names if n.strip())
        rows.append(Row(reader.line_num, image, labels, split))
    return rows


class FolderLayout(Layout):
    title = "image folder"
    tasks = ("pets", "voc")  # one label a row, or several

    def class_names(self, root: Path) -> list[str]:
        listed = root / CLASSES
        if not listed.exists():
            if (root / MASKS).is_dir():  # a label's typo would shift every index after it
                raise DataLayoutError(
                    f"{root / MASKS} holds class indices: list the classes in {listed}, one "
                    "a line, the n-th painted as n (then an unknown label is an error)"
                )
            return sorted({n for row in read_rows(root / LABELS) for n in row.labels})
        return read_names(listed)

    def palette(self, root: Path) -> list[int] | None:
        return png_palette(root / MASKS)

    def source(self, root: Path, split: str) -> str:
        masks = "with masks/" if (root / MASKS).is_dir() else "no masks/"
        return f"{root / LABELS} ({split} rows, {masks})"

    def samples(self, root: Path, split: str) -> list[Sample]:
        labels_csv = root / LABELS
        names = self.class_names(root)
        index = {n: i for i, n in enumerate(names)}
        masks = root / MASKS
        out = []
        for row in read_rows(labels_csv):
            if row.split != split:
                continue
            unknown = [n for n in row.labels if n not in index]
            if unknown:
                raise DataLayoutError(
                    f"{labels_csv}, line {row.line}: label {unknown[0]!r} is not in the class "
                    f"list ({root / CLASSES}: {', '.join(names)})"
                )
            # A missing image is read_resized's to say (data.skip_unreadable can leave it out)
            image = root / IMAGES / row.image
            mask = None
            if masks.is_dir():
                mask = masks / Path(row.image).with_suffix(".png")
                if split == "test":
                    require(mask, f"the mask of a test image ({labels_csv}, line {row.line})")
                elif not mask.exists():
                    mask = None
            labels = tuple(sorted({index[n] for n in row.labels}))
            name = Path(row.image).with_suffix("").as_posix()
            out.append(Sample(name, image, mask, labels, self.name))
        return out
