"""The bundled benchmark: natural-looking composites with exact masks, in the real layouts.

Oxford-IIIT Pet and PASCAL VOC cannot be downloaded here, so `wsss data synth` builds a
stand-in from real material that ships in packages: animal silhouettes (``animal-mnist``,
10 classes), photos and textures (``skimage.data``, matplotlib's sample photo).

Two difficulties:

- ``standard`` keeps the properties WSSS relies on in Oxford-IIIT Pet: the animal is the
  subject of the photo (15-60% of the image; 8-30% each for the one to three animals of the
  voc flavour), its coat (a texture pattern in a colour of its class, as a breed's fur) and
  its shape give its class, backgrounds and clutter are natural-colour crops of real photos
  and textures that mostly differ from any coat. A classifier's evidence is then spread over
  the whole animal, as on real pets.
- ``hard`` is the earlier adversarial set: animals wear their class's coat only 70% of the
  time, clutter is cut from the same coats, and animals fill 55-85% of the side. Colour
  alone misleads, CAMs cover discriminative parts and fire on look-alike clutter.

Everything is drawn from one seeded generator: the same options write the same bytes.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from training.data.base import DataLayoutError
from training.data.layouts import get_layout
from training.data.writers import WRITERS
from wsss.errors import InputError
from wsss.packages import package_file

ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")

# skimage.data images bundled in the wheel (others are fetched from the web and fail offline).
# The hard set's pool: coats, backgrounds and clutter are all cut from it.
_TEXTURE_SOURCES = (
    "astronaut", "chelsea", "coffee", "rocket", "brick", "grass", "gravel", "camera",
    "coins", "moon", "text", "hubble_deep_field", "immunohistochemistry", "page",
)  # fmt: skip
# The standard set's backgrounds and clutter: real photos and textures in their own colours.
_PHOTO_SOURCES = (
    "astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "retina",
    "hubble_deep_field", "immunohistochemistry", "brick", "grass", "gravel", "camera",
    "coins", "moon", "clock", "page", "grace_hopper",
)  # fmt: skip
# The standard set's coats: one grey pattern per class, worn in a colour of the class.
_COAT_PATTERNS = (
    "gravel", "grass", "chelsea", "brick", "coins", "moon", "text", "camera", "cell", "clock",
)  # fmt: skip
DIFFICULTIES = ("standard", "hard")
SYNTH_RECORD = "synth.json"  # the options a folder was written with


@dataclass(frozen=True)
class SynthOptions:
    task: str = "pets"  # pets: one animal, binary; voc: one to three animals, class masks
    count: int = 2000
    size: int = 128
    seed: int = 0
    test_fraction: float = 0.25
    difficulty: str = "standard"  # or "hard", the adversarial set (module docstring)
    # The files' layout (training.data.layouts.LAYOUTS); None: the task's own (pets, voc).
    # pets images go in the pets or folder layout, voc ones in any but pets.
    layout: str | None = None

    @classmethod
    def of(cls, data) -> SynthOptions:
        """The benchmark a config's ``data`` section describes."""
        return cls(
            data.task, data.synth_count, data.image_size, data.synth_seed,
            difficulty=data.synth_difficulty, layout=data.layout,
        )  # fmt: skip

    def record(self) -> dict:
        """What ``synth.json`` holds; without ``layout`` when unset, as folders written
        before there were layouts hold it (so they are not rewritten for nothing)."""
        out = dataclasses.asdict(self)
        out["flavour"] = out.pop("task")  # the key folders were written with before
        if out["layout"] is None:
            del out["layout"]
        if (self.layout or self.task) == "pets":  # its lists name each animal's species
            out["species"] = "cat 1, dog 2, others 0"  # (all 1 before): written again
        return out


def load_silhouettes() -> tuple[np.ndarray, np.ndarray]:
    """The animal-mnist arrays, read from the package's gzip pickles.

    The package's own loader imports tensorflow at module level, so we read its data files.
    """
    folder = package_file("animal_mnist", "data", "Animal_MNIST", needed_by="The synthetic data")
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        shapes = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(pickle.load(f), dtype=np.int64)
    return shapes, labels


def _skimage_photo(name: str) -> np.ndarray:
    """RGB uint8 of a photo bundled offline (skimage.data, or matplotlib's sample photo)."""
    if name == "grace_hopper":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            img = np.asarray(Image.open(f).convert("RGB"))
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo pairs: the left view
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


MAX_SIZE = 512  # Compositor._crop takes at least half the image side from a 256 px photo


def _at_least(img: np.ndarray, short: int = MAX_SIZE // 2) -> np.ndarray:
    if min(img.shape[:2]) >= short:
        return img
    scale = short / min(img.shape[:2])
    return cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)


