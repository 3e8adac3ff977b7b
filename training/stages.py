"""The training stages: classifier -> pseudo-masks -> segmenter. ``wsss train`` runs them."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from training import distributed
from training.data.base import Sample
from training.data.dataset import WSSSDataset, random_resized_crop_flip, require_synth
from training.data.layouts import (
    IGNORE,
    describe,
    list_samples,
    read_class_names,
    read_palette,
)
from training.levelset.model import LevelSetHead
from training.levelset.train import LevelSetLoss, LevelSetModel, head_kwargs
from training.loop import (
    discard_run,
    file_digest,
    finish_run,
    fit,
    load_checkpoint,
    partial_checkpoint,
    resolve_device,
    save_checkpoint,
)
from training.metrics import label_f1
from training.models import CLASSIFIERS, SEGMENTERS, build_classifier, build_segmenter
from training.models.imagenet import imagenet_class_names, parse_class_groups
from training.pipeline import (
    ClassifierGraph,
    PassThroughSegmenter,
    Pipeline,
    check_tiles,
    load_model,
    mask_values,
    missing_labels,
    refine_step,
    translate_labels,
)
from training.torch_refiners import build_refiner, present_classes_mask, seeded
from wsss.config import (
    DEFAULT_STAGES,
    PASSTHROUGH,
    STAGES,
    Config,
    RefineConfig,
    load_saved_config,
    save_config,
)
from wsss.errors import InputError, WsssError
from wsss.served.registry import RefinerSpec


class _View(Dataset):
    """A subset of a loaded dataset, with or without augmentation (images decoded once)."""

    def __init__(
        self, base: WSSSDataset, indices: np.ndarray, augment: bool, masks: np.ndarray | None = None
    ):
        self.base, self.indices, self.augment, self.masks = base, indices, augment, masks

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        image = self.base.images[i]
        # Segmenter training swaps the target for the masks it learns from (the pseudo-masks,
        # or the ground truth for the supervised bound).
        mask = self.masks[k] if self.masks is not None else self.base.masks[i]
        if self.augment:
            image, mask = random_resized_crop_flip(image, mask, self.base.size)
        image = torch.from_numpy(np.ascontiguousarray(image))
        mask = torch.from_numpy(np.ascontiguousarray(mask)).long()
        return (image, mask) if self.masks is not None else (image, self.base.target(i))


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction)))
    if n_val >= n:
        raise InputError(
            f"{n} training photo(s) and data.val_fraction {fraction} hold out {n_val} for "
            "validation: none left to train on"
        )
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def load_train_set(cfg: Config) -> WSSSDataset:
    data = WSSSDataset.from_config(cfg.data, "train")
    if distributed.is_main():  # VOC's train and train_aug are easily mixed up: say which
        tqdm.write(f"train data: {data.source}")
        counts = Counter(c for sample in data.samples for c in sample.labels)
        rare = [f"{n} ({counts[i]})" for i, n in enumerate(data.class_names) if counts[i] < 2]
        if rare:  # a misspelt label in your own labels.csv is a class of one photo
            tqdm.write(f"train data: one photo or none to learn from: {', '.join(rare)}")
    return data


def _loaders(cfg: Config, train: Dataset, val: Dataset) -> tuple[DataLoader, DataLoader]:
    """Seeded loaders; under torchrun each rank draws its share of ``train`` (batch_size
    images per rank and step) and validates on its shard of ``val``."""
    # Per rank: data.num_workers' processes seed numpy from this generator, which would
    # otherwise give every rank the same crops and flips (rank 0's, one process's, as ever).
    g = torch.Generator().manual_seed(cfg.train.seed + distributed.rank())
    kw = {"batch_size": cfg.train.batch_size, "num_workers": cfg.data.num_workers}
    sampler = distributed.train_sampler(train, cfg.train.seed)
    per_rank = len(train) // distributed.world_size()
    return DataLoader(
        train,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=per_rank > cfg.train.batch_size,
        generator=g,
        **kw,
    ), DataLoader(distributed.shard(val), **kw)


def classifier_setup(cfg: Config, data_names: list[str]) -> tuple[dict, list[str]]:
    """The classifier's builder arguments and class names, as the config describes them.

    A task head has the data's classes. The ImageNet head has its groups' names, or the
    1000 ImageNet classes when no groups are given.
    """
    c = cfg.classifier
    if c.head == "imagenet":
        if c.class_groups:
            names, groups = parse_class_groups(c.class_groups)
        elif cfg.data.kind.multi_label:
            raise InputError(
                "the ImageNet head on a multi-class task needs classifier.class_groups: its "
                "1000 classes do not fit a class-index mask"
            )
        else:
            names, groups = list(imagenet_class_names()), None
    else:
        names, groups = list(data_names), None
    if c.tiles and not (cfg.data.kind.multi_label and c.head == "imagenet"):
        raise InputError(
            "classifier.tiles: presence from tiles is for the ImageNet head's classes on a "
            "multi-label task (a task head learned from whole images)"
        )
    kwargs = {
        "num_classes": len(names),
        "output_stride": c.output_stride,
        "weights": c.weights,
        "head": c.head,
        "class_groups": groups,
        "tiles": c.tiles,
    }
    return kwargs, names


def learns_classes(cfg: Config) -> bool:
    """Whether the classifier stage trains anything: a task head, or the ImageNet head's
    learned classes (class groups with no ids: ``CAMClassifier``)."""
    c = cfg.classifier
    return c.head != "imagenet" or any(not ids for ids in c.class_groups.values())


def train_classifier(cfg: Config, data: WSSSDataset | None, resume: bool = False) -> nn.Module:
    """Image-level labels only: cross-entropy (pets) or binary cross-entropy (voc).

    With ``classifier.head: imagenet`` there is nothing to train: the pretrained head is the
    classifier, written as this stage's checkpoint so every later stage reads it the same way.
    Its learned classes (class groups with no ids) are the exception: their head trains on
    the labels, the backbone and the ImageNet head frozen. ``classifier.threshold_folds``
    then chooses each class's score threshold by cross-validation (``choose_thresholds``).
    With ``resume`` a complete run of these settings is kept, and a stopped one continues
    (``_train``).
    """
    folds = bool(cfg.classifier.threshold_folds)
    if folds and not cfg.data.kind.multi_label:  # before training, not after it
        raise InputError(
            "classifier.threshold_folds: per-class thresholds are for multi-label tasks"
        )
    if folds and learns_classes(cfg) and cfg.classifier.threshold_folds < 2:
        raise InputError("classifier.threshold_folds: 0 (off) or at least 2 folds")
    _seed(cfg)
    kwargs, names = classifier_setup(cfg, data.class_names if data is not None else [])
    fewest = 1 if cfg.data.kind.multi_label else 2  # one softmax class has nothing to learn
    if learns_classes(cfg) and len(names) < fewest:
        raise InputError(
            f"classifier: {len(names)} classes ({', '.join(names) or 'none'}) in "
            f"{cfg.data.root}: a {cfg.data.task} classifier learns at least {fewest}"
        )
    imagenet = cfg.classifier.head == "imagenet"
    if imagenet and not (cfg.classifier.pretrained or cfg.classifier.weights):
        raise InputError("classifier.head=imagenet needs classifier.pretrained=true or weights")
    model = build_classifier(cfg.classifier.arch, pretrained=cfg.classifier.pretrained, **kwargs)
    # The checkpoint rebuilds the architecture; its weights then replace any pretrained ones.
    meta = {
        "family": "classifier",
        "arch": cfg.classifier.arch,
        "task": cfg.data.kind.as_meta(),
        "kwargs": kwargs | {"weights": None},
        "class_names": names,
    }
    if not learns_classes(cfg):
        note = f"classifier: the ImageNet head, {len(names)} classes: nothing to train"
        folds = folds and data is not None
        model = _untrained(cfg, "classifier", model, meta, note, finish=not folds)
        if folds:
            _with_thresholds(cfg, data, model, meta, None)
        return model
    if model.frozen and names != data.class_names:
        lacking = [n for n in names if n not in data.class_names]
        why = (
            f"; the data has no class {', '.join(lacking)}"
            + (
                " (a folder's classes are the labels its labels.csv uses unless classes.txt "
                "lists them: write the config's classes there, one a line)"
                if cfg.data.layout == "folder"
                else ""
            )
            if lacking
            else ""
        )
        raise InputError(
            "classifier.class_groups with learned classes (no ids) name the data's classes in "
            f"its order: {', '.join(data.class_names)}{why}"
        )
    tr, va = _split(len(data), cfg.data.val_fraction, cfg.train.seed)
    if folds and resume:  # kept whole, its thresholds in it (_train keeps the others)
        digest = _data_digest(_View(data, tr, True), _View(data, va, False))
        if _kept(cfg, model, meta | {"data_digest": digest}, Path(cfg.runs) / "classifier"):
            return model.eval()
    model = _fit_classifier(
        cfg, model, data, tr, va, meta, "classifier", finish=not folds, resume=resume
    )
    if folds:
        _with_thresholds(cfg, data, model, meta, kwargs, resume)
    return model


def _with_thresholds(
    cfg: Config, data: WSSSDataset, model, meta: dict, kwargs, resume: bool = False
) -> None:
    """``choose_thresholds`` for the classifier just written (still partial), then its run
    complete: stopped while the folds choose them, the stage's last complete run (its
    checkpoint with its thresholds, its log and config) stays as it was, and no checkpoint
    without thresholds is left for export or a later run to take."""
    out = Path(cfg.runs) / "classifier"
    try:
        choose_thresholds(cfg, data, model, meta, kwargs, partial_checkpoint(out), resume)
    except BaseException:
        if distributed.is_main():
            discard_run(out)
        raise
    config = out / "config.yaml"
    if distributed.is_main():  # a stop between the two moves leaves no run taken as trained
        config.unlink(missing_ok=True)
    finish_run(out)
    if distributed.is_main():
        save_config(cfg, config)


def _fit_classifier(cfg, model, data, tr, va, meta, out, finish=True, resume=False) -> nn.Module:
    if model.frozen:
        model.freeze()
    loss = {"ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}[cfg.data.kind.loss]()
    train, val = _View(data, tr, True), _View(data, va, False)
    return _train(cfg, model, train, val, loss, meta, out=out, finish=finish, resume=resume)


def _label_f1(
    scores: np.ndarray, cuts: np.ndarray, truth: np.ndarray, missed=None, min_score: float = 0.0
) -> float:
    """The label F1 of what the refiner takes as present at ``cuts`` and ``min_score`` (its
    graph form), as ``wsss evaluate`` scores it (``missed``: each photo's classes the
    classifier lacks)."""
    present = present_classes_mask(torch.from_numpy(scores), True, cuts, min_score).numpy()
    return label_f1(present, truth, missed)


def label_thresholds(
    scores: np.ndarray,
    truth: np.ndarray,
    passes: int = 2,
    missed: np.ndarray | None = None,
    min_score: float = 0.0,
) -> np.ndarray:
    """Per-class score thresholds that maximise the mean per-image label F1 (what the
    reports give) of ``scores`` [N, K] against ``truth`` (bool): the best single threshold
    first, then each class's own by coordinate ascent, a class at a time, cutting halfway
    between two of its scores; a class moves only when the F1 rises. Classes of different
    scales (softmax masses beside sigmoids) each get their own cut. ``min_score`` (the
    refiner's: no class where even the top score is below it) applies as it will served."""
    candidates = np.unique(np.quantile(scores, np.linspace(0, 1, 101)))
    flat = [
        _label_f1(scores, np.full(scores.shape[1], t), truth, missed, min_score) for t in candidates
    ]
    cuts = np.full(scores.shape[1], candidates[int(np.argmax(flat))])
    best = max(flat)
    for _ in range(passes):
        for c in range(scores.shape[1]):
            values = np.unique(scores[:, c])
            # Above every score (the class never present), yet at most 1: a photo's labels
            # are refined as scores of 1, which must pass every cut (a cut of 1 + 1e-6 after
            # a saturated false positive dropped the class from its labelled photos' masks).
            never = min(values[-1] + 1e-6, 1.0)
            for t in np.concatenate([(values[:-1] + values[1:]) / 2, [never]]):
                trial = cuts.copy()
                trial[c] = t
                f1 = _label_f1(scores, trial, truth, missed, min_score)
                if f1 > best + 1e-9:
                    best, cuts = f1, trial
    return cuts


def choose_thresholds(
    cfg: Config,
    data: WSSSDataset,
    model,
    meta: dict,
    kwargs,
    path: Path | None = None,
    resume: bool = False,
) -> list[float]:
    """Each class's score threshold, chosen by ``classifier.threshold_folds``-fold
    cross-validation on the training photos: every photo scored by a classifier that did
    not train on it (one trained per fold with the same recipe; an untrained head scores
    them as it is), then the thresholds of the best per-image label F1 over the photos
    (``label_thresholds``). Saved in the checkpoint's meta (``score_thresholds``,
    ``threshold_cv``; of ``path``, default the stage's best.pt), which the refiner reads in
    place of ``refine.score_threshold``."""
    if not cfg.data.kind.multi_label:
        raise InputError(
            "classifier.threshold_folds: per-class thresholds are for multi-label tasks"
        )
    folds = cfg.classifier.threshold_folds
    if folds < 2 and kwargs is not None:
        raise InputError("classifier.threshold_folds: 0 (off) or at least 2 folds")
    order = np.random.default_rng(cfg.train.seed).permutation(len(data))
    scores = np.zeros((len(data), model.num_classes), np.float32)
    for k in range(folds if kwargs is not None else 1):
        held = np.sort(order[k::folds]) if kwargs is not None else np.arange(len(data))
        fold_model = model
        if kwargs is not None:  # a classifier per fold, trained without its held-out photos
            rest = np.setdiff1d(np.arange(len(data)), held)
            tr, va = _split(len(rest), cfg.data.val_fraction, cfg.train.seed)
            fold = build_classifier(
                cfg.classifier.arch, pretrained=cfg.classifier.pretrained, **kwargs
            )
            _seed(cfg)
            fold_model = _fit_classifier(
                cfg, fold, data, rest[tr], rest[va], meta, f"classifier/folds/{k}", resume=resume
            )
        served = ClassifierGraph(fold_model.eval(), multi_label=True).eval()
        with torch.inference_mode():
            for start in range(0, len(held), cfg.train.batch_size):
                idx = held[start : start + cfg.train.batch_size]
                scores[idx] = served(torch.from_numpy(data.images[idx]))[0].numpy()
    truth = np.zeros(scores.shape, bool)
    labels = data_labels(data, meta["class_names"])
    for row, known in zip(truth, labels, strict=True):
        row[list(known or ())] = True
    # Each photo's classes the classifier has no class for (person, to an ImageNet head):
    # misses in the label F1 whatever the cuts, as evaluate counts them.
    missed = np.array(missing_labels([s.labels for s in data.samples], labels))
    cuts = label_thresholds(scores, truth, missed=missed, min_score=cfg.refine.min_score)
    thresholds = [float(t) for t in cuts]
    path = path or Path(cfg.runs) / "classifier" / "best.pt"
    if distributed.is_main():
        ckpt = load_checkpoint(path)
        ckpt["meta"]["score_thresholds"] = thresholds
        ckpt["meta"]["threshold_cv"] = {
            "folds": folds if kwargs is not None else 0,
            "images": len(data),
            "label_f1": round(_label_f1(scores, cuts, truth, missed, cfg.refine.min_score), 4),
            "positives": truth.sum(0).tolist(),
        }
        save_checkpoint(ckpt, path)
        shown = ", ".join(
            f"{n} {t:.3f}" for n, t in zip(meta["class_names"], thresholds, strict=True)
        )
        tqdm.write(f"classifier: per-class thresholds by cross-validation: {shown}")
    distributed.barrier()
    return thresholds


def data_labels(data: WSSSDataset, class_names: list[str]) -> list[tuple[int, ...] | None]:
    """Each image's labels in the classifier's classes (``translate_labels``)."""
    labels = [s.labels for s in data.samples]
    return translate_labels(labels, data.class_names, class_names, data.aliases)


class _LevelSetView(_View):
    """Images with (seed mask, image label): the level-set stage's two kinds of target."""

    def __getitem__(self, k: int):
        image, mask = super().__getitem__(k)
        return image, (mask, self.base.target(int(self.indices[k])))


def seed_masks(cfg: Config, classifier: nn.Module, data: WSSSDataset, names: list[str]):
    """The CAM masks of eq 10, one class index (+ 1) per pixel, from the image labels.

    Each labelled class's CAM is thresholded (and refined) as ``levelset.seed`` says;
    overlaps go to the strongest CAM, unclaimed pixels to the background. Under torchrun
    each rank makes the seeds of its ``batch_shard`` and the ranks exchange them: every rank
    needs all of them (its sampler draws from the whole set), none computes them all.
    """
    multi = cfg.data.kind.multi_label
    served = ClassifierGraph(classifier, multi, cam_method=cfg.classifier.cam_method).eval()
    seed = seeded(cfg.refine, cfg.levelset.seed)
    pipe = Pipeline(served, None, build_refiner(seed, multi, binary=False))
    bs = cfg.train.batch_size
    share = distributed.batch_shard(len(data), bs)
    mine = _masks(pipe, data, data_labels(data, names), bs, "seed masks", share=share)
    return distributed.all_gather_shares(mine, len(data), bs)


def train_levelset(
    cfg: Config, data: WSSSDataset, classifier: nn.Module, cmeta: dict, resume: bool = False
) -> nn.Module:
    """Level-set initialisation + FNO evolution on the classifier's features (eq 27)."""
    if cmeta["class_names"] != data.class_names:
        raise InputError(
            "the level-set refiner learns the task's classes: train it from a task head "
            "(classifier.head=task), not the ImageNet head"
        )
    _seed(cfg)
    seeds = seed_masks(cfg, classifier, data, cmeta["class_names"])
    feature_channels = classifier.fc.in_features
    kwargs = head_kwargs(cfg.levelset, feature_channels, data.num_classes, data.size)
    head = LevelSetHead(**kwargs)
    model = LevelSetModel(classifier, head, cfg.levelset.finetune, cfg.classifier.cam_method)
    multi = cfg.data.kind.multi_label
    loss = LevelSetLoss(cfg.levelset, data.num_classes, multi, data.size)
    tr, va = _split(len(data), cfg.data.val_fraction, cfg.train.seed)
    train = _LevelSetView(data, tr, True, seeds[tr])
    val = _LevelSetView(data, va, False, seeds[va])
    keep = ("family", "arch", "task", "kwargs", "class_names", "score_thresholds")
    cmeta = {k: v for k, v in cmeta.items() if k in keep}
    meta = {
        "family": "levelset",
        "task": cfg.data.kind.as_meta(),
        "kwargs": kwargs,
        "finetune": cfg.levelset.finetune,
        "classifier": cmeta,
    }
    epochs, lr = cfg.levelset.epochs, cfg.levelset.lr
    return _train(cfg, model, train, val, loss, meta, epochs, lr, resume=resume)


def make_pseudo_masks(cfg: Config, data: WSSSDataset, share: range | None = None) -> np.ndarray:
    """Refined CAM masks for every training image (or the images ``share`` indexes), from
    its image-level labels, as class indices of the data's classes (an ImageNet head's
    groups are matched by name).

    An image whose labels the classifier has no class for (an ImageNet head's groups that
    miss some of the data's classes) gets the pseudo-mask of its predictions instead, as
    served; where even its top score is below ``refine.min_score`` it gets none (255, so the
    segmenter ignores it rather than learn that the object is background).
    """
    classifier, refiner, meta = refine_step(cfg)
    pipe = Pipeline(classifier, None, refiner)
    labels = data_labels(data, meta["class_names"])
    desc = f"pseudo-masks ({refiner.name})"
    masks = _masks(pipe, data, labels, cfg.train.batch_size, desc, cfg.refine, share)
    values = mask_values(data.class_names, meta["class_names"])
    return masks if values is None or refiner.binary else values[masks]


def _masks(
    pipe: Pipeline,
    data: WSSSDataset,
    labels: list,
    bs: int,
    desc: str,
    refine: RefineConfig | None = None,
    share: range | None = None,
) -> np.ndarray:
    """The masks of the images ``share`` indexes (default: all), in batches of ``bs`` from
    its start: one process's batches when the share starts on a batch boundary."""
    share = range(len(data)) if share is None else share
    min_score = refine.min_score if refine is not None else 0.0
    out = np.empty((len(share),) + data.masks.shape[1:], np.uint8)
    starts = range(share.start, share.stop, bs)
    for start in tqdm(starts, desc=desc, leave=False, disable=not distributed.is_main()):
        stop = min(start + bs, share.stop)
        images = data.images[start:stop]
        batch = labels[start:stop]
        outputs = pipe.classify(images)
        masks = pipe.refine(images, outputs, batch)
        unsure = outputs[0].numpy().max(axis=1) < min_score
        masks[np.array([ls is None for ls in batch]) & unsure] = IGNORE
        out[start - share.start : stop - share.start] = masks
    return out


def train_share(cfg: Config) -> WSSSDataset | None:
    """Only this rank's share of the training images, decoded (``distributed.batch_shard`` of
    the listed images); None where the share is empty.

    With ``data.skip_unreadable`` a share loses its own unreadable images, so later batches
    start where one process's would not (the masks of a batch do not depend on which
    images share it, up to float rounding).
    """
    layout = cfg.data.layout
    listed = list_samples(cfg.data.root, cfg.data.task, "train", layout)
    share = distributed.batch_shard(len(listed), cfg.train.batch_size)
    if distributed.is_main():
        what = describe(cfg.data.root, cfg.data.task, "train", layout)
        each = ", each rank decodes its share" if distributed.active() else ""
        tqdm.write(f"train data: {what}: {len(listed):,} images listed{each}")
    if not len(share):
        return None
    return WSSSDataset(
        cfg.data.root,
        cfg.data.task,
        "train",
        cfg.data.image_size,
        samples=listed[share.start : share.stop],
        layout=layout,
        skip_unreadable=cfg.data.skip_unreadable,
        max_pixels=cfg.data.max_image_pixels,
    )


def pseudo_source(cfg: Config) -> dict[str, str]:
    """What the training pseudo-masks are made from, as digests: the classifier run (its
    checkpoint: weights and thresholds; none where there is none, e.g. a level set's own)
    and the settings that shape the masks (refine, the classifier's, CAM method included,
    the image size, a trained refiner's settings and checkpoint) and the photos
    (``photos_digest``). Saved with the masks:
    masks of another source are made again, and the segmenter records the classifier's."""
    runs = Path(cfg.runs)
    network = RefinerSpec.of(cfg.refine).checkpoint
    settings = {
        "refine": dataclasses.asdict(cfg.refine),
        "classifier": dataclasses.asdict(cfg.classifier),
        "image_size": cfg.data.image_size,
    }
    if network:
        settings["levelset"] = dataclasses.asdict(cfg.levelset)
        if (runs / network).exists():
            settings["network"] = file_digest(runs / network)
    text = json.dumps(settings, sort_keys=True, default=str)
    classifier = runs / "classifier" / "best.pt"
    d = cfg.data
    return {
        "classifier": file_digest(classifier) if classifier.exists() else "none",
        "settings": hashlib.sha256(text.encode()).hexdigest(),
        "photos": photos_digest(list_samples(d.root, d.task, "train", d.layout)),
    }


def photos_digest(samples: list[Sample]) -> str:
    """The training photos as listed: each one's name, image-level labels (the masks are
    made for them) and file content, read without decoding: photos replaced or labels
    edited under the same names give another digest. The content, not the file's time: a
    copy of the data on each node of a torchrun job is the same data (ranks that decided
    apart whether saved masks fit would wait on each other forever)."""
    digest = hashlib.sha256()
    for s in samples:
        try:
            file = _photo_digest(s.image_path)
        except OSError:  # missing: data.skip_unreadable skips it, or the decoder says so
            file = None
        digest.update(json.dumps([s.name, list(s.labels), file]).encode())
    return digest.hexdigest()[:16]


# A photo's content digest, kept for the process while the file is the one it was (same
# inode, size and time to the nanosecond): a run asks twice (are the saved masks this
# chain's, then the masks' record), which read VOC's 10,582 photos, ~1.5 GB, each time.
_PHOTO_DIGESTS: dict[tuple, str] = {}


def _photo_digest(path: Path) -> str:
    st = os.stat(path)
    key = (os.fspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _PHOTO_DIGESTS:
        _PHOTO_DIGESTS[key] = file_digest(path)
    return _PHOTO_DIGESTS[key]


def write_pseudo_masks(cfg: Config, data: WSSSDataset | None, path: Path) -> None:
    """The pseudo-masks of the training set, made by every rank and saved by rank 0 to
    ``path`` (masks, names, and their ``pseudo_source``).

    Each rank makes those of its contiguous share (whole batches: the batches one process
    makes, so the same masks, byte for byte) and writes them as its part; rank 0 merges the
    parts in rank order. No rank waits for the whole set: only for the slowest share, then
    for the merge. ``data``: the whole training set, already decoded for another stage, or
    None to decode only this rank's share. Rank 0 records how long it took, from decoding
    to the merged file, in ``<path stem>.json``.
    """
    t0 = time.perf_counter()
    if data is None:
        data = train_share(cfg)
        share = None if data is None else range(len(data))
    else:
        share = distributed.batch_shard(len(data), cfg.train.batch_size)
    if data is None or not len(share):  # more ranks than batches: an empty part
        size = cfg.data.image_size
        masks, names = np.empty((0, size, size), np.uint8), np.array([], str)
    else:
        masks = make_pseudo_masks(cfg, data, share)
        names = np.array([data.samples[i].name for i in share])
    parts = distributed.exchange_parts(
        path.parent / "parts", path.stem, {"masks": masks, "names": names}
    )
    with distributed.main_first() as main:  # the others wait for the merge only
        if main:
            merged = {k: np.concatenate([p[k] for p in parts]) for k in ("masks", "names")}
            merged |= {k: np.array(v) for k, v in pseudo_source(cfg).items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("wb") as f:
                np.savez_compressed(f, **merged)
            os.replace(tmp, path)  # a killed merge leaves the previous masks, not half
            made = {"images": len(merged["masks"]), "processes": distributed.world_size()}
            made["seconds"] = round(time.perf_counter() - t0, 3)
            made |= _mask_shares(merged["masks"])
            path.with_suffix(".json").write_text(json.dumps(made) + "\n")
            tqdm.write(
                f"pseudo-masks: {made['images']} images in {made['seconds']:.1f} s, "
                f"{made['foreground']:.0%} of their pixels a class's"
            )
            if made["empty"] * 2 > made["images"]:  # a segmenter would learn background
                tqdm.write(
                    f"pseudo-masks: {made['empty']} of {made['images']} are all background "
                    "(photos of none of the classes aside: a classifier trained too little, or "
                    "a refiner cutting too high; `wsss study cams --set evaluate.split=train` "
                    "shows them): a segmenter learns little from them"
                )


def _mask_shares(masks: np.ndarray, chunk: int = 256) -> dict:
    """How much of a set of pseudo-masks is a class's: the share of the scored pixels (255
    ignored), and how many masks are all background (wholly ignored ones, photos the
    refiner left out, are not). A chunk at a time: VOC's train_aug at 320 px is 1 GB."""
    inside = scored = empty = 0
    for start in range(0, len(masks), chunk):
        part = masks[start : start + chunk].reshape(min(chunk, len(masks) - start), -1)
        known = part != IGNORE
        classed = known & (part != 0)
        inside, scored = inside + int(classed.sum()), scored + int(known.sum())
        empty += int((known.any(1) & ~classed.any(1)).sum())
    return {"foreground": round(inside / max(scored, 1), 4), "empty": empty}


class SegmentationLoss(nn.Module):
    """Cross-entropy (``ce``) or one binary cross-entropy per class (``bce``, one vs rest)
    over the labelled pixels (255 ignored), plus ``dice`` x soft Dice over the classes.

    A batch with no labelled pixel, all boundary or unknown, contributes nothing: torch's
    mean over zero pixels would be NaN.
    """

    def __init__(self, kind: str = "ce", dice: float = 0.0):
        super().__init__()
        if kind not in ("ce", "bce") or dice < 0:
            raise InputError("segmenter.loss: ce or bce; segmenter.dice: a weight >= 0")
        self.kind, self.dice = kind, dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != IGNORE
        if not valid.any():
            return logits.sum() * 0.0
        k = logits.shape[1]
        onehot = F.one_hot(torch.where(valid, target, 0), k).permute(0, 3, 1, 2).float()
        if self.kind == "ce":
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE)
            probs = torch.softmax(logits, dim=1)
        else:
            per_pixel = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
            loss = per_pixel.mean(dim=1)[valid].mean()
            probs = torch.sigmoid(logits)
        if self.dice:
            v = valid[:, None].float()
            inter = (probs * onehot * v).sum(dim=(0, 2, 3))
            total = (probs * v).sum(dim=(0, 2, 3)) + (onehot * v).sum(dim=(0, 2, 3))
            loss = loss + self.dice * (1 - ((2 * inter + 1) / (total + 1)).mean())
        return loss


def segmenter_kwargs(cfg: Config, num_classes: int) -> tuple[dict, dict]:
    """The segmenter's builder arguments: to build it now (ImageNet weights included), and
    to rebuild it from its checkpoint (whose weights replace them)."""
    seg = cfg.segmenter
    if seg.arch == "unet":
        kwargs = {
            "num_classes": num_classes,
            "base_channels": seg.base_channels,
            "depth": seg.depth,
        }
        return kwargs, kwargs
    kwargs = {
        "num_classes": num_classes,
        "backbone": seg.backbone,
        "output_stride": seg.output_stride,
    }
    return kwargs | {"pretrained": seg.pretrained, "weights": seg.weights}, kwargs


def train_segmenter(
    cfg: Config,
    data: WSSSDataset,
    masks: np.ndarray,
    supervised: bool = False,
    made_by: str | None = None,
    resume: bool = False,
    source: str | None = None,
) -> nn.Module:
    """The segmenter, fully supervised on ``masks``: the pseudo-masks (the weakly supervised
    result), or with ``supervised`` the ground truth (the upper bound every weakly supervised
    row is read against), written to ``<runs>/supervised``. Boundary pixels (255) are
    ignored, and images with no pseudo-mask at all (255 everywhere) are left out; validation
    loss is on held-out masks of the same kind. ``made_by``: the digest of the classifier
    run that made the pseudo-masks, recorded for export to compare; ``source``: what made
    them (``wsss reproduce``'s digest of their ``pseudo_source``), which its reuse reads.
    """
    _seed(cfg)
    seg = cfg.segmenter
    build, kwargs = segmenter_kwargs(cfg, cfg.data.kind.segmentation_classes(data.num_classes))
    model = build_segmenter(seg.arch, **build)
    if seg.arch == "deeplabv3" and not (seg.pretrained or seg.weights):
        tqdm.write(
            f"segmenter: DeepLabV3's {seg.backbone} backbone trains from scratch (no ImageNet "
            "weights: segmenter.pretrained=true or segmenter.weights=<state dict>)"
        )
    usable = (masks != IGNORE).any(axis=(1, 2))
    if not usable.any():
        raise InputError("no training image has a mask: nothing to train the segmenter on")
    if not usable.all():
        tqdm.write(f"segmenter: {int((~usable).sum())} of {len(masks)} images have no mask")
    tr, va = (idx[usable[idx]] for idx in _split(len(data), cfg.data.val_fraction, cfg.train.seed))
    if not len(va):  # every held-out image lacked a mask: hold out one that has one
        tr, va = tr[1:], tr[:1]
    train, val = _View(data, tr, True, masks[tr]), _View(data, va, False, masks[va])
    meta = {
        "family": "segmenter",
        "arch": cfg.segmenter.arch,
        "task": cfg.data.kind.as_meta(),
        "kwargs": kwargs,
        "class_names": data.class_names,  # its outputs: background, then these
        "palette": data.palette,  # their colours in mask PNGs (export's palette.json)
        "targets": "ground truth" if supervised else "pseudo-masks",
    }
    if made_by is not None:  # the classifier run whose pseudo-masks it learns (its digest)
        meta["classifier_digest"] = made_by
    if source is not None:
        meta["pseudo_source"] = source
    out = "supervised" if supervised else "segmenter"
    loss = SegmentationLoss(seg.loss, seg.dice)
    return _train(cfg, model, train, val, loss, meta, seg.epochs, seg.lr, out=out, resume=resume)


def passthrough_segmenter(cfg: Config, data: WSSSDataset | None = None) -> nn.Module:
    """``segmenter.arch: passthrough``: nothing to train, the refined mask is served as the
    segmentation. Its checkpoint (no weights: its classes and palette) is still written, so
    every later stage reads the segmenter the same way. The data's class names and palette
    are read from ``data``, or from ``cfg.data`` without decoding a photo."""
    if data is None:
        require_synth(cfg.data)
        root, task, layout = cfg.data.root, cfg.data.task, cfg.data.layout
        names, palette = read_class_names(root, task, layout), read_palette(root, task, layout)
    else:
        names, palette = data.class_names, data.palette
    num_classes = cfg.data.kind.segmentation_classes(len(names))
    meta = {
        "family": "segmenter",
        "arch": PASSTHROUGH,
        "task": cfg.data.kind.as_meta(),
        "kwargs": {"num_classes": num_classes},
        "class_names": names,
        "palette": palette,
        "targets": "none: the served PSEUDO_MASK passes through",
    }
    note = "segmenter: passthrough, nothing to train: SEGMENTATION is the PSEUDO_MASK"
    return _untrained(cfg, "segmenter", PassThroughSegmenter(num_classes), meta, note)


def _untrained(
    cfg: Config, stage: str, model: nn.Module, meta: dict, note: str, finish: bool = True
) -> nn.Module:
    """A stage with nothing to train: its model saved as if trained (rank 0 writes, the
    others wait), so that export and the next stages find it where they look; with
    ``finish`` False as a partial run (``fit``'s), for a caller with more to write."""
    out = Path(cfg.runs) / stage
    with distributed.main_first() as main:
        if main:
            out.mkdir(parents=True, exist_ok=True)
            path = out / "best.pt" if finish else partial_checkpoint(out)
            save_checkpoint({"state_dict": model.state_dict(), "meta": meta}, path)
            if finish:
                save_config(cfg, out / "config.yaml")
            tqdm.write(note)
    return model.eval()


def _data_digest(*views: Dataset) -> str:
    """Which photos (by name, at which size, their pixels and image-level labels) and which
    masks a stage trains and validates on: a complete run is kept by --resume only for the
    same, a stopped one resumed (photos replaced or labels edited under the same names were
    kept by the names alone)."""
    digest = hashlib.sha256()
    for view in views:
        base = view.base
        samples = [base.samples[int(i)] for i in view.indices]
        labels = [[s.name, list(s.labels)] for s in samples]
        digest.update(json.dumps([base.size, labels]).encode())
        for i in view.indices:
            digest.update(base.images[int(i)].tobytes())
        if view.masks is not None:  # the pseudo-masks (or the truth) a segmenter learns
            digest.update(np.ascontiguousarray(view.masks).tobytes())
    return digest.hexdigest()[:16]


# The settings a stage's training reads (wsss.config's sections): --resume keeps a complete
# run, and continues a stopped one, made with the same (the ports a server is started on,
# an export's or evaluation's settings, another stage's recipe are none of its business).
STAGE_SETTINGS = {
    "classifier": ("data", "classifier", "train"),
    "levelset": ("data", "classifier", "refine", "levelset", "train"),
    "segmenter": ("data", "segmenter", "train"),
}


def stage_settings(cfg: Config, family: str) -> dict:
    full = dataclasses.asdict(cfg)
    settings = {k: full[k] for k in STAGE_SETTINGS[family]}
    if family == "classifier" and cfg.classifier.threshold_folds:
        # its per-class thresholds are chosen under the refiner's min_score
        settings["refine"] = {"min_score": cfg.refine.min_score}
    return settings


def _changed(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ."""
    keys = []
    for key in sorted({*saved, *now}):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed(a, b, f"{prefix}{key}.")
        elif _as_json(a) != _as_json(b):
            keys.append(f"{prefix}{key}")
    return keys


def _as_json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _desc(family: str, out: Path, runs: Path) -> str:
    """What a stage's lines call it: ``classifier``, ``classifier folds/2``, ``segmenter
    supervised``."""
    home = runs / family
    if out == home:
        return family
    return f"{family} {out.relative_to(home).as_posix() if out.is_relative_to(home) else out.name}"


def reusable(cfg: Config, family: str, out: Path, meta: dict | None = None) -> dict | None:
    """The checkpoint of the complete run in ``out`` (its config saved beside its
    ``best.pt``) where it stands for the ``family`` stage trained now: made with this
    stage's settings (``STAGE_SETTINGS``; an export's or evaluation's, another stage's
    recipe are none of its business) and, where ``meta`` is given, saying it was made as
    ``meta`` says this one would be (its photos and masks, its classes, the classifier run
    its pseudo-masks came from). ``None`` where it does not, saying why where a run is
    there. The one decider of reuse: ``train --resume``, ``wsss reproduce`` and the
    level-set tuning ask it."""
    saved = out / "config.yaml"
    if not (saved.is_file() and (out / "best.pt").is_file()):
        return None
    try:  # keys of another version of wsss left out, renamed ones read by their new names
        trained = load_saved_config(saved)
        ckpt = load_checkpoint(out / "best.pt")
    except (OSError, InputError, WsssError) as exc:  # not a config; a checkpoint cut short
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _not_kept(family, out, f"its files do not read ({why})")
    changed = _changed(stage_settings(trained, family), stage_settings(cfg, family))
    if changed:
        shown = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
        return _not_kept(family, out, f"it was trained with other {shown}")
    if meta is not None and _as_json(meta) != _as_json({k: ckpt["meta"].get(k) for k in meta}):
        return _not_kept(family, out, "it was trained on other photos, masks or classes")
    return ckpt


def _kept(cfg: Config, model: nn.Module, meta: dict, out: Path) -> bool:
    """With ``--resume``: ``out`` holds a run that stands for this one (``reusable``); its
    weights are loaded into ``model``. A run with other settings or photos is said and
    trained again."""
    ckpt = reusable(cfg, meta["family"], out, meta)
    if ckpt is None:
        return False
    model.load_state_dict(ckpt["state_dict"])
    if distributed.is_main():
        tqdm.write(f"{meta['family']}: kept, trained with these settings ({out}; --resume)")
    return True


def _not_kept(family: str, out: Path, why: str) -> None:
    if distributed.is_main():
        tqdm.write(f"{family}: the complete run in {out} is not kept: {why}")


def _seed(cfg: Config) -> None:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    np.random.seed(cfg.train.seed + distributed.rank())  # the augmentations draw from numpy


def _train(
    cfg: Config,
    model: nn.Module,
    train: Dataset,
    val: Dataset,
    loss,
    meta: dict,
    epochs: int | None = None,
    lr: float | None = None,
    out: str | None = None,
    finish: bool = True,
    resume: bool = False,
) -> nn.Module:
    """The one training loop on seeded loaders; the resolved config lands beside the best.pt
    in ``<runs>/<out>`` (default: the model's family). With ``finish`` False the run stays
    partial and without its config (``fit``). With ``resume`` a complete run of the same
    settings is kept (``_kept``) and a stopped one continues after its last finished epoch."""
    family = meta["family"]
    out = Path(cfg.runs) / (out or family)
    meta = meta | {"data_digest": _data_digest(train, val)}  # what --resume keeps it for
    if resume and finish and _kept(cfg, model, meta, out):
        return model.cpu().eval()
    run_key = _as_json(stage_settings(cfg, family))
    fit(
        model,
        *_loaders(cfg, train, val),
        loss,
        epochs=cfg.train.epochs if epochs is None else epochs,
        lr=cfg.train.lr if lr is None else lr,
        weight_decay=cfg.train.weight_decay,
        device=resolve_device(cfg.train.device),
        out_dir=out,
        meta=meta,
        desc=_desc(family, out, Path(cfg.runs)),
        finish=finish,
        resume=resume,
        run_key=run_key,
    )
    if finish and distributed.is_main():
        save_config(cfg, out / "config.yaml")
    return model.cpu().eval()


# The weakly supervised chain, in order; ``supervised`` (the segmenter on the true masks,
# the upper bound) runs only when named.


def _fits(pseudo_path: Path, data: WSSSDataset | None, cfg: Config) -> bool:
    """Saved pseudo-masks that belong to this data and this chain: same images, same size,
    made by the classifier run and settings there are now (``pseudo_source``). Without
    ``data`` (nothing decoded), the images are the layout's list of the training photos."""
    if not pseudo_path.exists():
        return False
    saved = np.load(pseudo_path)
    if data is not None:
        names, shape = [s.name for s in data.samples], data.masks.shape
    else:
        d = cfg.data
        names = [s.name for s in list_samples(d.root, d.task, "train", d.layout)]
        shape = (len(names), d.image_size, d.image_size)
    if saved["masks"].shape != shape or saved["names"].tolist() != names:
        return False
    source = pseudo_source(cfg)
    return all(k in saved.files and str(saved[k]) == v for k, v in source.items())


def check_architectures(cfg: Config, stages: tuple[str, ...]) -> None:
    """The networks ``stages`` build are in the registry: a misspelt segmenter would
    otherwise fail only after the classifier and its pseudo-masks were made."""
    wanted = []
    if "classifier" in stages:
        wanted.append(("classifier.arch", cfg.classifier.arch, CLASSIFIERS))
    if cfg.segmenter.arch != PASSTHROUGH and {"segmenter", "supervised"} & set(stages):
        wanted.append(("segmenter.arch", cfg.segmenter.arch, [*SEGMENTERS, PASSTHROUGH]))
        if cfg.segmenter.arch == "deeplabv3":
            wanted.append(("segmenter.backbone", cfg.segmenter.backbone, CLASSIFIERS))
    for key, name, registry in wanted:
        if name not in registry:
            raise InputError(f"{key} {name!r}: one of {', '.join(sorted(registry))}")


def run(cfg: Config, stages: tuple[str, ...] = DEFAULT_STAGES, resume: bool = False) -> None:
    """Train what ``stages`` names; later stages reuse the saved checkpoint of earlier ones.

    With ``resume`` (``wsss train --resume``: the same command again after a stop) a stage
    whose complete run was made with these settings is kept, saved pseudo-masks of this
    chain are reused, and a training stopped part way continues after its last finished
    epoch (``training.loop.fit``); the rest runs.

    ``levelset`` runs only with ``refine.method: levelset``, and is trained when missing if
    pseudo-masks are to be made; saved pseudo-masks are reused only for the same images.
    With ``segmenter.arch: passthrough`` nothing reads training pseudo-masks: ``pseudo`` and
    ``supervised`` are skipped and ``segmenter`` writes the pass-through's checkpoint.
    """
    stages = tuple(s.strip() for s in stages if s.strip())  # "classifier, pseudo" too
    if not stages:
        raise InputError(f"--stages names none: choose from {', '.join(STAGES)}")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        close = [m for u in unknown for m in difflib.get_close_matches(u, STAGES, 1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(f"unknown stage(s) {unknown}{hint}: choose from {', '.join(STAGES)}")
    network = RefinerSpec.of(cfg.refine).checkpoint  # a refiner trained here (the level set)
    if stages == ("levelset",) and not network:  # asked for alone: nothing would run
        raise InputError(
            f"--stages levelset: refine.method {cfg.refine.method} trains no level set "
            "(--set refine.method=levelset)"
        )
    check_architectures(cfg, stages)
    resolve_device(cfg.train.device)  # under torchrun: join the process group first
    runs = Path(cfg.runs)
    # The photos are decoded once, and only when a stage reads them: the ImageNet head and a
    # pass-through segmenter train on nothing; pseudo-masks alone decode only each rank's
    # share (write_pseudo_masks).
    needs_pseudo = "pseudo" in stages or "segmenter" in stages
    trains_levelset = bool(network) and (
        "levelset" in stages or (needs_pseudo and not (runs / network).exists())
    )
    passthrough = cfg.segmenter.arch == PASSTHROUGH
    pseudo_only = tuple(stages) == ("pseudo",) and not passthrough and not trains_levelset
    reads_photos = (
        ("classifier" in stages and (learns_classes(cfg) or bool(cfg.classifier.threshold_folds)))
        or trains_levelset
        or (
            not passthrough
            and not pseudo_only
            and any(s in stages for s in ("pseudo", "segmenter", "supervised"))
        )
    )
    asked = "levelset" in stages and tuple(stages) != DEFAULT_STAGES  # not just the default
    if asked and not network and distributed.is_main():
        tqdm.write(
            f"levelset: skipped, refine.method {cfg.refine.method} trains no level set "
            "(--set refine.method=levelset)"
        )
    data = load_train_set(cfg) if reads_photos else None
    if "classifier" in stages:
        train_classifier(cfg, data, resume)
    distributed.barrier()  # every rank decides what to make from the same files
    if trains_levelset:
        classifier, cmeta = load_model(runs / "classifier" / "best.pt")
        check_tiles(cfg, classifier, runs / "classifier")
        train_levelset(cfg, data, classifier, cmeta, resume)
    pseudo_path = runs / "pseudo" / "train_masks.npz"
    distributed.barrier()
    if cfg.segmenter.arch == PASSTHROUGH:  # no segmenter to train: no masks to train it on
        skipped = [s for s in ("pseudo", "supervised") if s in stages]
        if skipped and distributed.is_main():
            tqdm.write(f"{', '.join(skipped)}: skipped, segmenter.arch passthrough trains nothing")
        if "segmenter" in stages:
            passthrough_segmenter(cfg, data)
        return
    fits = ("segmenter" in stages or resume) and _fits(pseudo_path, data, cfg)
    if ("pseudo" in stages and not (resume and fits)) or ("segmenter" in stages and not fits):
        write_pseudo_masks(cfg, data, pseudo_path)  # under torchrun: sharded over the ranks
    elif "pseudo" in stages and distributed.is_main():
        tqdm.write(f"pseudo: kept, made by this classifier and these settings ({pseudo_path})")
    if "segmenter" in stages:
        saved = np.load(pseudo_path)
        made_by = str(saved["classifier"]) if "classifier" in saved.files else None
        made_by = None if made_by == "none" else made_by
        train_segmenter(cfg, data, saved["masks"], made_by=made_by, resume=resume)
    if "supervised" in stages:
        train_segmenter(cfg, data, data.masks, supervised=True, resume=resume)
