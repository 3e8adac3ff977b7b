"""The training stages: classifier -> pseudo-masks -> segmenter. ``wsss train`` runs them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from training.data.dataset import WSSSDataset, random_resized_crop_flip
from training.data.layouts import IGNORE, read_class_names, segmentation_classes
from training.levelset.model import LevelSetHead
from training.levelset.train import LevelSetLoss, LevelSetModel, head_kwargs
from training.loop import fit, resolve_device
from training.models import build_classifier, build_segmenter
from training.pipeline import Pipeline, ServedClassifier, load_model, refine_step
from training.refine import build_refiner
from wsss.config import Config, save_config


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
        # Segmenter training swaps the target for the pseudo-mask; GT masks stay unseen.
        mask = self.masks[k] if self.masks is not None else self.base.masks[i]
        if self.augment:
            image, mask = random_resized_crop_flip(image, mask, self.base.size)
        image = torch.from_numpy(np.ascontiguousarray(image))
        mask = torch.from_numpy(np.ascontiguousarray(mask)).long()
        return (image, mask) if self.masks is not None else (image, self.base.target(i))


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def load_train_set(cfg: Config) -> WSSSDataset:
    k = len(read_class_names(cfg.data.root, cfg.data.task))
    return WSSSDataset(cfg.data.root, cfg.data.task, "train", cfg.data.image_size, k)


def _loaders(cfg: Config, train: Dataset, val: Dataset) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(cfg.train.seed)
    kw = {"batch_size": cfg.train.batch_size, "num_workers": cfg.data.num_workers}
    return DataLoader(
        train, shuffle=True, drop_last=len(train) > cfg.train.batch_size, generator=g, **kw
    ), DataLoader(val, **kw)


def train_classifier(cfg: Config, data: WSSSDataset) -> nn.Module:
    """Image-level labels only: cross-entropy (pets) or binary cross-entropy (voc)."""
    _seed(cfg)
    kwargs = {
        "num_classes": data.num_classes,
        "output_stride": cfg.classifier.output_stride,
        "weights": cfg.classifier.weights,
    }
    model = build_classifier(cfg.classifier.arch, pretrained=cfg.classifier.pretrained, **kwargs)
    tr, va = _split(len(data), cfg.data.val_fraction, cfg.train.seed)
    loss = nn.CrossEntropyLoss() if cfg.data.task == "pets" else nn.BCEWithLogitsLoss()
    # The checkpoint rebuilds the architecture; its weights then replace any pretrained ones.
    meta = {
        "family": "classifier",
        "arch": cfg.classifier.arch,
        "task": cfg.data.task,
        "kwargs": kwargs | {"weights": None},
        "class_names": read_class_names(cfg.data.root, cfg.data.task),
    }
    return _train(cfg, model, _View(data, tr, True), _View(data, va, False), loss, meta)


class _LevelSetView(_View):
    """Images with (seed mask, image label): the level-set stage's two kinds of target."""

    def __getitem__(self, k: int):
        image, mask = super().__getitem__(k)
        return image, (mask, self.base.target(int(self.indices[k])))


def seed_masks(cfg: Config, classifier: nn.Module, data: WSSSDataset) -> np.ndarray:
    """The CAM masks of eq 10, one class index (+ 1) per pixel, from the image labels.

    Each labelled class's CAM is thresholded as ``levelset.seed`` says; overlaps go to the
    strongest CAM, unclaimed pixels to the background.
    """
    classifier.cam_method = cfg.classifier.cam_method
    multi = cfg.data.task == "voc"
    served = ServedClassifier(classifier, multi_label=multi).eval()
    seed = dataclasses.replace(cfg.refine, method=cfg.levelset.seed, grabcut=False, chanvese=False)
    pipe = Pipeline(served, None, build_refiner(seed), multi_label=multi)
    return _masks(pipe, data, cfg.train.batch_size, "seed masks", binary=False)


