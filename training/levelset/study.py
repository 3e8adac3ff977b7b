"""Paper 003's evaluation on the configured benchmark: quality and the Table 2 ablation.

Named pipelines fed to the one harness (``training.evaluate``): CAM + threshold, + GrabCut,
+ classical Chan-Vese at several iteration counts, the ablation of the paper's Table 2 (no
level set, MSE only, energy only, both), each trained from the same classifier, and the
level set as initialised before training (what training has to beat). Pseudo-masks come
from each test image's labels, as in training. The speed table (Table 3) is a benchmark:
``benchmarks/refiners.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from training.evaluate import evaluate, figure_rows, write_report
from training.levelset.model import LevelSetHead, ServedLevelSet
from training.levelset.train import head_kwargs
from training.pipeline import Pipeline, ServedClassifier, load_model, refine_step
from training.refine import LevelSetRefiner, build_refiner
from training.studies import load_test_set
from wsss.config import Config, save_config

CHANVESE_ITERATIONS = (1, 5, 10, 15, 50)  # the paper's Table 3 columns, and 50 beyond them
# Table 2 of paper 003: which of the config's loss terms each row keeps; "no level set" is
# the seed mask itself.
ABLATION = {"MSE only": (True, False), "energy only": (False, True), "MSE + energy": (True, True)}
UNTRAINED = "untrained (initialisation only)"


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
        raise ValueError("the ablation needs levelset.lambda_mse and lambda_energy both > 0")
    data = load_test_set(cfg)
    out = Path(cfg.evaluate.out) / "levelset"
    seed = cfg.levelset.seed
    groups: dict[str, str] = {}
    pipes: dict[str, Pipeline] = {}

    def add(group: str, name: str, pipe: Pipeline) -> None:
        groups[name] = group
        pipes[name] = pipe

    # One classifier for every classical row: they differ only in the refiner.
    seeded = dataclasses.replace(cfg.refine, method=seed, grabcut=False, chanvese=False)
    classifier, _, meta = refine_step(dataclasses.replace(cfg, refine=seeded))
    multi = classifier.multi_label

    def classical(**changes) -> Pipeline:
        refiner = build_refiner(dataclasses.replace(seeded, **changes), multi)
        return Pipeline(classifier, None, refiner)

    add("classical", f"CAM + {seed} (no level set)", classical())
    add("classical", f"CAM + {seed} + GrabCut", classical(grabcut=True))
    for n in CHANVESE_ITERATIONS:
        chanvese = classical(chanvese=True, chanvese_iterations=n)
        add("classical", f"CAM + {seed} + Chan-Vese ({n} it.)", chanvese)
    train_set = None
    ls = cfg.levelset
    for name, (mse, energy) in ABLATION.items():
        runs = out / name.replace(" ", "_").replace("+", "and")
        variant = dataclasses.replace(
            cfg,
            runs=str(runs),
            refine=dataclasses.replace(
                cfg.refine, method="levelset", grabcut=False, chanvese=False
            ),
            levelset=dataclasses.replace(
                ls, lambda_mse=ls.lambda_mse * mse, lambda_energy=ls.lambda_energy * energy
            ),
        )
        if train or not (runs / "levelset" / "best.pt").exists():
            train_set = train_set or load_train_set(cfg)
            net, cmeta = load_model(Path(cfg.runs) / "classifier" / "best.pt")
            train_levelset(variant, train_set, net, cmeta)
        served, refiner, _ = refine_step(variant)
        add("level set", name, Pipeline(served, None, refiner))
    add("level set", UNTRAINED, untrained_levelset(cfg, meta))
    results = evaluate(pipes, data, cfg.train.batch_size, cfg.evaluate.figure_images, "level set")
    rows = [{"group": groups[n], "refiner": n} | r.row() for n, r in results.items()]
    shown = [n for n in pipes if "Chan-Vese" not in n or "(15 it.)" in n]
    columns = [("CAM", shown[0], "cam")] + [(n, n, "pseudo") for n in shown]
    meta = {"task": data.task, "images": len(data), "image_size": cfg.data.image_size}
    table = write_report(
        out, "levelset", rows, ["group", "refiner"], meta, figure_rows(data, results, columns)
    )
    save_config(cfg, out / "config.yaml")
    return table


def untrained_levelset(cfg: Config, meta: dict) -> Pipeline:
    """The level-set refiner as it starts, before any training: the row training must beat."""
    net, _ = load_model(Path(cfg.runs) / "classifier" / "best.pt")
    multi = meta["task"] == "voc"
    served = ServedClassifier(net, multi, True, cfg.classifier.cam_method, meta["class_names"])
    torch.manual_seed(cfg.train.seed)
    kwargs = head_kwargs(cfg.levelset, net.fc.in_features, net.num_classes, cfg.data.image_size)
    refine = cfg.refine
    module = ServedLevelSet(LevelSetHead(**kwargs), multi, refine.score_threshold, refine.min_score)
    return Pipeline(served.eval(), None, LevelSetRefiner(module))
