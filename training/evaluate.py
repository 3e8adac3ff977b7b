"""The one evaluation harness: named pipelines scored on a test split, and one report writer.

``evaluate`` makes one pass over the data (as torchvision's references/segmentation
``evaluate`` does) and fills, for every pipeline, the confusion matrices of what it has: its
pseudo-masks (made from each image's labels, as in training), its segmenter's output, and
its classifier's image-level predictions. Pipelines that share a classifier share its
forward pass. Every study (``wsss evaluate``, ``--study``, ``--levelset``) is a list of named
pipelines fed to it, and ``write_report`` turns rows into results.json, a markdown table
and a figure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training import distributed
from training.data.dataset import WSSSDataset
from training.data.layouts import IGNORE
from training.metrics import ConfusionMatrix, average_precision, label_f1
from training.pipeline import Pipeline, mask_values, missing_labels, translate_labels
from wsss.config import Config
from wsss.figures import colourise, legend_entries, overlay, panel_figure
from wsss.served.images import resize_mask


@dataclass
class Evaluation:
    """What one pipeline scored; ``row`` flattens it for a table."""

    binary: bool
    pseudo: ConfusionMatrix | None = None
    segmentation: ConfusionMatrix | None = None
    refine_seconds: float = 0.0
    images: int = 0
    # Image-level: (scores, labels in the classifier's classes) of the images scored.
    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[tuple[int, ...]] = field(default_factory=list)
    # Multi-label: the classes its refiner takes as present (at its score thresholds), per
    # image with labels, for the label F1 beside mAP.
    predicted: list[tuple[int, ...]] = field(default_factory=list)
    # ... and how many of its labels the classifier has no class for (person, to an ImageNet
    # head): classes it could not say, missed in its label F1 as any other.
    missed: list[int] = field(default_factory=list)
    examples: dict[str, list[np.ndarray]] = field(default_factory=dict)
    # Binary tasks: each scored image's own foreground IoU, for the mean over images that
    # some papers report beside the IoU pooled over the split (the confusion matrices').
    pseudo_image_iou: list[float] = field(default_factory=list)
    seg_image_iou: list[float] = field(default_factory=list)

    def classification(self) -> dict[str, float]:
        """Top-1 accuracy (single-label: on the images whose labels the classifier knows)
        or mAP over classes and label F1 (multi-label: on every image, one holding none of
        the classifier's classes a negative of each); empty when no image was scored."""
        if not self.scores:
            return {}
        scores = np.stack(self.scores)
        if self.binary:
            top = scores.argmax(1)
            return {
                "accuracy": float(
                    np.mean([t in ls for t, ls in zip(top, self.labels, strict=True)])
                )
            }
        truth = np.zeros_like(scores, dtype=bool)
        for row, ls in zip(truth, self.labels, strict=True):
            row[list(ls)] = True
        out = {"map": average_precision(scores, truth), "map_classes": int(truth.any(0).sum())}
        if len(self.predicted) == len(self.labels):
            predicted = np.zeros_like(truth)
            for row, ps in zip(predicted, self.predicted, strict=True):
                row[list(ps)] = True
            missed = np.array(self.missed) if len(self.missed) == len(self.labels) else None
            out["label_f1"] = label_f1(predicted, truth, missed)
        return out

    def row(self) -> dict[str, float]:
        """The scores it has; masks with no labelled pixel (a folder without masks/) give
        no mask scores rather than NaN."""
        out: dict[str, float] = dict(self.classification())
        for part, cm in (("pseudo", self.pseudo), ("seg", self.segmentation)):
            if cm is not None and cm.matrix.any():
                out |= {f"{part}_{k}": v for k, v in cm.summary(self.binary).items()}
                if not self.binary:  # per class, background first (None: nowhere)
                    out[f"{part}_class_iou"] = cm.per_class()
                per_image = self.pseudo_image_iou if part == "pseudo" else self.seg_image_iou
                if per_image:
                    out[f"{part}_image_iou"] = float(np.mean(per_image))
        if self.pseudo is not None:
            out["refine_ms"] = 1e3 * self.refine_seconds / max(self.images, 1)
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """What was scored, as plain arrays (a rank's part file under torchrun): ``merged``
        reads them back. Labels become multi-hot rows beside the scores."""
        out = {
            "images": np.array(self.images),
            "refine_seconds": np.array(self.refine_seconds),
            "pseudo_image_iou": np.array(self.pseudo_image_iou, np.float64),
            "seg_image_iou": np.array(self.seg_image_iou, np.float64),
        }
        for part, cm in (("pseudo", self.pseudo), ("seg", self.segmentation)):
            if cm is not None:
                out[part] = cm.matrix
        if self.scores:
            out["scores"] = np.stack(self.scores)
            out["labels"] = np.zeros(out["scores"].shape, bool)
            for row, ls in zip(out["labels"], self.labels, strict=True):
                row[list(ls)] = True
            if len(self.predicted) == len(self.labels):
                out["predicted"] = np.zeros(out["scores"].shape, bool)
                for row, ps in zip(out["predicted"], self.predicted, strict=True):
                    row[list(ps)] = True
                out["missed"] = np.array(self.missed, np.int64)
        for kind, shown in self.examples.items():  # kept when empty: figure_rows counts them
            out[f"examples.{kind}"] = np.array(shown)
        return out

    @classmethod
    def merged(cls, binary: bool, parts: Sequence[dict[str, np.ndarray]]) -> Evaluation:
        """The one Evaluation of consecutive shares' ``arrays``, in order: confusion matrices
        and counts summed, per-image lists joined (so means are taken as one process would)."""
        r = cls(binary)
        for part in parts:
            r.images += int(part["images"])
            r.refine_seconds += float(part["refine_seconds"])
            r.pseudo_image_iou += part["pseudo_image_iou"].tolist()
            r.seg_image_iou += part["seg_image_iou"].tolist()
            for key, attr in (("pseudo", "pseudo"), ("seg", "segmentation")):
                if key in part:
                    cm = getattr(r, attr) or ConfusionMatrix(len(part[key]))
                    cm.matrix += part[key]
                    setattr(r, attr, cm)
            if "scores" in part:
                r.scores += list(part["scores"])
                r.labels += [tuple(np.flatnonzero(row).tolist()) for row in part["labels"]]
            if "predicted" in part:
                r.predicted += [tuple(np.flatnonzero(row).tolist()) for row in part["predicted"]]
                r.missed += part["missed"].tolist()
            for key, shown in part.items():
                if key.startswith("examples."):
                    r.examples.setdefault(key.removeprefix("examples."), []).extend(shown)
        return r


def score_masks(
    cm: ConfusionMatrix,
    per_image: list[float],
    masks: np.ndarray,
    data: WSSSDataset,
    start: int,
    binary: bool,
) -> None:
    """Add model-size masks [B, H, W] of images ``start...`` to ``cm`` against their ground
    truth at each photo's own resolution (masks resized back, nearest, as the served bytes
    ensemble returns them); ignored pixels (255) of a training pseudo-mask count as
    background, which claims nothing."""
    for k, mask in enumerate(masks):
        truth = data.full_mask(start + k)
        h, w = truth.shape
        mask = np.where(mask == IGNORE, 0, mask).astype(np.uint8)
        if mask.shape != (h, w):
            mask = resize_mask(mask, (h, w))
        cm.update(mask, truth)
        if binary:
            keep = truth != IGNORE
            pred, true = mask[keep] == 1, truth[keep] == 1
            union = np.count_nonzero(pred | true)
            if union:
                per_image.append(np.count_nonzero(pred & true) / union)


def evaluate(
    pipelines: Mapping[str, Pipeline],
    data: WSSSDataset,
    batch_size: int = 32,
    examples: int = 0,
    desc: str = "evaluate",
    share: range | None = None,
) -> dict[str, Evaluation]:
    """Score every pipeline on ``data`` (or the images ``share`` indexes, in batches from its
    start) in one pass; keep the outputs of the first ``examples`` images of ``data``.

    Scores are taken at each photo's own resolution (``score_masks``)."""
    share = range(len(data)) if share is None else share
    binary = data.kind.binary_masks
    n_seg = data.kind.segmentation_classes(data.num_classes)
    results, labels, missed, values, seg_values = {}, {}, {}, {}, {}
    for name, pipe in pipelines.items():
        results[name] = Evaluation(
            binary,
            ConfusionMatrix(n_seg) if pipe.refiner is not None else None,
            ConfusionMatrix(n_seg) if pipe.segmenter is not None else None,
        )
        if pipe.classifier is not None:
            raw = [s.labels for s in data.samples]
            labels[name] = translate_labels(raw, data.class_names, pipe.class_names, data.aliases)
            missed[name] = missing_labels(raw, labels[name])
            if not binary:  # class-index masks: into the data's classes for scoring
                values[name] = mask_values(data.class_names, pipe.class_names)
        source = pipe.passthrough_source if pipe.segmenter is not None else None
        if source is not None and not binary:  # a pass-through's masks are its classifier's
            seg_values[name] = mask_values(data.class_names, source.class_names)
    starts = range(share.start, share.stop, batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=not distributed.is_main()):
        stop = min(start + batch_size, share.stop)
        images = data.images[start:stop]
        shown = max(0, min(len(images), examples - start))
        outputs: dict[int, tuple] = {}  # one forward pass per distinct classifier
        for name, pipe in pipelines.items():
            r = results[name]
            r.images += len(images)
            if pipe.classifier is not None:
                key = id(pipe.classifier)
                if key not in outputs:
                    outputs[key] = pipe.classify(images)
                batch_labels = labels[name][start:stop]
                batch_missed = missed[name][start:stop]
                scored = zip(outputs[key][0].numpy(), batch_labels, batch_missed, strict=True)
                for s, ls, misses in scored:
                    if ls is None and not binary:
                        # Multi-label: a photo of none of the classifier's classes (a
                        # VOC photo of people alone, to the ImageNet head) is a negative of
                        # each; leaving it out hid every class it scored high on from mAP
                        # and label F1.
                        ls = ()
                    if ls is not None:
                        r.scores.append(s)
                        r.labels.append(ls)
                        if not binary and pipe.refiner is not None:
                            r.predicted.append(tuple(pipe.refiner.present(s)))
                            r.missed.append(misses)
                if shown:  # each image's labelled classes' CAMs at their strongest (else
                    # the top class's): a photo of a horse and its rider shows both
                    scores, cams = (t.numpy() for t in outputs[key][:2])
                    shown_cams = [
                        cams[k, list(ls)].max(0) if ls else cams[k, int(scores[k].argmax())]
                        for k, ls in enumerate(batch_labels[:shown])
                    ]
                    r.examples.setdefault("cam", []).extend(shown_cams)
            if pipe.refiner is not None:
                t0 = time.perf_counter()
                pseudo = pipe.refine(images, outputs[id(pipe.classifier)], batch_labels)
                r.refine_seconds += time.perf_counter() - t0
                if values.get(name) is not None:
                    pseudo = values[name][pseudo]
                score_masks(r.pseudo, r.pseudo_image_iou, pseudo, data, start, binary)
                r.examples.setdefault("pseudo", []).extend(pseudo[:shown])
            if pipe.segmenter is not None:
                # a pass-through's classifier, when another pipeline here has run it
                source = pipe.passthrough_source
                ran = outputs.get(id(source.classifier)) if source is not None else None
                seg = pipe.segment(images, outputs=ran)[1]
                if seg_values.get(name) is not None:
                    seg = seg_values[name][seg]
                score_masks(r.segmentation, r.seg_image_iou, seg, data, start, binary)
                r.examples.setdefault("seg", []).extend(seg[:shown])
    return results


def evaluate_shards(
    pipelines: Mapping[str, Pipeline],
    data: WSSSDataset,
    parts: Path,
    batch_size: int = 32,
    examples: int = 0,
    desc: str = "evaluate",
) -> dict[str, Evaluation] | None:
    """``evaluate``, sharded under torchrun: each rank scores its contiguous share of
    ``data`` (whole batches: one process's batches), writes what it scored as its part under
    ``parts``, and rank 0 merges them into one process's numbers (the times summed); the
    other ranks get None. One process: ``evaluate`` itself."""
    share = distributed.batch_shard(len(data), batch_size)
    results = evaluate(pipelines, data, batch_size, examples, desc, share)
    if not distributed.active():
        return results
    # Pipelines by position: every rank built the same ones, in the same order.
    mine = {f"{i}.{k}": v for i, r in enumerate(results.values()) for k, v in r.arrays().items()}
    shares = distributed.exchange_parts(parts, "evaluation", mine)
    if shares is None:
        return None
    merged = {}
    for i, (name, r) in enumerate(results.items()):
        pre = f"{i}."
        own = [{k.removeprefix(pre): v for k, v in p.items() if k.startswith(pre)} for p in shares]
        merged[name] = Evaluation.merged(r.binary, own)
    return merged


def figure_legend(
    data: WSSSDataset, results: Mapping[str, Evaluation]
) -> tuple[list[str], list | None]:
    """Each shown image's labelled classes (row labels) and, for class-index masks, a legend
    of every class its figure's masks hold, with the truth's background and ignored
    pixels (255) where it has them (binary masks: no legend, one colour)."""
    count = min(len(v) for r in results.values() for v in r.examples.values())
    names = data.class_names
    labels = [", ".join(names[c] for c in data.samples[k].labels) for k in range(count)]
    if data.kind.binary_masks:
        return labels, None
    truth = [data.masks[k] for k in range(count)]
    masks = list(truth)
    for r in results.values():
        for part in ("pseudo", "seg"):
            masks += list(r.examples.get(part, []))[:count]
    return labels, legend_entries(masks, names, data.palette, truth if data.has_masks else None)


def figure_rows(
    data: WSSSDataset, results: Mapping[str, Evaluation], columns: Sequence[tuple[str, str, str]]
) -> list[dict[str, np.ndarray]]:
    """Figure rows for the first images: the image, then ``(title, pipeline, part)`` per
    column (part: cam, pseudo or seg), then the ground truth (where the data has masks)."""
    count = min(len(v) for r in results.values() for v in r.examples.values())
    rows = []
    for k in range(count):
        row = {"image": data.images[k]}
        for title, name, part in columns:
            value = results[name].examples[part][k]
            row[title] = value if part == "cam" else overlay(data.images[k], value)
        if data.has_masks:  # photos without masks: no column of nothing
            row["ground truth"] = colourise(data.masks[k])
        rows.append(row)
    return rows


# Column order and headers of the markdown tables; a row shows the columns it has.
_COLUMNS = {
    "accuracy": "classifier accuracy",
    "map": "classifier mAP",
    "map_classes": "mAP classes",
    "label_f1": "label F1",
    "pseudo_iou": "pseudo-mask IoU",
    "pseudo_dice": "pseudo-mask Dice",
    "pseudo_image_iou": "pseudo-mask IoU per image",
    "pseudo_miou": "pseudo-mask mIoU",
    "pseudo_mdice": "pseudo-mask mDice",
    "pseudo_classes": "pseudo-mask classes",
    "seg_iou": "segmenter IoU",
    "seg_dice": "segmenter Dice",
    "seg_image_iou": "segmenter IoU per image",
    "seg_miou": "segmenter mIoU",
    "seg_mdice": "segmenter mDice",
    "seg_classes": "segmenter classes",
    "of_bound": "/ supervised",
    "refine_ms": "refine ms/image",
    "train_seconds": "training s",
}


def markdown_table(
    rows: Sequence[dict], labels: Sequence[str], metrics: Sequence[str] | None = None
) -> str:
    """``labels``: the leading text columns (keys of each row); then ``metrics``, by default
    every known metric any row has, in a fixed order; blank where a row has none."""
    metrics = metrics or [k for k in _COLUMNS if any(k in r for r in rows)]
    lines = [
        "| " + " | ".join([*labels, *(_COLUMNS.get(k, k) for k in metrics)]) + " |",
        "|" + "---|" * len(labels) + "---:|" * len(metrics),
    ]
    for r in rows:
        cells = [str(r.get(k, "")) for k in labels]
        cells += [_format(k, r[k]) if k in r else "" for k in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format(key: str, value: float) -> str:
    if key == "refine_ms":
        return f"{value:.2f}"
    if key in ("train_seconds", "map_classes", "pseudo_classes", "seg_classes"):
        return f"{value:.0f}"
    if key == "of_bound":
        return f"{value:.2f}x"
    return f"{value:.3f}"


def spread(values: list[float]) -> dict:
    """Mean and population std of a score over runs (training seeds), with the runs."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": list(values)}


def write_report(
    out: Path,
    stem: str,
    rows: list[dict],
    labels: Sequence[str],
    meta: dict,
    figure: list[dict[str, np.ndarray]] | None = None,
    figure_labels: list[str] | None = None,
    legend: list[tuple[str, tuple[float, float, float]]] | None = None,
) -> str:
    """``<stem>.json`` (meta + rows), ``<stem>.md`` (the table) and ``<stem>.png`` (with a
    class ``legend``: ``wsss.figures.legend_entries``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(meta | {"rows": rows}, indent=2))
    table = markdown_table(rows, labels)
    (out / f"{stem}.md").write_text(table)
    if figure:
        panel_figure(figure, list(figure[0]), out / f"{stem}.png", figure_labels, legend)
    return table


def load_test_set(cfg: Config, say: bool = True) -> WSSSDataset:
    """The photos the evaluation scores: the test split, or with ``evaluate.split: train``
    the training photos (where choices are made, never on the test list reported)."""
    data = WSSSDataset.from_config(cfg.data, cfg.evaluate.split)
    if say:
        tqdm.write(f"{cfg.evaluate.split} data: {data.source}")
    return data
