"""Paper 003's evaluation on the configured benchmark: quality and the Table 2 ablation.

Named pipelines fed to the one harness (``training.evaluate``): CAM + threshold, + GrabCut,
+ classical Chan-Vese at several iteration counts, the ablation of the paper's Table 2 (no
level set, MSE only, energy only, both), each trained from the same classifier, and the
level set as initialised before training (what training has to beat). Pseudo-masks come
from each test image's labels, as in training. The speed table (Table 3) is a benchmark:
``benchmarks/refiner_speed.py``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from training.evaluate import evaluate, figure_rows, load_test_set, spread, write_report
from training.levelset.model import LevelSetGraph, LevelSetHead
from training.levelset.train import head_kwargs
from training.pipeline import (
    ClassifierGraph,
    Pipeline,
    load_model,
    refine_step,
    resolved_refine,
)
from training.torch_refiners import LevelSetRefiner, build_refiner, seeded
from wsss.config import Config, save_config
from wsss.errors import InputError
from wsss.served.registry import CAM_MASKS, LEVELSET
from wsss.task import get_task

CHANVESE_ITERATIONS = (1, 5, 10, 15, 50)  # the paper's Table 3 columns, and 50 beyond them
# Table 2 of paper 003: which of the config's loss terms each row keeps; "no level set" is
# the seed mask itself.
ABLATION = {"MSE only": (True, False), "energy only": (False, True), "MSE + energy": (True, True)}
UNTRAINED = "untrained (initialisation only)"
BOTH = "MSE + energy"
UPDATED = "updated backbone"


def run_levelset_study(cfg: Config, train: bool = True) -> str:
    """Score every refiner and ablation row; write levelset.{json,md,png}; return the table.

    The classifier comes from ``<runs>/classifier``; ablation level sets are trained under
    ``<evaluate.out>/levelset/<row>`` (reused when ``train`` is False and they exist).
    """
    from training.stages import load_train_set, train_levelset

    if not (Path(cfg.runs) / "classifier" / "best.pt").exists():
        raise FileNotFoundError(
            f"no classifier in {cfg.runs}: run `wsss train --stages classifier` first"
        )
    if cfg.levelset.lambda_mse <= 0 or cfg.levelset.lambda_energy <= 0:
        raise InputError("the ablation needs levelset.lambda_mse and lambda_energy both > 0")
    data = load_test_set(cfg)
    out = Path(cfg.evaluate.out) / "levelset"
    seed = cfg.levelset.seed
    groups: dict[str, str] = {}
    pipes: dict[str, Pipeline] = {}

    def add(group: str, name: str, pipe: Pipeline) -> None:
        groups[name] = group
        pipes[name] = pipe

    # One classifier for every classical row: they differ only in the refiner. The refiners
    # read the classifier's own per-class thresholds where it has them (the label F1 column).
    classifier, _, meta = refine_step(dataclasses.replace(cfg, refine=seeded(cfg.refine, seed)))
    multi = classifier.multi_label
    refine = resolved_refine(cfg, meta)
    seed_cfg = seeded(refine, seed)

    def classical(method: str, **changes) -> Pipeline:
        refiner = build_refiner(dataclasses.replace(refine.only(method), **changes), multi)
        return Pipeline(classifier, None, refiner)

    add(
        "classical",
        f"CAM + {seed} (no level set)",
        Pipeline(classifier, None, build_refiner(seed_cfg, multi)),
    )
    # The CAMs' own masks: their threshold (the CAM quality the backbone update is judged by),
    # and Otsu's, the paper's baseline; GrabCut and Chan-Vese refine the seed's own mask.
    start = seed_cfg.method
    threshold = start if start in CAM_MASKS else "otsu"
    cam_only = classical(threshold)
    for method in dict.fromkeys((threshold, "otsu")):
        if method != seed:
            add("classical", f"CAM + {method}", classical(method))
    add("classical", f"CAM + {start} + GrabCut", classical(start, grabcut=True))
    for n in CHANVESE_ITERATIONS:
        chanvese = classical(start, chanvese=True, chanvese_iterations=n)
        add("classical", f"CAM + {start} + Chan-Vese ({n} it.)", chanvese)
    train_set = None
    ls = cfg.levelset

    def trained(folder: str, **changes) -> tuple[ClassifierGraph, Pipeline]:
        """The level set trained under ``out/folder`` with these levelset changes."""
        nonlocal train_set
        runs = out / folder
        variant = dataclasses.replace(
            cfg,
            runs=str(runs),
            refine=cfg.refine.only("levelset"),
            levelset=dataclasses.replace(ls, **changes),
        )
        if train or not (runs / LEVELSET.checkpoint).exists():
            train_set = train_set or load_train_set(cfg)
            net, cmeta = load_model(Path(cfg.runs) / "classifier" / "best.pt")
            train_levelset(variant, train_set, net, cmeta)
        served, refiner, _ = refine_step(variant)
        return served, Pipeline(served, None, refiner)

    rows = ABLATION if cfg.evaluate.levelset_ablation else {BOTH: ABLATION[BOTH]}
    for name, (mse, energy) in rows.items():
        folder = name.replace(" ", "_").replace("+", "and")
        changes = {"lambda_mse": ls.lambda_mse * mse, "lambda_energy": ls.lambda_energy * energy}
        served, pipe = trained(folder, **changes)
        add("level set", name, pipe)
    add("level set", UNTRAINED, untrained_levelset(cfg, meta))
    # The backbone update of section 3.1: the level set trained with the classifier
    # fine-tuned on it (eq 27 + the classification loss), whose CAMs then seed the same
    # threshold. With levelset.finetune set the rows above already are that.
    if cfg.evaluate.levelset_backbone_update:
        if not ls.finetune:
            served, pipe = trained(UPDATED.replace(" ", "_"), finetune=True)
            add("backbone update", f"{BOTH}, {UPDATED}", pipe)
        # The updated classifier's CAMs, thresholded as before (it reads features too).
        updated = Pipeline(served, None, cam_only.refiner)
        updated_cam = f"CAM + {threshold}, {UPDATED}"
        add("backbone update", updated_cam, updated)
    results = evaluate(pipes, data, cfg.train.batch_size, cfg.evaluate.figure_images, "level set")
    rows = [{"group": groups[n], "refiner": n} | r.row() for n, r in results.items()]
    shown = [n for n in pipes if "Chan-Vese" not in n or "(15 it.)" in n]
    columns = [("CAM", shown[0], "cam")]
    if cfg.evaluate.levelset_backbone_update:
        columns.append((f"CAM, {UPDATED}", updated_cam, "cam"))
    columns += [(n, n, "pseudo") for n in shown]
    meta = {"task": data.task, "images": len(data), "image_size": cfg.data.image_size}
    table = write_report(
        out, "levelset", rows, ["group", "refiner"], meta, figure_rows(data, results, columns)
    )
    save_config(cfg, out / "config.yaml")
    return table


def untrained_levelset(cfg: Config, meta: dict) -> Pipeline:
    """The level-set refiner as it starts, before any training: the row training must beat."""
    net, _ = load_model(Path(cfg.runs) / "classifier" / "best.pt")
    multi = get_task(meta["task"]).multi_label
    served = ClassifierGraph(net, multi, True, cfg.classifier.cam_method, meta["class_names"])
    torch.manual_seed(cfg.train.seed)
    kwargs = head_kwargs(cfg.levelset, net.fc.in_features, net.num_classes, cfg.data.image_size)
    refine = resolved_refine(cfg, meta)
    module = LevelSetGraph(LevelSetHead(**kwargs), multi, refine.score_threshold, refine.min_score)
    return Pipeline(served.eval(), None, LevelSetRefiner(module))


# Scores the seed summary reports per row: mean ± std over the runs (a single-label study's
# IoU and accuracy, a multi-label study's mIoU, mAP and label F1), and their headers.
MERGED = {
    "pseudo_iou": "IoU",
    "pseudo_miou": "mIoU",
    "pseudo_image_iou": "per image",
    "accuracy": "accuracy",
    "map": "mAP",
    "label_f1": "label F1",
    "refine_ms": "refine ms/image",
}


def merge_studies(folders: list[str | Path], out: str | Path) -> str:
    """Rows of several studies (one per training seed) -> mean ± std per row and score.

    Each folder is a study's ``evaluate.out``; rows are matched by name, and a row missing
    from any study is left out. Writes ``levelset_seeds.{md,json}`` under ``out``, with
    each row's gain over the seed row (``... (no level set)``) per study where it has one.
    """
    paths = [Path(f) / "levelset" / "levelset.json" for f in folders]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"no level-set study at {', '.join(missing)}: run `wsss study levelset` with "
            "evaluate.out set to each folder first"
        )
    studies = [json.loads(p.read_text()) for p in paths]
    names = [r["refiner"] for r in studies[0]["rows"]]
    by = [{r["refiner"]: r for r in s["rows"]} for s in studies]
    names = [n for n in names if all(n in b for b in by)]
    rows = []
    for name in names:
        row = {"group": by[0][name]["group"], "refiner": name}
        for key in MERGED:
            values = [b[name][key] for b in by if key in b[name]]
            if len(values) == len(by):
                row[key] = spread(values)
        rows.append(row)
    keys = [k for k in MERGED if any(k in r for r in rows)]
    quality = next((k for k in ("pseudo_miou", "pseudo_iou") if k in keys), None)
    seed = next((n for n in names if n.endswith("(no level set)")), None)
    if quality and seed:  # each study's gain over its own seed, in points
        for row in rows:
            pairs = [(b[row["refiner"]].get(quality), b[seed].get(quality)) for b in by]
            if all(v is not None and s is not None for v, s in pairs):
                row["gain_points"] = [round(100 * (v - s), 1) for v, s in pairs]
    lines = [
        f"Mean ± population std over {len(folders)} studies "
        f"({', '.join(str(f) for f in folders)}).",
        "",
        "| group | refiner | "
        + " | ".join(MERGED[k] for k in keys)
        + (" | vs seed, points per study |" if seed and quality else " |"),
        "|---|---|" + "---:|" * (len(keys) + bool(seed and quality)),
    ]

    def cell(row: dict, key: str) -> str:
        v = row.get(key)
        digits = 1 if key == "refine_ms" else 3
        return "" if v is None else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"

    for r in rows:
        cells = [r["group"], r["refiner"], *(cell(r, k) for k in keys)]
        if seed and quality:
            cells.append(" / ".join(f"{g:+.1f}" for g in r.get("gain_points", [])))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "levelset_seeds.md").write_text(text)
    meta = {"studies": [str(f) for f in folders], "rows": rows}
    (out / "levelset_seeds.json").write_text(json.dumps(meta, indent=1))
    return text
