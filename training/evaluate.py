"""Score pseudo-masks and segmentations against ground truth on the test split."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from training.data.dataset import WSSSDataset
from training.data.layouts import read_class_names, segmentation_classes
from training.figures import colourise, overlay, panel_figure
from training.metrics import ConfusionMatrix
from training.pipeline import pipeline_from_config
from wsss.config import Config, save_config


def evaluate(cfg: Config, figure_count: int = 6) -> dict:
    """Pseudo-masks (from the test images' labels) and segmenter output vs ground truth.

    Writes ``results.json``, ``results.md`` and ``examples.png`` under ``<runs>/eval``.
    """
    names = read_class_names(cfg.data.root, cfg.data.task)
    data = WSSSDataset(cfg.data.root, cfg.data.task, "test", cfg.data.image_size, len(names))
    pipe = pipeline_from_config(cfg)
    binary = cfg.data.task == "pets"
    n_seg = segmentation_classes(cfg.data.task, len(names))
    pseudo_cm, seg_cm = ConfusionMatrix(n_seg), ConfusionMatrix(n_seg)
    refine_seconds, examples, example_labels = 0.0, [], []
    bs = cfg.train.batch_size
    for start in tqdm(range(0, len(data), bs), desc="evaluate", leave=False):
        images = data.images[start : start + bs]
        gt = data.masks[start : start + bs]
        labels = [data.samples[i].labels for i in range(start, start + len(images))]
        outputs = pipe.classify(images)
        cams = outputs[1]
        with torch.inference_mode():
            _, seg = pipe.segmenter(torch.from_numpy(images))
        t0 = time.perf_counter()
        pseudo = pipe.refine(images, outputs, labels)
        refine_seconds += time.perf_counter() - t0
        for p, s, g in zip(pseudo, seg.numpy(), gt, strict=True):
            pseudo_cm.update(p, g)
            seg_cm.update(s, g)
        for k in range(min(len(images), figure_count - len(examples))):
            top = labels[k][0]
            example_labels.append(names[top])
            examples.append(
                {
                    "image": images[k],
                    "CAM": cams[k, top].numpy(),
                    f"pseudo ({pipe.refiner.name})": overlay(images[k], pseudo[k]),
                    "segmenter": overlay(images[k], seg[k].numpy()),
                    "ground truth": colourise(gt[k]),
                }
            )
    results = {
        "task": cfg.data.task,
        "images": len(data),
        "classifier": cfg.classifier.arch,
        "refiner": pipe.refiner.name,
        "segmenter": cfg.segmenter.arch,
        "pseudo_mask": pseudo_cm.summary(binary),
        "segmentation": seg_cm.summary(binary),
        "refine_ms_per_image": 1e3 * refine_seconds / len(data),
    }
    out = Path(cfg.runs) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_table(results))
    save_config(cfg, out / "config.yaml")
    if examples:
        panel_figure(examples, list(examples[0]), out / "examples.png", example_labels)
    return results


def results_table(r: dict) -> str:
    keys = list(r["pseudo_mask"])
    head = "| output | " + " | ".join(keys) + " |"
    rule = "|---|" + "---:|" * len(keys)
    rows = [
        f"| {label} | " + " | ".join(f"{r[part][k]:.3f}" for k in keys) + " |"
        for label, part in (
            (f"pseudo-mask ({r['classifier']} CAM + {r['refiner']})", "pseudo_mask"),
            (f"segmentation ({r['segmenter']})", "segmentation"),
        )
    ]
    return (
        "\n".join([head, rule, *rows])
        + f"\n\nrefine: {r['refine_ms_per_image']:.2f} ms/image on {r['images']} test images\n"
    )
