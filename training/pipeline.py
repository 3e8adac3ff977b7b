"""The served pipeline, in process: the reference every exported model is checked against.

``ClassifierGraph`` and ``SegmenterGraph`` are exactly the graphs that get exported: uint8
NHWC pixels in, the tensors of ``wsss.tensors`` out (``PassThroughSegmenter``, the segmenter
of ``segmenter.arch: passthrough``, reads PSEUDO_MASK instead). ``Pipeline`` chains them with a
refiner as the Triton ensemble does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.cams import CAM_METHODS
from training.levelset.model import LevelSetGraph
from training.levelset.train import load_levelset
from training.loop import file_digest, load_checkpoint
from training.models import build_classifier, build_segmenter
from training.models.classifier import CAMClassifier
from training.models.common import to_pixels
from training.torch_refiners import Refiner, build_refiner
from wsss.config import PASSTHROUGH, Config, load_saved_config, served_config
from wsss.errors import InputError
from wsss.served.registry import RefinerSpec
from wsss.task import get_task
from wsss.tensors import CAMS, PSEUDO_MASK, SCORES, SEG_PROBS, SEGMENTATION


class ClassifierGraph(nn.Module):
    """IMAGE -> SCORES, CAMS (and FEATURES, the backbone's map, for refiners that read it)."""

    def __init__(
        self,
        net: CAMClassifier,
        multi_label: bool,
        features: bool = False,
        cam_method: str | None = None,
        class_names: Sequence[str] | None = None,
    ):
        super().__init__()
        self.net, self.multi_label, self.features = net, multi_label, features
        self.cam_method = cam_method or net.cam_method
        if self.cam_method not in CAM_METHODS:
            known = ", ".join(sorted(CAM_METHODS))
            raise InputError(f"unknown CAM method {self.cam_method!r}: one of {known}")
        self.class_names = list(class_names) if class_names is not None else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = to_pixels(images)
        feats = self.net.forward_features(x)
        logits = self.net.forward_head(feats)
        scores = self.net.presence(x, logits, self.multi_label)
        cams = self.net.cams(feats, logits, x.shape[-2:], self.cam_method)
        return (scores, cams, feats) if self.features else (scores, cams)


class SegmenterGraph(nn.Module):
    """IMAGE -> SEG_PROBS (the trained segmenter's softmax), SEGMENTATION (its argmax)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.net(to_pixels(images)), dim=1)
        return probs, probs.argmax(dim=1).to(torch.uint8)


class PassThroughSegmenter(nn.Module):
    """PSEUDO_MASK -> SEG_PROBS (its one-hot), SEGMENTATION (the mask itself).

    The served segmenter of ``segmenter.arch: passthrough``: nothing trained, so the served
    segmentation is exactly the refined mask, and the ensembles keep all their tensors. A mask
    value outside the ``num_classes`` segmentation classes (255) passes through as it is, with
    all-zero probabilities.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        classes = torch.arange(self.num_classes, device=masks.device).view(1, -1, 1, 1)
        # Compared as int64: ONNX Runtime's CPU Equal has no uint8 kernel.
        probs = (masks.long().unsqueeze(1) == classes).to(torch.float32)
        # A copy: an exported graph output that is its input would share its name.
        return probs, masks.clone()


class InProcessPassThrough:
    """A pass-through segmenter on images, in process: the PSEUDO_MASK the ensemble makes of
    them (the classifier's predictions, refined) through ``module``. Scored, it is the
    served segmentation; exported, only ``module`` is."""

    def __init__(self, classifier: ClassifierGraph, refiner: Refiner, module: nn.Module):
        self.source = Pipeline(classifier, None, refiner)
        self.module = module

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = images.numpy()
        masks = self.source.refine(pixels, self.source.classify(pixels))
        return self.module(torch.from_numpy(masks))


def stale_segmenter(runs: str | Path, segmenter_meta: dict | None = None) -> str | None:
    """What to say where the segmenter in ``runs`` learned the pseudo-masks of another
    classifier run than the one beside it (a training stopped between its stages, or
    ``--stages classifier`` alone), or None: its checkpoint records its classifier's digest
    (``segmenter_meta``, where the caller has read the checkpoint already)."""
    runs = Path(runs)
    classifier, segmenter = runs / "classifier" / "best.pt", runs / "segmenter" / "best.pt"
    if not classifier.is_file() or (segmenter_meta is None and not segmenter.is_file()):
        return None
    if segmenter_meta is None:
        segmenter_meta = load_checkpoint(segmenter).get("meta", {})
    made_by = segmenter_meta.get("classifier_digest")
    if made_by is None or made_by == file_digest(classifier):
        return None
    return (
        "the segmenter learned the pseudo-masks of another classifier run than the one in "
        f"{runs} (a training stopped between its stages, or --stages classifier alone): "
        "`wsss train --stages pseudo,segmenter` trains it on this one's"
    )


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a classifier or segmenter from a checkpoint (weights only: no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train that stage first (`wsss train`)")
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    if meta["family"] == "segmenter" and meta["arch"] == PASSTHROUGH:  # no weights
        return PassThroughSegmenter(**meta["kwargs"]).eval(), meta
    build = build_classifier if meta["family"] == "classifier" else build_segmenter
    model = build(meta["arch"], **meta["kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), meta


def as_trained(cfg: Config, cmeta: dict, smeta: dict) -> tuple[Config, list[str]]:
    """``cfg`` as the checkpoints were trained: the networks are built from their own
    architectures, builder arguments and task, whatever the config says, so what export
    writes beside them and what evaluate labels its rows with say theirs; and a note for
    each the config gave otherwise."""
    trained = {
        ("classifier", "arch"): cmeta.get("arch"),
        ("segmenter", "arch"): smeta.get("arch"),
        ("data", "task"): get_task(cmeta["task"]).name if "task" in cmeta else None,
    }
    # What the builders read from the config, as each checkpoint recorded it.
    for section, meta, keys in (
        ("classifier", cmeta, ("output_stride", "head")),
        ("segmenter", smeta, ("backbone", "output_stride", "base_channels", "depth")),
    ):
        kwargs = meta.get("kwargs") or {}
        trained |= {(section, key): kwargs[key] for key in keys if key in kwargs}
    notes, sections = [], {}
    for (section, key), value in trained.items():
        given = getattr(getattr(cfg, section), key)
        if value is not None and value != given:
            notes.append(
                f"{section}.{key} is {given!r} in the config, {value!r} in the checkpoint: "
                f"exported as trained, {value!r}"
            )
            sections.setdefault(section, {})[key] = value
    parts = {k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()}
    return dataclasses.replace(cfg, **parts), notes


def one_hot(classes: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """Image-level labels as the scores a refiner reads (1 for each present class)."""
    out = np.zeros((len(classes), num_classes), np.float32)
    for row, cls in zip(out, classes, strict=True):
        row[list(cls)] = 1.0
    return out


def translate_labels(
    labels: Sequence[Sequence[int]],
    data_names: Sequence[str],
    class_names: Sequence[str] | None,
    aliases: Sequence[str | None] = (),
) -> list[tuple[int, ...] | None]:
    """Image labels (indices into the data's classes) -> the classifier's, matched by name.

    The same labels when the names agree (a task head, or ``class_names`` None). An ImageNet
    head's classes are its groups: labels it has no group for are dropped (a VOC photo's
    ``person``), and an image left with none gets None: its pseudo-mask then follows the
    classifier's predictions, as served. An image labelled with no class at all (only
    background) keeps its empty labels: it gets an empty mask.
    """
    if class_names is None or list(data_names) == list(class_names):
        return [tuple(x) for x in labels]
    index = {name: i for i, name in enumerate(class_names)}
    # A data class the classifier does not name may go by another name it does (a Pet
    # breed by its species, for the ImageNet head's cat and dog groups).
    own = [
        name if name in index or c >= len(aliases) or aliases[c] is None else aliases[c]
        for c, name in enumerate(data_names)
    ]
    if not any(name in index for name in own):
        # Another data set's classifier (a run trained on pets, scored on VOC): each image
        # would lose its labels and follow the predictions, scored as if it were this data's.
        raise InputError(
            f"the classifier's classes ({_names(class_names)}) include none of the data's "
            f"({_names(data_names)}): point runs at a run trained on this data, or train one"
        )
    out = []
    for image_labels in labels:
        mapped = tuple(index[own[c]] for c in image_labels if own[c] in index)
        out.append(mapped if mapped or not image_labels else None)
    return out


def _names(names: Sequence[str], shown: int = 4) -> str:
    more = f", ... {len(names)} in all" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def missing_labels(
    labels: Sequence[Sequence[int]], translated: Sequence[Sequence[int] | None]
) -> list[int]:
    """How many of each image's labels (the data's) ``translate_labels`` found no class of
    the classifier's for (person, to an ImageNet head): misses in its label F1."""
    return [len(raw) - len(t or ()) for raw, t in zip(labels, translated, strict=True)]


def mask_values(data_names: Sequence[str], class_names: Sequence[str] | None) -> np.ndarray | None:
    """uint8 lookup from a class-index mask of the classifier's classes to the data's (by
    name; classes the data lacks become background), or None when they already agree."""
    if class_names is None or list(data_names) == list(class_names):
        return None
    if len(class_names) > 254:
        raise InputError(f"{len(class_names)} classes do not fit a uint8 class-index mask")
    index = {name: i for i, name in enumerate(data_names)}
    table = np.zeros(256, np.uint8)
    table[255] = 255
    for i, name in enumerate(class_names):
        table[i + 1] = index[name] + 1 if name in index else 0
    return table


@dataclass
class Pipeline:
    """Classifier -> refiner -> segmenter, as the ``wsss_pipeline`` ensemble runs them."""

    classifier: ClassifierGraph | None
    segmenter: SegmenterGraph | InProcessPassThrough | None
    refiner: Refiner | None
    # What the checkpoints record of how they were trained, by stage (classifier,
    # segmenter), where read from a run (``pipeline_from_config``): for ``as_trained``.
    trained: dict[str, dict] = dataclasses.field(default_factory=dict)

    @property
    def multi_label(self) -> bool:
        return self.classifier.multi_label

    @property
    def class_names(self) -> list[str] | None:
        """The classifier's classes (None: the data's own, as for a task head)."""
        return self.classifier.class_names

    @torch.inference_mode()
    def classify(self, images: np.ndarray) -> tuple[torch.Tensor, ...]:
        """SCORES, CAMS and (for refiners that read them) FEATURES of uint8 [B, H, W, 3]."""
        return self.classifier(torch.from_numpy(np.ascontiguousarray(images)))

    def refine(
        self,
        images: np.ndarray,
        outputs: tuple[torch.Tensor, ...],
        classes: Sequence[Sequence[int] | None] | None = None,
    ) -> np.ndarray:
        """Pseudo-masks of the classes given (image labels), else of the predicted ones.

        ``classes`` holds one entry per image: its labels in the classifier's classes, or
        None where they are unknown (then that image's predictions decide, as served).
        """
        scores, cams, *features = (t.numpy() for t in outputs)
        if classes is None:
            return self.refiner(images, scores, cams, features[0] if features else None)
        labelled = np.array([c is not None for c in classes])
        hot = one_hot([c or () for c in classes], scores.shape[1])
        scores = np.where(labelled[:, None], hot, scores)
        masks = self.refiner(images, scores, cams, features[0] if features else None)
        # Labelled with no class (only background): one-hot zeros would elect a top class.
        masks[np.array([c is not None and not c for c in classes], bool)] = 0
        return masks

    @property
    def passthrough_source(self) -> Pipeline | None:
        """A pass-through segmenter's own classifier and refiner (None: a network)."""
        return getattr(self.segmenter, "source", None)

    @torch.inference_mode()
    def segment(
        self,
        images: np.ndarray,
        pseudo: np.ndarray | None = None,
        outputs: tuple[torch.Tensor, ...] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """SEG_PROBS and SEGMENTATION of uint8 [B, H, W, 3]; a pass-through segmenter reads
        ``pseudo`` where given (the PSEUDO_MASK already made of these images, as served) if
        that is its own refiner's mask, else refines ``outputs`` where given: its own
        classifier's, already run on these images (the profile serves another refiner)."""
        source = self.passthrough_source
        if pseudo is not None and source is not None and source.refiner is self.refiner:
            probs, seg = self.segmenter.module(torch.from_numpy(pseudo))
        elif outputs is not None and source is not None:
            served = source.refine(images, outputs)
            probs, seg = self.segmenter.module(torch.from_numpy(served))
        else:
            probs, seg = self.segmenter(torch.from_numpy(np.ascontiguousarray(images)))
        return probs.numpy(), seg.numpy()

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [B, H, W, 3] -> the ensemble's outputs, keyed by their served names."""
        outputs = self.classify(images)
        pseudo = self.refine(images, outputs)
        source = self.passthrough_source
        shared = source is not None and source.classifier is self.classifier
        probs, seg = self.segment(images, pseudo, outputs if shared else None)
        return {
            SCORES: outputs[0].numpy(),
            CAMS: outputs[1].numpy(),
            PSEUDO_MASK: pseudo,
            SEG_PROBS: probs,
            SEGMENTATION: seg,
        }


def resolved_refine(cfg, meta: dict):
    """The RefineConfig the refiner is built from: ``cfg.refine``, with the per-class score
    thresholds that ``classifier.threshold_folds`` chose (saved in the classifier's
    checkpoint) in place of ``refine.score_threshold``. A checkpoint without them (another
    run's classifier scored under this config, e.g. a study's baseline) keeps
    ``refine.score_threshold``."""
    thresholds = meta.get("score_thresholds")
    if not (cfg.classifier.threshold_folds and thresholds):
        return cfg.refine
    # At most 1 (earlier runs chose cuts just above it): a labelled class, refined as a
    # score of 1, must pass its cut.
    return dataclasses.replace(cfg.refine, score_threshold=[min(t, 1.0) for t in thresholds])


def check_tiles(cfg, net: CAMClassifier, source: Path) -> None:
    """``classifier.tiles`` is part of the classifier's graph, which its thresholds (and a
    level set) were trained on: a config asking another value than the checkpoint's is
    refused, not silently ignored."""
    if cfg.classifier.tiles != net.tiles:
        raise InputError(
            f"classifier.tiles is {cfg.classifier.tiles}, but the classifier of {source} was "
            f"trained with {net.tiles}: --set classifier.tiles={net.tiles}, or train it again"
        )


def check_cam_method(cfg, checkpoint: Path) -> None:
    """A level set evolves the CAMs of the method it was trained on (grad-CAM++'s are not
    CAM's), which the config its run saved beside ``checkpoint`` names (as the CAM study
    reads it): a config asking another is refused, not fed to it."""
    saved = checkpoint.parent / "config.yaml"
    if not saved.is_file():  # a checkpoint copied without its run: nothing to compare
        return
    trained = load_saved_config(saved).classifier.cam_method
    if trained != cfg.classifier.cam_method:
        raise InputError(
            f"classifier.cam_method is {cfg.classifier.cam_method}, but the level set of "
            f"{checkpoint.parent} was trained on {trained} CAMs: "
            f"--set classifier.cam_method={trained}, or train it again"
        )


def refine_step(cfg, binary: bool | None = None) -> tuple[ClassifierGraph, Refiner, dict]:
    """The served classifier and refiner the config names, and the classifier's metadata
    (task, class names), from the run's checkpoints: the one place that reads them.

    For ``refine.method: levelset`` all come from the level-set checkpoint: it holds the
    backbone the level-set head was trained on (fine-tuned or not).
    """
    runs = Path(cfg.runs)
    levelset = None
    network = RefinerSpec.of(cfg.refine).checkpoint  # the level set's, holding its backbone
    if network:
        net, head, ls_meta = load_levelset(runs / network)
        meta = ls_meta["classifier"]
        multi = get_task(meta["task"]).multi_label
        refine = resolved_refine(cfg, meta)
        levelset = LevelSetGraph(head, multi, refine.score_threshold, refine.min_score)
    else:
        net, meta = load_model(runs / "classifier" / "best.pt")
        multi = get_task(meta["task"]).multi_label
        refine = resolved_refine(cfg, meta)
    check_tiles(cfg, net, runs / (network or "classifier"))
    if network:
        check_cam_method(cfg, runs / network)
    refiner = build_refiner(refine, multi, binary, levelset)
    served = ClassifierGraph(
        net, multi, refiner.needs_features, cfg.classifier.cam_method, meta["class_names"]
    )
    return served.eval(), refiner, meta


def _served_step(cfg, classifier: ClassifierGraph, meta: dict) -> tuple[ClassifierGraph, Refiner]:
    """``export.refine``'s classifier and refiner. The same classifier graph, so its outputs
    serve both refiners (one forward pass a batch), unless a level set is involved (its
    checkpoint holds the backbone it was trained on) or the served refiner reads the
    backbone's features, which the shared graph may not return."""
    served = served_config(cfg)
    spec = RefinerSpec.of(served.refine)
    features = any(e.needs_features for e in spec.parts)
    if spec.checkpoint or RefinerSpec.of(cfg.refine).checkpoint or features:
        return refine_step(served)[:2]
    return classifier, build_refiner(resolved_refine(served, meta), classifier.multi_label)


def pipeline_from_config(cfg, segmenter: bool = True) -> Pipeline:
    """The run's classifier, ``refine``'s refiner (the training pseudo-masks' own) and its
    segmenter. A pass-through segmenter makes the mask the repository serves: that of
    ``export.refine`` where the profile serves another refiner (a CRF is not served)."""
    classifier, refiner, meta = refine_step(cfg)
    seg, trained = None, {"classifier": meta}
    if segmenter:
        net, trained["segmenter"] = load_model(Path(cfg.runs) / "segmenter" / "best.pt")
        if isinstance(net, PassThroughSegmenter):
            served = (classifier, refiner)
            if cfg.export.refine is not None and cfg.export.refine != cfg.refine:
                served = _served_step(cfg, classifier, meta)
            seg = InProcessPassThrough(*served, net)
        else:
            seg = SegmenterGraph(net).eval()
    return Pipeline(classifier, seg, refiner, trained)
