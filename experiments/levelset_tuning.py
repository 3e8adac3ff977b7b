"""The level set's energy chosen by cross-validation on the training photos, never the test list.

Each variant (config overrides: the colour space, the edge term, the seed, the seed's region
term, the backbone update) trains the level set on all folds of the training split but one
and scores its pseudo-masks on the held-out fold against the ground truth (Pet's trimaps),
from the same classifier. Beside them on every fold: the seed itself (CAM + threshold) and
GrabCut from it, the rows a variant has to beat. The variant with the best mean IoU over the
folds wins; a variant's spread over the folds says how far its lead can be trusted.

``wsss study levelset --folds K --variants FILE`` (a YAML mapping of names to override
lists); writes ``<evaluate.out>/levelset_cv.{md,json}``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.evaluate import evaluate
from training.pipeline import (
    ClassifierGraph,
    Pipeline,
    load_model,
    refine_step,
    resolved_refine,
)
from training.torch_refiners import build_refiner, seeded
from wsss.config import Config, read_yaml, with_overrides
from wsss.errors import InputError
from wsss.task import get_task

SEED, GRABCUT = "seed: CAM + {seed}", "CAM + {seed} + GrabCut"


def fold_indices(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """``folds`` disjoint held-out sets covering 0..n-1, drawn at random with ``seed``."""
    if not 2 <= folds <= n:
        raise InputError(f"--folds: between 2 and the {n} training images, not {folds}")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, folds)]


def read_variants(path: str | Path) -> dict[str, list[str]]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist: --variants names a YAML file of variants")
    variants = read_yaml(path)  # not YAML, not UTF-8, a folder: one line each
    if not all(isinstance(v, list) for v in variants.values()):
        raise InputError(f"{path}: a mapping of variant names to lists of KEY=VALUE overrides")
    return {str(k): [str(x) for x in v] for k, v in variants.items()}


def cross_validate(
    cfg: Config, variants: dict[str, list[str]], folds: int = 3, reuse: bool = True
) -> str:
    """Every variant on every fold; writes the report and returns its markdown."""
    from training.stages import load_train_set, reusable, train_levelset

    classifier_path = Path(cfg.runs) / "classifier" / "best.pt"
    if not classifier_path.exists():
        raise FileNotFoundError(
            f"no classifier in {cfg.runs}: run `wsss train --stages classifier` first"
        )
    full = load_train_set(cfg)
    held = fold_indices(len(full), folds, cfg.train.seed)
    out = Path(cfg.evaluate.out) / "levelset_cv"
    seed = cfg.levelset.seed
    scores: dict[str, list[dict]] = {}
    seeds = {with_overrides(cfg, sets).levelset.seed for sets in variants.values()}

    def record(name: str, result) -> None:
        row = result.row()
        keep = ("pseudo_iou", "pseudo_image_iou", "refine_ms", "accuracy")
        scores.setdefault(name, []).append({k: row[k] for k in keep if k in row})

    for k, test_idx in enumerate(held):
        train_idx = np.setdiff1d(np.arange(len(full)), test_idx)
        train, test = full.subset(train_idx), full.subset(test_idx)
        tqdm.write(f"fold {k + 1}/{folds}: train on {len(train)}, score {len(test)}")
        net, meta = load_model(classifier_path)
        multi = get_task(meta["task"]).multi_label
        refine = resolved_refine(cfg, meta)  # the classifier's own thresholds
        start = seeded(refine, seed)
        served = ClassifierGraph(net, multi, False, cfg.classifier.cam_method, meta["class_names"])
        grabcut = dataclasses.replace(refine.only(start.method), grabcut=True)
        pipes = {
            SEED.format(seed=seed): Pipeline(served.eval(), None, build_refiner(start, multi)),
            GRABCUT.format(seed=seed): Pipeline(served.eval(), None, build_refiner(grabcut, multi)),
        }
        for other in sorted(seeds - {seed}):  # the other seeds the variants start from
            pipes[SEED.format(seed=other)] = Pipeline(
                served.eval(), None, build_refiner(seeded(refine, other), multi)
            )
        for name, sets in variants.items():
            variant = with_overrides(cfg, [*sets, f"runs={out / _slug(name) / f'fold{k}'}"])
            variant = dataclasses.replace(
                variant,
                refine=variant.refine.only("levelset"),
            )
            folder = Path(variant.runs)
            if not (reuse and reusable(variant, "levelset", folder / "levelset")):
                tqdm.write(f"fold {k + 1}/{folds}: training the level set '{name}'")
                net, cmeta = load_model(classifier_path)
                train_levelset(variant, train, net, cmeta)  # saves its config beside
            ls_served, refiner, _ = refine_step(variant)
            pipes[name] = Pipeline(ls_served, None, refiner)
        for name, result in evaluate(pipes, test, cfg.train.batch_size, 0, f"fold {k + 1}").items():
            record(name, result)
    return write_cv_report(out, cfg, variants, scores, folds, len(full))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def write_cv_report(
    out: Path, cfg: Config, variants: dict, scores: dict, folds: int, images: int
) -> str:
    rows = []
    for name, per_fold in scores.items():
        row = {"name": name, "overrides": variants.get(name, []), "folds": per_fold}
        for key in ("pseudo_iou", "pseudo_image_iou", "refine_ms", "accuracy"):
            values = [f[key] for f in per_fold if key in f]
            if values:
                row[key], row[f"{key}_std"] = _mean_std(values)
        rows.append(row)
    chosen = max((r for r in rows if r["name"] in variants), key=lambda r: r["pseudo_iou"])
    lines = [
        f"Level-set variants by {folds}-fold cross-validation on the training split "
        f"({images} photos; each fold's level set trained on the other folds, scored on its "
        f"own held-out photos against their ground truth; one classifier, `{cfg.runs}`). "
        "IoU pooled over each fold's pixels at the photos' resolution, then the mean and "
        "population std (ddof 0) over the folds; per image: the mean of each photo's own IoU.",
        "",
        "| variant | overrides | IoU | per image | each fold | refine ms/image |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in rows:
        each = " ".join(f"{f['pseudo_iou']:.3f}" for f in r["folds"])
        sets = " ".join(f"`{s}`" for s in r["overrides"]) or "(the config's)"
        sets = "" if r["name"] not in variants else sets
        lines.append(
            f"| {r['name']} | {sets} | {r['pseudo_iou']:.3f} ± {r['pseudo_iou_std']:.3f} | "
            f"{r.get('pseudo_image_iou', float('nan')):.3f} | {each} | "
            f"{r.get('refine_ms', float('nan')):.1f} |"
        )
    lines += ["", f"Chosen: **{chosen['name']}** ({chosen['pseudo_iou']:.3f} IoU)."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "levelset_cv.md").write_text(text)
    (out / "levelset_cv.json").write_text(
        json.dumps(
            {"folds": folds, "images": images, "rows": rows, "chosen": chosen["name"]}, indent=1
        )
    )
    return text