def train_levelset(cfg: Config, data: WSSSDataset, classifier: nn.Module, cmeta: dict) -> nn.Module:
    """Level-set initialisation + FNO evolution on the classifier's features (eq 27)."""
    _seed(cfg)
    seeds = seed_masks(cfg, classifier, data)
    feature_channels = classifier.fc.in_features
    kwargs = head_kwargs(cfg.levelset, feature_channels, data.num_classes, data.size)
    model = LevelSetModel(classifier, LevelSetHead(**kwargs), cfg.levelset.finetune)
    multi = cfg.data.task == "voc"
    loss = LevelSetLoss(cfg.levelset, data.num_classes, multi, data.size)
    tr, va = _split(len(data), cfg.data.val_fraction, cfg.train.seed)
    train = _LevelSetView(data, tr, True, seeds[tr])
    val = _LevelSetView(data, va, False, seeds[va])
    keep = ("family", "arch", "task", "kwargs", "class_names")
    meta = {
        "family": "levelset",
        "task": cfg.data.task,
        "kwargs": kwargs,
        "finetune": cfg.levelset.finetune,
        "classifier": {k: cmeta[k] for k in keep},
    }
    return _train(cfg, model, train, val, loss, meta, cfg.levelset.epochs, cfg.levelset.lr)


def make_pseudo_masks(cfg: Config, data: WSSSDataset) -> np.ndarray:
    """Refined CAM masks for every training image, from its image-level labels."""
    classifier, refiner, _ = refine_step(cfg)
    pipe = Pipeline(classifier, None, refiner, classifier.multi_label)
    return _masks(pipe, data, cfg.train.batch_size, f"pseudo-masks ({refiner.name})")


def _masks(
    pipe: Pipeline, data: WSSSDataset, bs: int, desc: str, binary: bool | None = None
) -> np.ndarray:
    out = np.empty((len(data),) + data.masks.shape[1:], np.uint8)
    for start in tqdm(range(0, len(data), bs), desc=desc, leave=False):
        images = data.images[start : start + bs]
        labels = [data.samples[i].labels for i in range(start, start + len(images))]
        out[start : start + bs] = pipe.refine(images, pipe.classify(images), labels, binary)
    return out


def train_segmenter(cfg: Config, data: WSSSDataset, pseudo: np.ndarray) -> nn.Module:
    """Fully supervised on the pseudo-masks; validation loss is on held-out pseudo-masks too."""
    _seed(cfg)
    kwargs = {
        "num_classes": segmentation_classes(cfg.data.task, data.num_classes),
        "base_channels": cfg.segmenter.base_channels,
        "depth": cfg.segmenter.depth,
    }
    model = build_segmenter(cfg.segmenter.arch, **kwargs)
    tr, va = _split(len(data), cfg.data.val_fraction, cfg.train.seed)
    train, val = _View(data, tr, True, pseudo[tr]), _View(data, va, False, pseudo[va])
    meta = {
        "family": "segmenter",
        "arch": cfg.segmenter.arch,
        "task": cfg.data.task,
        "kwargs": kwargs,
    }
    return _train(cfg, model, train, val, nn.CrossEntropyLoss(ignore_index=IGNORE), meta)


def _seed(cfg: Config) -> None:
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)  # the augmentations draw from numpy


def _train(
    cfg: Config,
    model: nn.Module,
    train: Dataset,
    val: Dataset,
    loss,
    meta: dict,
    epochs: int | None = None,
    lr: float | None = None,
) -> nn.Module:
    """The one training loop on seeded loaders; the resolved config lands beside the best.pt."""
    family = meta["family"]
    out = Path(cfg.runs) / family
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
        desc=family,
    )
    save_config(cfg, out / "config.yaml")
    return model.cpu().eval()


STAGES = ("classifier", "levelset", "pseudo", "segmenter")


def run(cfg: Config, stages: tuple[str, ...] = STAGES) -> None:
    """Train what ``stages`` names; later stages reuse the saved checkpoint of earlier ones.

    ``levelset`` runs only with ``refine.method: levelset`` (and is trained if missing).
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}: choose from {', '.join(STAGES)}")
    data = load_train_set(cfg)
    runs = Path(cfg.runs)
    if "classifier" in stages:
        train_classifier(cfg, data)
    if cfg.refine.method == "levelset" and (
        "levelset" in stages or not (runs / "levelset" / "best.pt").exists()
    ):
        classifier, cmeta = load_model(runs / "classifier" / "best.pt")
        train_levelset(cfg, data, classifier, cmeta)
    pseudo_path = runs / "pseudo" / "train_masks.npz"
    if "pseudo" in stages or not pseudo_path.exists():
        pseudo = make_pseudo_masks(cfg, data)
        pseudo_path.parent.mkdir(parents=True, exist_ok=True)
        names = np.array([s.name for s in data.samples])
        np.savez_compressed(pseudo_path, masks=pseudo, names=names)
    else:
        pseudo = np.load(pseudo_path)["masks"]
    if "segmenter" in stages:
        train_segmenter(cfg, data, pseudo)