def load_textures(names: tuple[str, ...] = _TEXTURE_SOURCES) -> list[np.ndarray]:
    """RGB uint8 photos and textures, each at least 256 px on its short side."""
    return [_at_least(_skimage_photo(name)) for name in names]


class Compositor:
    """Draws one composite at a time from a seeded generator, in either difficulty."""

    hard_coat_prob = 0.7  # hard: how often an animal wears its class's coat

    def __init__(self, size: int, rng: np.random.Generator, difficulty: str = "standard"):
        if difficulty not in DIFFICULTIES:
            raise InputError(f"unknown difficulty {difficulty!r}: one of {DIFFICULTIES}")
        self.size, self.rng, self.difficulty = size, rng, difficulty
        self.shapes, self.labels = load_silhouettes()
        self.by_class = [np.flatnonzero(self.labels == c) for c in range(len(ANIMALS))]
        if difficulty == "hard":
            self.textures = load_textures()
        else:
            self.photos = load_textures(_PHOTO_SOURCES)
            self.patterns = [
                cv2.cvtColor(t, cv2.COLOR_RGB2GRAY) for t in load_textures(_COAT_PATTERNS)
            ]

    # -- shared pieces ---------------------------------------------------------------------

    def _crop(self, src: np.ndarray, low: float) -> np.ndarray:
        """A random square crop of ``low``-100% of the short side, resized to the image size."""
        s = self.size
        crop = max(int(self.rng.uniform(low, 1.0) * min(src.shape[:2])), s // 2)
        y = int(self.rng.integers(0, src.shape[0] - crop + 1))
        x = int(self.rng.integers(0, src.shape[1] - crop + 1))
        patch = cv2.resize(src[y : y + crop, x : x + crop], (s, s), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(patch[:, ::-1] if self.rng.random() < 0.5 else patch)

    def silhouette(self, cls: int, scale: float | None = None, area: float | None = None):
        """A smooth float alpha in [0, 1] of one animal of class ``cls``.

        Sized by ``scale`` (its longer side, as a fraction of the image side) or by ``area``
        (the fraction of the image it covers, capped where it would outgrow the image).
        """
        shape = self.shapes[int(self.rng.choice(self.by_class[cls]))].astype(np.float32) / 255
        ys, xs = np.nonzero(shape > 0.5)
        shape = shape[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        h, w = shape.shape
        if area is not None:
            fill = float((shape > 0.5).mean())
            scale = min(1.0, np.sqrt(area / fill / (h * w)) * max(h, w))
        side = max(8, int(scale * self.size))
        f = side / max(h, w)
        big = cv2.resize(shape, (max(2, int(w * f)), max(2, int(h * f))), cv2.INTER_CUBIC)
        # Blur then re-threshold: the 28 px staircase becomes a smooth contour; a narrow
        # ramp stays as anti-aliasing, as a camera would record the edge.
        big = cv2.GaussianBlur(big, (0, 0), sigmaX=max(0.8, side / 40))
        alpha = np.clip((big - 0.5) * 4 + 0.5, 0, 1)
        if self.rng.random() < 0.5:
            alpha = alpha[:, ::-1]
        return np.ascontiguousarray(alpha)

    def blob(self) -> np.ndarray:
        """A distractor: a smooth random blob, full-image alpha."""
        s = self.size
        noise = self.rng.random((8, 8)).astype(np.float32)
        field = cv2.resize(noise, (s, s), interpolation=cv2.INTER_CUBIC)
        cy, cx = self.rng.uniform(0, s, 2)
        r = self.rng.uniform(0.08, 0.22) * s
        yy, xx = np.mgrid[:s, :s]
        dist = np.hypot(yy - cy, xx - cx) / r
        alpha = np.clip((1.0 - dist + 0.6 * (field - 0.5)) * 6, 0, 1)
        return alpha.astype(np.float32)

    def place(self, alpha: np.ndarray, inside: bool = False) -> np.ndarray:
        """Paste a small alpha at a random position of a full-size canvas.

        ``inside`` keeps it whole; otherwise up to a sixth of it may be cut by the border.
        """
        s = self.size
        canvas = np.zeros((s, s), np.float32)
        h, w = alpha.shape
        if inside:
            y = int(self.rng.integers(0, max(1, s - h + 1)))
            x = int(self.rng.integers(0, max(1, s - w + 1)))
        else:
            y = int(self.rng.integers(-h // 6, max(1, s - h + h // 6)))
            x = int(self.rng.integers(-w // 6, max(1, s - w + w // 6)))
        y0, x0 = max(0, y), max(0, x)
        y1, x1 = min(s, y + h), min(s, x + w)
        canvas[y0:y1, x0:x1] = alpha[y0 - y : y1 - y, x0 - x : x1 - x]
        return canvas

    def _paint(self, image: np.ndarray, alpha: np.ndarray, fill: np.ndarray) -> np.ndarray:
        """Alpha-blend ``fill`` lit from a random side: real photos always show shading."""
        s = self.size
        yy, xx = np.mgrid[:s, :s] / s
        angle = self.rng.uniform(0, 2 * np.pi)
        shade = 0.85 + 0.3 * (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
        a = alpha[..., None]
        return image * (1 - a) + np.clip(fill * shade, 0, 255) * a

    def compose(self, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """An RGB image and a label map (0 = background, c + 1 = animal of class c)."""
        if self.difficulty == "hard":
            image, label = self._compose_hard(classes)
        else:
            image, label = self._compose_standard(classes)
        # Camera noise so no pixel value is exactly a texture's.
        image = image + self.rng.normal(0, 3, image.shape)
        return np.clip(image, 0, 255).astype(np.uint8), label

    def ensure_visible(self, classes: list[int], min_pixels: int) -> tuple[np.ndarray, np.ndarray]:
        """Compose until every requested animal shows at least ``min_pixels`` pixels."""
        for _ in range(20):
            image, label = self.compose(classes)
            counts = np.bincount(label.ravel(), minlength=len(ANIMALS) + 1)
            if all(counts[c + 1] >= min_pixels for c in classes):
                return image, label
        return image, label

    # -- standard: the animal is the subject, its coat and shape give its class ------------

    def photo_patch(self, exclude: int | None = None) -> tuple[np.ndarray, int]:
        """A crop of a real photo or texture in its own colours (brightness jittered)."""
        choices = [i for i in range(len(self.photos)) if i != exclude]
        idx = int(self.rng.choice(choices))
        patch = self._crop(self.photos[idx], 0.3).astype(np.float32)
        return np.clip(patch * self.rng.uniform(0.8, 1.15), 0, 255), idx

    def class_coat(self, cls: int) -> np.ndarray:
        """The class's pattern in the class's colour: hues 18 apart (of OpenCV's 180)."""
        pattern = self._crop(self.patterns[cls % len(self.patterns)], 0.25).astype(np.float32)
        lo, hi = np.percentile(pattern, (2, 98))
        value = 70 + 175 * np.clip((pattern - lo) / max(hi - lo, 1.0), 0, 1)
        hue = (18 * cls + 9 + self.rng.integers(-4, 5)) % 180
        hsv = np.stack(
            [np.full_like(value, hue), np.full_like(value, self.rng.uniform(150, 220)), value], -1
        )
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)

    def _compose_standard(self, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
        s = self.size
        image, bg = self.photo_patch()
        for _ in range(int(self.rng.integers(1, 5))):
            fill, _ = self.photo_patch(exclude=bg)
            a = self.blob()[..., None]
            image = image * (1 - a) + fill * a
        label = np.zeros((s, s), np.uint8)
        areas = (0.15, 0.6) if len(classes) == 1 else (0.08, 0.3)
        for cls in classes:
            shape = self.silhouette(cls, area=self.rng.uniform(*areas))
            # Of a few placements, the one hiding least of the animals already there: VOC's
            # animals overlap, but rarely hide each other whole.
            tries = [self.place(shape, inside=True) for _ in range(4 if label.any() else 1)]
            alpha = min(tries, key=lambda a: float(((a > 0.5) & (label > 0)).sum()))
            image = self._paint(image, alpha, self.class_coat(cls))
            label[alpha > 0.5] = cls + 1
        return image, label

    # -- hard: the earlier adversarial set ---------------------------------------------------

    def texture_patch(
        self, exclude: set[int] = frozenset(), source: int | None = None, hue: int | None = None
    ) -> tuple[np.ndarray, int]:
        """A random crop of a texture (random unless ``source``), rescaled, flipped, jittered.

        ``hue`` fixes the hue shift (a class coat) up to a small jitter; else it is random.
        """
        choices = [i for i in range(len(self.textures)) if i not in exclude]
        idx = int(self.rng.choice(choices)) if source is None else source
        patch = self._crop(self.textures[idx], 0.3)
        hsv = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV).astype(np.int32)
        shift = self.rng.integers(0, 180) if hue is None else hue + self.rng.integers(-6, 7)
        hsv[..., 0] = (hsv[..., 0] + shift) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] * self.rng.uniform(0.6, 1.4) + 20, 0, 255)
        hsv[..., 2] = np.clip(hsv[..., 2] * self.rng.uniform(0.7, 1.2), 0, 255)
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB), idx

    def coat(self, cls: int, bg_idx: int) -> np.ndarray:
        """The animal's fill: usually its class's coat (as breeds have), else any texture."""
        source, hue = cls % len(self.textures), (37 * cls) % 180
        if self.rng.random() < self.hard_coat_prob and source != bg_idx:
            return self.texture_patch(source=source, hue=hue)[0]
        return self.texture_patch(exclude={bg_idx})[0]

    def _compose_hard(self, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
        s = self.size
        background, bg_idx = self.texture_patch()
        image = background.astype(np.float32)
        for _ in range(int(self.rng.integers(2, 6))):
            fill, _ = self.texture_patch(exclude={bg_idx})
            a = self.blob()[..., None]
            image = image * (1 - a) + fill * a
        label = np.zeros((s, s), np.uint8)
        scale_range = (0.55, 0.85) if len(classes) == 1 else (0.4, 0.65)
        for cls in classes:
            alpha = self.place(self.silhouette(cls, self.rng.uniform(*scale_range)))
            image = self._paint(image, alpha, self.coat(cls, bg_idx))
            label[alpha > 0.5] = cls + 1
        return image, label


def boundary_band(label: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` of a change of label: the ambiguous edge the formats mark."""
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    dilated = cv2.dilate(label, kernel)
    eroded = cv2.erode(label, kernel)
    return dilated != eroded


def write_synth(root: str | Path, opts: SynthOptions) -> Path:
    """Write the benchmark under ``root`` in ``opts.layout`` (default: the task's own)."""
    if opts.task not in ("pets", "voc"):
        raise InputError(f"unknown task {opts.task!r}: expected pets or voc")
    layout = get_layout(opts.task, opts.layout).name  # refuses a layout the task can't read
    if opts.count < len(ANIMALS) or not 32 <= opts.size <= MAX_SIZE:
        raise InputError(
            f"synth needs count >= {len(ANIMALS)} and size 32 to {MAX_SIZE} "
            f"(got count {opts.count}, size {opts.size}): its backgrounds are crops of photos "
            f"{MAX_SIZE // 2} px on their short side, at most doubled"
        )
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise InputError(f"{root} is a file: the benchmark is written into a folder")
    if root.is_dir() and any(root.iterdir()):
        if not (root / SYNTH_RECORD).exists():  # someone's own data: never written over
            raise InputError(
                f"{root} holds files this command did not write (no {SYNTH_RECORD}): "
                "point data.root (or --out) at an empty or new folder"
            )
        for child in root.iterdir():  # an earlier benchmark: none of its files left
            child.unlink() if child.is_symlink() or not child.is_dir() else shutil.rmtree(child)
    # The record first, marked unfinished, so that a write stopped halfway is known as
    # this command's (rewritten by the next, never taken for someone's photos or for done).
    root.mkdir(parents=True, exist_ok=True)
    (root / SYNTH_RECORD).write_text(json.dumps(opts.record() | {"unfinished": True}))
    rng = np.random.default_rng(opts.seed)
    comp = Compositor(opts.size, rng, opts.difficulty)
    n_test = max(1, int(round(opts.count * opts.test_fraction)))
    band = max(1, opts.size // 96)
    records = []
    for i in tqdm(range(opts.count), desc=f"synth {opts.task}", unit="img"):
        if opts.task == "pets":
            # Balanced: every block of 10 images holds each class once, in random order.
            if i % len(ANIMALS) == 0:
                order = rng.permutation(len(ANIMALS))
            classes = [int(order[i % len(ANIMALS)])]
        else:
            k = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
            classes = [int(c) for c in rng.choice(len(ANIMALS), size=k, replace=False)]
        image, label = comp.ensure_visible(classes, min_pixels=(opts.size // 8) ** 2)
        split = "test" if i >= opts.count - n_test else "train"
        records.append((i, classes, image, label, boundary_band(label, band), split))
    WRITERS[layout](root, records, ANIMALS)
    (root / SYNTH_RECORD).write_text(json.dumps(opts.record(), indent=2))
    return root


def _read_record(record: Path) -> dict | None:
    """The options a benchmark was written with; None where its record is damaged (a write
    cut off mid-file): the folder is still this command's, and is written again."""
    try:
        return json.loads(record.read_text())
    except (ValueError, UnicodeDecodeError):
        return None


def ensure_synth(root: str | Path, opts: SynthOptions) -> bool:
    """Write the benchmark unless ``root`` already holds it with these options.

    A folder this function wrote with other options (an older image size, say) is rewritten;
    a folder without its record is someone's own data and is left alone. True if written.
    """
    root = Path(root)
    if opts.count == 0:  # data.synth_count 0: real photos, never to be written over
        if not root.exists():
            raise DataLayoutError(
                f"{root} does not exist: this config reads real data there (data.synth_count "
                "is 0, so nothing is synthesised); point data.root at your copy"
            )
        return False
    record = root / SYNTH_RECORD
    if record.exists() and _read_record(record) == opts.record():
        return False
    if root.exists() and not record.exists():
        return False
    write_synth(root, opts)  # rewrites the folder it wrote with other options
    return True
