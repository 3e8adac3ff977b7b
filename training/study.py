"""The pseudo-mask study: classifier x CAM method x threshold x GrabCut, scored and timed.

Reproduces the pseudo-mask side of paper 000's Table 1 on whatever data the config names.
Pseudo-masks are made as in training (from each test image's image-level labels) and scored
against its ground truth; each refiner's time per image is measured in the same run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from training.cams import CAM_METHODS
from training.data.dataset import WSSSDataset
from training.data.layouts import read_class_names, segmentation_classes
from training.figures import colourise, overlay, panel_figure
from training.metrics import ConfusionMatrix
from training.models.common import to_input
from training.pipeline import load_model
from training.refine import Refiner, build_refiner, refine_batch
from wsss.config import Config, load_config, save_config


def classifier_label(run: Path, arch: str) -> str:
    """``resnet18``, or ``mobilenet_v2 (ImageNet)`` when the run started from pretrained weights."""
    saved = run / "classifier" / "config.yaml"
    pretrained = saved.exists() and load_config(saved).classifier.pretrained
    return f"{arch} (ImageNet)" if pretrained else arch


def refiners(cfg: Config) -> dict[tuple[str, bool], Refiner]:
    return {
        (t, g): build_refiner(dataclasses.replace(cfg.refine, method=t, grabcut=g))
        for t in cfg.evaluate.thresholds
        for g in cfg.evaluate.grabcut
    }


def run_study(cfg: Config) -> list[dict]:
    names = read_class_names(cfg.data.root, cfg.data.task)
    data = WSSSDataset(cfg.data.root, cfg.data.task, "test", cfg.data.image_size, len(names))
    binary = cfg.data.task == "pets"
    out = Path(cfg.evaluate.out)
    rows = []
    for run in [Path(r) for r in cfg.evaluate.runs or [cfg.runs]]:
        net, meta = load_model(run / "classifier" / "best.pt")
        label = classifier_label(run, meta["arch"])
        rows += _study_classifier(cfg, data, net, label, binary, names, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(rows, indent=2))
    (out / "study.md").write_text(study_table(rows, binary))
    save_config(cfg, out / "config.yaml")
    return rows


@torch.inference_mode()
def _study_classifier(cfg, data, net, label, binary, names, out) -> list[dict]:
    combos = refiners(cfg)
    n_seg = segmentation_classes(cfg.data.task, len(names))
    scores = {(m, k): ConfusionMatrix(n_seg) for m in cfg.evaluate.cam_methods for k in combos}
    seconds = dict.fromkeys(scores, 0.0)
    shown = {m: [] for m in cfg.evaluate.cam_methods}
    bs = cfg.train.batch_size
    for start in tqdm(range(0, len(data), bs), desc=f"study {label}", leave=False):
        images = data.images[start : start + bs]
        labels = [data.samples[i].labels for i in range(start, start + len(images))]
        feats = net.forward_features(to_input(torch.from_numpy(images)))
        for method in cfg.evaluate.cam_methods:
            cams = CAM_METHODS[method](feats, net.fc.weight, images.shape[1:3]).numpy()
            masks = {}
            for key, refiner in combos.items():
                t0 = time.perf_counter()
                masks[key] = refine_batch(refiner, images, cams, labels, binary)
                seconds[method, key] += time.perf_counter() - t0
                for m, g in zip(masks[key], data.masks[start : start + len(images)], strict=True):
                    scores[method, key].update(m, g)
            _collect(
                shown[method],
                cfg.evaluate.figure_images,
                images,
                cams,
                labels,
                masks,
                data.masks[start : start + len(images)],
                combos,
            )
    for method, examples in shown.items():
        if examples:
            path = out / "figures" / f"{label.split()[0]}_{method}.png"
            panel_figure(examples, list(examples[0]), path)
    return [
        {
            "classifier": label,
            "cam": method,
            "threshold": t,
            "grabcut": g,
            **scores[method, (t, g)].summary(binary),
            "refine_ms_per_image": 1e3 * seconds[method, (t, g)] / len(data),
        }
        for method in cfg.evaluate.cam_methods
        for (t, g) in combos
    ]


def _collect(shown, limit, images, cams, labels, masks, truth, combos) -> None:
    for k in range(min(len(images), limit - len(shown))):
        row = {"image": images[k], "CAM": cams[k, labels[k][0]]}
        for key, refiner in combos.items():
            row[refiner.name] = overlay(images[k], masks[key][k])
        row["ground truth"] = colourise(truth[k])
        shown.append(row)


def study_table(rows: list[dict], binary: bool) -> str:
    keys = ["iou", "dice"] if binary else ["miou", "mdice"]
    head = "| classifier | CAM | threshold | GrabCut | " + " | ".join(keys) + " | refine ms/image |"
    lines = [head, "|---|---|---|---|" + "---:|" * (len(keys) + 1)]
    for r in rows:
        values = " | ".join(f"{r[k]:.3f}" for k in keys)
        lines.append(
            f"| {r['classifier']} | {r['cam']} | {r['threshold']} | "
            f"{'yes' if r['grabcut'] else 'no'} | {values} | "
            f"{r['refine_ms_per_image']:.2f} |"
        )
    return "\n".join(lines) + "\n"
