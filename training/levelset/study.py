"""Paper 003's evaluation on the configured benchmark: quality, ablation and speed.

``run_levelset_study`` scores pseudo-masks on the test split (made from each image's labels,
as in training) for CAM + threshold, CAM + GrabCut, CAM + classical Chan-Vese at several
iteration counts and the FNO level-set refiner, and trains the ablation of the paper's
Table 2 (no level set, MSE only, energy only, both) from the same classifier.
``refiner_speed`` is Table 3: per-image time of the FNO evolution beside Chan-Vese
iterations and GrabCut, measured in one run, as ratios.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from training.data.dataset import WSSSDataset
from training.data.layouts import read_class_names, segmentation_classes
from training.figures import colourise, overlay, panel_figure
from training.levelset.model import ServedLevelSet
from training.metrics import ConfusionMatrix
from training.models.common import to_input
from training.pipeline import Pipeline, ServedClassifier, load_model, one_hot, refine_step
from training.refine import build_refiner
from wsss.config import Config, save_config

CHANVESE_ITERATIONS = (1, 5, 10, 15, 50)  # the paper's Table 3 columns, and 50 beyond them
# Table 2 of paper 003: which of the config's loss terms each row keeps; "no level set" is
# the seed mask itself.
ABLATION = {"MSE only": (True, False), "energy only": (False, True), "MSE + energy": (True, True)}


def _test_set(cfg: Config) -> WSSSDataset:
    names = read_class_names(cfg.data.root, cfg.data.task)
    return WSSSDataset(cfg.data.root, cfg.data.task, "test", cfg.data.image_size, len(names))


def score(pipe: Pipeline, data: WSSSDataset, batch: int, shown: list | None = None) -> dict:
    """Pseudo-mask quality on ``data`` and refine time per image (classifier excluded)."""
    binary = not pipe.multi_label
    cm = ConfusionMatrix(segmentation_classes(data.task, data.num_classes))
    seconds = 0.0
    for start in tqdm(range(0, len(data), batch), desc=pipe.refiner.name, leave=False):
        images = data.images[start : start + batch]
        labels = [data.samples[i].labels for i in range(start, start + len(images))]
        outputs = pipe.classify(images)
        t0 = time.perf_counter()
        masks = pipe.refine(images, outputs, labels)
        seconds += time.perf_counter() - t0
        for m, g in zip(masks, data.masks[start : start + len(images)], strict=True):
            cm.update(m, g)
        if shown is not None:
            shown.append(masks)
    return cm.summary(binary) | {"refine_ms_per_image": 1e3 * seconds / len(data)}


def run_levelset_study(cfg: Config, train: bool = True) -> dict:
    """Score every refiner and ablation row; write levelset.json / .md and a figure.

    The classifier comes from ``<runs>/classifier``; ablation level sets are trained under
    ``<evaluate.out>/levelset/<row>`` (reused when ``train`` is False and they exist).
    """
    from training.stages import load_train_set, train_levelset

    if not (Path(cfg.runs) / "classifier" / "best.pt").exists():
        raise FileNotFoundError(
            f"no classifier in {cfg.runs}: run `wsss train --stages classifier` first"
        )
    if cfg.levelset.lambda_mse <= 0 or cfg.levelset.lambda_energy <= 0:
        raise ValueError("the ablation needs levelset.lambda_mse and lambda_energy both > 0")
    data = _test_set(cfg)
    out = Path(cfg.evaluate.out) / "levelset"
    bs = cfg.train.batch_size
    seed = cfg.levelset.seed
    masks: dict[str, list] = {}
    rows = []

    def add(group: str, name: str, pipe: Pipeline) -> None:
        masks[name] = []
        rows.append({"group": group, "refiner": name} | score(pipe, data, bs, masks[name]))

    # One classifier for every classical row: they differ only in the refiner.
    seeded = dataclasses.replace(cfg.refine, method=seed)
    classifier, _, _ = refine_step(dataclasses.replace(cfg, refine=seeded))

    def classical(**changes) -> Pipeline:
        refiner = build_refiner(dataclasses.replace(seeded, **changes))
        return Pipeline(classifier, None, refiner, classifier.multi_label)

    add("classical", f"CAM + {seed} (no level set)", classical())
    add("classical", f"CAM + {seed} + GrabCut", classical(grabcut=True))
    for n in CHANVESE_ITERATIONS:
        pipe = classical(chanvese=True, chanvese_iterations=n)
        add("classical", f"CAM + {seed} + Chan-Vese ({n} it.)", pipe)
    train_set = None
    ls = cfg.levelset
    for name, (mse, energy) in ABLATION.items():
        l1, l2 = ls.lambda_mse * mse, ls.lambda_energy * energy
        runs = out / name.replace(" ", "_").replace("+", "and")
        variant = dataclasses.replace(
            cfg,
            runs=str(runs),
            refine=dataclasses.replace(cfg.refine, method="levelset"),
            levelset=dataclasses.replace(ls, lambda_mse=l1, lambda_energy=l2),
        )
        if train or not (runs / "levelset" / "best.pt").exists():
            train_set = train_set or load_train_set(cfg)
            net, cmeta = load_model(Path(cfg.runs) / "classifier" / "best.pt")
            train_levelset(variant, train_set, net, cmeta)
        served, refiner, _ = refine_step(variant)
        add("level set", name, Pipeline(served, None, refiner, served.multi_label))
    result = {
        "task": cfg.data.task,
        "images": len(data),
        "image_size": cfg.data.image_size,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "levelset.json").write_text(json.dumps(result, indent=2))
    (out / "levelset.md").write_text(levelset_table(result))
    save_config(cfg, out / "config.yaml")
    _figure(cfg, data, masks, out / "levelset_examples.png")
    return result


def levelset_table(result: dict) -> str:
    keys = ["iou", "dice"] if result["task"] == "pets" else ["miou", "mdice"]
    lines = [
        "| group | refiner | " + " | ".join(keys) + " | refine ms/image |",
        "|---|---|" + "---:|" * (len(keys) + 1),
    ]
    for r in result["rows"]:
        values = " | ".join(f"{r[k]:.3f}" for k in keys)
        lines.append(
            f"| {r['group']} | {r['refiner']} | {values} | {r['refine_ms_per_image']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _figure(cfg: Config, data: WSSSDataset, masks: dict[str, list], path: Path) -> None:
    count = min(cfg.evaluate.figure_images, len(data))
    if not count:
        return
    pick = [n for n in masks if "Chan-Vese" not in n or "(15 it.)" in n]
    flat = {n: np.concatenate(masks[n])[:count] for n in pick}
    rows = []
    for k in range(count):
        row = {"image": data.images[k]}
        row |= {n: overlay(data.images[k], flat[n][k]) for n in pick}
        row["ground truth"] = colourise(data.masks[k])
        rows.append(row)
    panel_figure(rows, list(rows[0]), path)


def _timed(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@torch.no_grad()  # not inference mode: the refiner is traced for ONNX Runtime below
def refiner_speed(cfg: Config, size: int | None = None, images: int = 8, repeat: int = 5) -> dict:
    """Per-image time (batch 1, median) of each refiner on test images, in one run.

    Uses the run's classifier and level-set checkpoints (``<runs>/levelset``); ``size``
    resizes the images (the networks are fully convolutional) to time the paper's scale.
    Chan-Vese and GrabCut refine the image's labelled classes; so does the FNO (all K level
    sets evolve at once, whatever the number of classes present).
    """
    from training.levelset.train import load_levelset
    from wsss.images import resize_image

    data = _test_set(cfg)
    size = size or cfg.data.image_size
    net, head, meta = load_levelset(Path(cfg.runs) / "levelset" / "best.pt")
    multi = meta["classifier"]["task"] == "voc"
    net.cam_method = cfg.classifier.cam_method
    classifier = ServedClassifier(net, multi, features=True).eval()
    levelset = ServedLevelSet(head, multi, cfg.refine.score_threshold).eval()
    samples = [resize_image(img, (size, size)) for img in data.images[:images]]
    labels = [data.samples[i].labels for i in range(len(samples))]
    seed = cfg.levelset.seed
    classical = {"Otsu threshold": build_refiner(dataclasses.replace(cfg.refine, method=seed))}
    classical["GrabCut (5 it.)"] = build_refiner(
        dataclasses.replace(cfg.refine, method=seed, grabcut=True, grabcut_iterations=5)
    )
    for n in CHANVESE_ITERATIONS:
        classical[f"Chan-Vese ({n} it.)"] = build_refiner(
            dataclasses.replace(cfg.refine, method=seed, chanvese=True, chanvese_iterations=n)
        )
    totals: dict[str, float] = {}
    session = None
    for image, cls in tqdm(list(zip(samples, labels, strict=True)), desc="refiner speed"):
        x = torch.from_numpy(image[None])
        _, cams, feats = classifier(x)
        scores = torch.from_numpy(one_hot([cls], cams.shape[1]))
        if session is None:  # the served graph, as the repository's refiner runs it
            session = _refiner_session(levelset, (x, scores, cams, feats))
        phi0 = head.init(feats, to_input(x), cams)
        feeds = {"IMAGE": x, "SCORES": scores, "CAMS": cams, "FEATURES": feats}
        feeds = {k: v.numpy() for k, v in feeds.items()}
        timings = {
            "FNO evolution (PyTorch)": _timed(partial(head.evolution, phi0), repeat),
            "level-set refiner (PyTorch)": _timed(
                partial(levelset, x, scores, cams, feats), repeat
            ),
            "level-set refiner (ONNX Runtime)": _timed(partial(session.run, None, feeds), repeat),
        }
        for name, refiner in classical.items():
            call = partial(refiner, image, cams[0].numpy(), cls, not multi)
            timings[name] = _timed(call, repeat)
        for name, t in timings.items():
            totals[name] = totals.get(name, 0.0) + t
    base = totals["FNO evolution (PyTorch)"]
    rows = [
        {"refiner": name, "ms_per_image": 1e3 * t / len(samples), "ratio_to_fno": t / base}
        for name, t in totals.items()
    ]
    return {
        "image_size": size,
        "images": len(samples),
        "classes": int(cams.shape[1]),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def _refiner_session(module, sample) -> ort.InferenceSession:
    """Export the level-set refiner as the repository would and open it in ONNX Runtime."""
    from export.onnx_export import export_onnx
    from wsss.tensors import REFINER, served_models

    image, scores, _, feats = sample
    specs = served_models(image.shape[1], scores.shape[1], 2, tuple(feats.shape[1:]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "refiner.onnx"
        export_onnx(module, specs[REFINER], sample, path)
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def speed_table(result: dict) -> str:
    lines = [
        f"per-image refine time, {result['image_size']}x{result['image_size']}, "
        f"{result['classes']} classes, batch 1, median of repeats over {result['images']} "
        f"images, {result['threads']} threads (one run)",
        "",
        "| refiner | ms/image | time / FNO evolution |",
        "|---|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['refiner']} | {r['ms_per_image']:.2f} | {r['ratio_to_fno']:.1f}x |")
    return "\n".join(lines) + "\n"
