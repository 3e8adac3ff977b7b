"""``wsss reproduce``: both papers' tables from one command, on the bundled benchmarks.

For each benchmark of the profile (``configs/reproduce/*.yaml``):

1. trains each classifier it names (paper 000's CAM backbones);
2. with ``ablation``, runs paper 003's Table 2 ablation (``experiments.levelset_study``) and
   Table 3 speed (the ``speed`` it is given: the CLI passes ``benchmarks.refiner_speed``, which
   times the exported graphs, so nothing here imports a layer above training) on that
   classifier; its MSE + energy level set is the ``levelset`` source;
3. makes each pseudo-mask source's masks of the training images, as ``wsss train`` does, and
   trains every segmenter of the profile on them; ``truth`` trains them on the ground truth
   (the supervised bound, boundary pixels ignored);
4. scores everything in one pass over the test split with the one harness
   (``training.evaluate``): pseudo-mask IoU/Dice, each segmenter's IoU/Dice (mIoU for
   multi-class data), its ratio to the same segmenter's supervised bound, training time.

Checkpoints land under ``<runs>/<benchmark>/``; a model whose saved config equals the one it
would be trained with is reused (a rerun after a crash, or with one more row, retrains
only what changed). Writes ``<out>/results.{md,json}`` and figures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from experiments.studies import parse_refiner, trained_levelset_seed
from training import stages
from training.data.dataset import WSSSDataset
from training.data.synth import SynthOptions, ensure_synth
from training.evaluate import Evaluation, evaluate, load_test_set, markdown_table, spread
from training.pipeline import Pipeline, SegmenterGraph, load_model, refine_step
from wsss.config import (
    CAM_LABELS,
    CAM_METHODS,
    BenchmarkProfile,
    Config,
    ReproduceProfile,
    load_config,
    load_saved_config,
)
from wsss.errors import InputError
from wsss.figures import colourise, overlay, panel_figure
from wsss.served.registry import CAM_MASKS, LEVELSET, MORE_THAN_LABELS, RefinerSpec
from wsss.task import get_task

TRUTH = "truth"
ABLATION_LEVELSET = "MSE_and_energy"  # the ablation row the levelset source uses


@dataclasses.dataclass
class Source:
    """A pseudo-mask source: a classifier's CAM method and a refiner, or the ground truth."""

    spec: str
    classifier: str = ""
    cam: str = ""
    refiner: str = ""
    # A level set's: the masks its initial level sets learned from (``levelset.seed``),
    # which say what its own are made from.
    levelset_seed: str = ""

    @classmethod
    def parse(cls, spec: str, classifiers: dict) -> Source:
        if spec == TRUTH:
            return cls(spec)
        parts = spec.split("/")
        if len(parts) != 3 or parts[0] not in classifiers:
            raise InputError(
                f"reproduce source {spec!r}: '<classifier>/<cam method>/<refiner>' with a "
                f"classifier of the benchmark ({', '.join(classifiers)}), or 'truth'"
            )
        if parts[1] not in CAM_METHODS:
            raise InputError(f"reproduce source {spec!r}: one of {', '.join(CAM_METHODS)}")
        return cls(spec, *parts)

    @property
    def label(self) -> str:
        if self.spec == TRUTH:
            return "ground truth (supervised bound)"
        spec = RefinerSpec.parse(self.refiner)
        label = spec.label
        seed = RefinerSpec.parse(self.levelset_seed) if self.levelset_seed else None
        if spec.entry is LEVELSET and seed and seed.more_than_labels and not spec.more_than_labels:
            label += f" ({MORE_THAN_LABELS})"
        if not spec.entry.reads_cam:
            return label
        return f"{self.classifier} {CAM_LABELS[self.cam]} + {label}"

    @property
    def slug(self) -> str:
        return self.spec.replace("/", "_").replace("+", "p")


# Table 3: a level-set run's config -> (the timings, their markdown table).
Speed = Callable[[Config], tuple[dict, str]]


def reproduce(profile: ReproduceProfile, name: str, speed: Speed | None = None) -> str:
    """Run every benchmark of ``profile``; write the report; return its markdown. The
    report is written once the tables are measured, and again after each benchmark's
    further training seeds (hours on a CPU): a run stopped there keeps its tables. Without
    ``speed`` the report has no Table 3."""
    started = time.perf_counter()
    results = {
        bench: _run_once(profile, bench, spec, speed=speed)
        for bench, spec in profile.benchmarks.items()
    }
    text = _write_report(profile, name, results, started)
    for bench, spec in profile.benchmarks.items():
        if spec.seeds:
            results[bench] |= run_seeds(profile, bench, spec, results[bench])
            text = _write_report(profile, name, results, started)
    return text


def _write_report(profile: ReproduceProfile, name: str, results: dict, started: float) -> str:
    report = {
        "profile": name,
        "machine": machine(),
        "total_seconds": round(time.perf_counter() - started, 1),
        "benchmarks": results,
    }
    out = Path(profile.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    text = render(report)
    (out / "results.md").write_text(text)
    return text


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "platform": platform.platform(),
    }


def bench_config(profile: ReproduceProfile, bench: str, spec: BenchmarkProfile, *extra) -> Config:
    cfg = load_config(spec.config, [*spec.set, *extra])
    return dataclasses.replace(cfg, runs=str(Path(profile.runs) / bench))


def _train_seconds(folder: Path) -> float:
    """The summed epoch times of a run (from its metrics.jsonl): the training time."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return float(sum(json.loads(line)["seconds"] for line in lines))


def run_seeds(profile: ReproduceProfile, bench: str, spec: BenchmarkProfile, first: dict) -> dict:
    """The seeded rows again under each of ``spec.seeds`` (classifiers and segmenters
    retrained), summarised with the first run's as mean and spread."""
    keep = spec.seeded if spec.seeded is not None else (spec.segmented or spec.sources)
    segs = spec.seed_segmenters if spec.seed_segmenters is not None else list(profile.segmenters)
    seeded_profile = dataclasses.replace(
        profile, segmenters={k: v for k, v in profile.segmenters.items() if k in segs}
    )
    runs = [[r for r in first["rows"] if r["spec"] in keep and r["segmenter"] in ("", *segs)]]
    accuracy = [first["classifiers"]]
    for seed in spec.seeds:
        again = dataclasses.replace(
            spec,
            set=[*spec.set, f"train.seed={seed}"],
            sources=[s for s in spec.sources if s in keep],
            classifiers={
                name: sets
                for name, sets in spec.classifiers.items()
                if any(s.startswith(f"{name}/") for s in keep)
            },
            ablation="",
            seeds=[],
        )
        tqdm.write(f"reproduce {bench}: training seed {seed}")
        one = _run_once(seeded_profile, bench, again, Path(f"seed{seed}"), figures=False)
        runs.append(one["rows"])
        accuracy.append(one["classifiers"])
    return {
        "seeds": [0, *spec.seeds],
        "seeded_rows": seed_summary(runs),
        "seeded_classifiers": {
            name: spread([a[name] for a in accuracy if name in a]) for name in accuracy[0]
        },
    }


def seed_summary(runs: list[list[dict]]) -> list[dict]:
    """Rows of several runs (matched by source and segmenter) as each metric's mean, spread
    (population standard deviation) and values."""
    out = []
    for first in runs[0]:
        same = [
            r for rows in runs for r in rows
            if (r["spec"], r["segmenter"]) == (first["spec"], first["segmenter"])
        ]  # fmt: skip
        row = {k: first[k] for k in ("source", "segmenter", "spec")}
        for key, value in first.items():
            if isinstance(value, float) and key != "train_seconds":
                row[key] = spread([r[key] for r in same if key in r])
        out.append(row)
    return out


def _run_once(
    profile: ReproduceProfile,
    bench: str,
    spec: BenchmarkProfile,
    sub: Path = Path(),
    figures: bool = True,
    speed: Speed | None = None,
) -> dict:
    cfg = bench_config(profile, bench, spec)
    ensure_synth(cfg.data.root, SynthOptions.of(cfg.data))
    cfg = dataclasses.replace(cfg, runs=str(Path(cfg.runs) / sub))
    root = Path(cfg.runs)
    train_set = stages.load_train_set(cfg)
    test_set = load_test_set(cfg)
    sources = [Source.parse(s, spec.classifiers) for s in spec.sources]

    # 1. classifiers
    classifier_cfgs = {}
    for name, sets in spec.classifiers.items():
        c = bench_config(profile, bench, spec, *sets)
        c = dataclasses.replace(c, runs=str(root / "classifiers" / name))
        classifier_cfgs[name] = c
        if stages.reusable(c, "classifier", Path(c.runs) / "classifier") is None:
            tqdm.write(f"reproduce {bench}: classifier {name}")
            stages.run(c, ("classifier",))

    # 2. paper 003: the ablation and the speed table
    ablation = timings = timings_table = None
    levelset_runs = {}
    if spec.ablation:
        from experiments.levelset_study import run_levelset_study

        c = classifier_cfgs[spec.ablation]
        study_out = root / "ablation"
        c = dataclasses.replace(c, evaluate=dataclasses.replace(c.evaluate, out=str(study_out)))
        tqdm.write(f"reproduce {bench}: paper 003's ablation on {spec.ablation}")
        run_levelset_study(c, train=not _ablation_done(study_out, c))
        ablation = json.loads((study_out / "levelset" / "levelset.json").read_text())
        trained = study_out / "levelset" / ABLATION_LEVELSET
        levelset_runs[spec.ablation] = trained
        if speed is not None:
            timings, timings_table = speed(dataclasses.replace(c, runs=str(trained)))

    # 3. pseudo-masks and segmenters; a level set's rows marked by the seed it learned from
    sources = [_with_levelset_seed(s, classifier_cfgs, levelset_runs) for s in sources]
    pipes: dict[str, Pipeline] = {}
    rows: list[dict] = []
    for source in sources:
        refine_cfg = _source_config(source, classifier_cfgs, levelset_runs)
        if refine_cfg is not None:
            classifier, refiner, _ = refine_step(refine_cfg)
            pipes[f"pseudo {source.spec}"] = Pipeline(classifier, None, refiner)
        masks = None
        if spec.segmented is not None and source.spec not in spec.segmented:
            rows.append({"source": source.label, "segmenter": "", "spec": source.spec})
            continue
        # What its masks are made from (the classifier run, the refiner's settings, the
        # photos; read once a source): a segmenter of other masks is trained again.
        made = None if refine_cfg is None else _source_digest(refine_cfg)
        meta = None if made is None else {"pseudo_source": made}
        for seg_name, seg_sets in profile.segmenters.items():
            c = bench_config(profile, bench, spec, *seg_sets)
            c = dataclasses.replace(c, runs=str(root / "segmenters" / source.slug / seg_name))
            out = Path(c.runs) / ("supervised" if source.spec == TRUTH else "segmenter")
            pseudo_seconds = None
            if stages.reusable(c, "segmenter", out, meta) is None:
                if masks is None:
                    t0 = time.perf_counter()
                    masks = (
                        train_set.masks
                        if refine_cfg is None
                        else stages.make_pseudo_masks(refine_cfg, train_set)
                    )
                    pseudo_seconds = time.perf_counter() - t0
                tqdm.write(f"reproduce {bench}: {seg_name} on {source.label}")
                stages.train_segmenter(
                    c, train_set, masks, supervised=source.spec == TRUTH, source=made
                )
            net, _ = load_model(out / "best.pt")
            pipes[f"{seg_name} {source.spec}"] = Pipeline(None, SegmenterGraph(net).eval(), None)
            row = {"source": source.label, "segmenter": seg_name, "spec": source.spec}
            row["train_seconds"] = round(_train_seconds(out), 1)
            if pseudo_seconds is not None:
                row["pseudo_seconds"] = round(pseudo_seconds, 1)
            rows.append(row)

    # 4. one pass over the test split
    examples = max(cfg.evaluate.figure_images, 0)
    scored = evaluate(pipes, test_set, cfg.train.batch_size, examples, f"reproduce {bench}")
    key = test_set.kind.iou
    bounds = {
        r["segmenter"]: _score(scored, r, key) for r in rows if r["spec"] == TRUTH
    }  # fmt: skip
    classifiers = {}
    for r in rows:
        if r["segmenter"]:
            seg = scored[f"{r['segmenter']} {r['spec']}"].row()
            r |= {k: v for k, v in seg.items() if k.startswith("seg_")}
        pseudo = scored.get(f"pseudo {r['spec']}")
        if pseudo is not None:
            p = pseudo.row()
            r |= {k: v for k, v in p.items() if k.startswith("pseudo_")}
            name = Source.parse(r["spec"], spec.classifiers).classifier
            if "accuracy" in p or "map" in p:
                classifiers.setdefault(name, p.get("accuracy", p.get("map")))
        if bounds.get(r["segmenter"]):
            r["of_bound"] = r[f"seg_{key}"] / bounds[r["segmenter"]]
    weak = [r for r in rows if r["spec"] != TRUTH and f"seg_{key}" in r]
    best = max(weak, key=lambda r: r[f"seg_{key}"]) if weak else None
    if figures:
        _figures(Path(profile.out), bench, test_set, scored, sources, profile, rows, key, examples)
    return {
        "task": test_set.task,
        "image_size": cfg.data.image_size,
        "train_images": len(train_set),
        "test_images": len(test_set),
        "metric": key,
        "classifiers": classifiers,
        "rows": rows,
        "best": {k: best[k] for k in ("source", "segmenter", "spec", f"seg_{key}")}
        if best
        else None,
        "orderings": orderings(rows, key, ablation),
        "ablation": ablation,
        "speed": timings,
        "speed_table": timings_table,
    }


def _source_digest(refine_cfg: Config) -> str:
    """One digest of ``stages.pseudo_source``: the classifier run, the settings and the
    photos the pseudo-masks of ``refine_cfg`` are made from."""
    text = json.dumps(stages.pseudo_source(refine_cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _score(scored: dict[str, Evaluation], row: dict, key: str) -> float:
    return scored[f"{row['segmenter']} {row['spec']}"].row()[f"seg_{key}"]


def _ablation_done(study_out: Path, cfg: Config) -> bool:
    """The ablation's level sets exist and the study that trained them ran with exactly
    this config (its evaluate settings decide its rows: not a stage's reuse)."""
    trained = study_out / "levelset" / ABLATION_LEVELSET / "levelset" / "best.pt"
    saved = study_out / "levelset" / "config.yaml"
    return (
        trained.exists()
        and saved.exists()
        and dataclasses.asdict(load_saved_config(saved)) == dataclasses.asdict(cfg)
    )


def _with_levelset_seed(
    source: Source, classifiers: dict[str, Config], levelset_runs: dict[str, Path]
) -> Source:
    """A level set's source with the seed its run was trained from (``_source_config``'s
    run: the ablation's, or the classifier's own)."""
    if source.refiner != LEVELSET.name:  # the spec _source_config trains and reads
        return source
    c = classifiers[source.classifier]
    runs = levelset_runs.get(source.classifier, c.runs)
    return dataclasses.replace(source, levelset_seed=trained_levelset_seed(runs, c.levelset.seed))


def _source_config(
    source: Source, classifiers: dict[str, Config], levelset_runs: dict[str, Path]
) -> Config | None:
    """The config whose ``refine_step`` makes this source's pseudo-masks (None: the truth)."""
    if source.spec == TRUTH:
        return None
    c = classifiers[source.classifier]
    refine = parse_refiner(source.refiner, c.refine)
    c = dataclasses.replace(
        c, refine=refine, classifier=dataclasses.replace(c.classifier, cam_method=source.cam)
    )
    if source.refiner == LEVELSET.name:
        if source.classifier in levelset_runs:
            return dataclasses.replace(c, runs=str(levelset_runs[source.classifier]))
        if not (Path(c.runs) / LEVELSET.checkpoint).exists():
            stages.run(c, ("levelset",))
    return c


def orderings(rows: list[dict], key: str, ablation: dict | None) -> list[dict]:
    """The papers' orderings, checked on the measured rows (whichever way they come out)."""
    seg = f"seg_{key}"
    found = []
    by = {(r["spec"], r["segmenter"]): r for r in rows}
    segmenters = sorted({r["segmenter"] for r in rows})
    if "deeplabv3" in segmenters and "unet" in segmenters:
        pairs = [
            (by[(s, "deeplabv3")][seg], by[(s, "unet")][seg])
            for s in {r["spec"] for r in rows}
            if (s, "deeplabv3") in by and (s, "unet") in by
        ]
        ahead = sum(d > u for d, u in pairs)
        found.append({
            "paper": "000",
            "claim": "DeepLabV3 ahead of UNet on the same pseudo-masks",
            "measured": f"DeepLabV3 ahead on {ahead} of {len(pairs)} sources",
            "holds": ahead > len(pairs) / 2,
        })  # fmt: skip
    for r in rows:
        source, _, refiner = r["spec"].rpartition("/")
        spec = RefinerSpec.parse(refiner) if source else None  # truth has no refiner
        if spec is not None and spec.follow == "grabcut":
            plain = by.get((f"{source}/{spec.seed}", r["segmenter"]))
            if plain is not None and f"pseudo_{key}" in r and f"pseudo_{key}" in plain:
                p0, p1 = plain[f"pseudo_{key}"], r[f"pseudo_{key}"]
                segmented = seg in r and seg in plain
                found.append({
                    "paper": "000",
                    "claim": f"GrabCut helps ({r['segmenter'] or 'pseudo-masks'})",
                    "measured": f"pseudo {p0:.3f} -> {p1:.3f}"
                    + (f", segmenter {plain[seg]:.3f} -> {r[seg]:.3f}" if segmented else ""),
                    "holds": r[seg] > plain[seg] if segmented else p1 > p0,
                })  # fmt: skip
        if spec is not None and spec.entry is LEVELSET and seg in r:
            clf, cam = source.split("/")
            cams = [
                o for o in rows
                if o["segmenter"] == r["segmenter"] and o["spec"].startswith(f"{clf}/{cam}/")
                and o["spec"].split("/")[2] in CAM_MASKS and seg in o
            ]  # fmt: skip
            if cams:
                top = max(cams, key=lambda o: o[seg])
                found.append({
                    "paper": "003",
                    "claim": f"level set ahead of CAM ({r['segmenter']})",
                    "measured": f"{r[seg]:.3f} vs {top[seg]:.3f} ({top['source']})",
                    "holds": r[seg] > top[seg],
                })  # fmt: skip
    if ablation:
        from experiments.levelset_study import ABLATION

        level = {row["refiner"]: row for row in ablation["rows"] if row["refiner"] in ABLATION}
        metric = f"pseudo_{key}"
        if level and all(metric in row for row in level.values()):
            top = max(level, key=lambda n: level[n][metric])
            found.append({
                "paper": "003",
                "claim": "MSE + energy best of the ablation",
                "measured": ", ".join(f"{n} {row[metric]:.3f}" for n, row in level.items()),
                "holds": top == "MSE + energy",
            })  # fmt: skip
    return found


def _figures(out, bench, data: WSSSDataset, scored, sources, profile, rows, key, examples):
    """A bar chart of every row, and example outputs of the main sources."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    labels = [s.label for s in sources]
    segmenters = list(profile.segmenters)
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(labels) * len(segmenters) + 1.5))
    height = 0.8 / len(segmenters)
    for k, seg in enumerate(segmenters):
        mine = {r["spec"]: r[f"seg_{key}"] for r in rows if r["segmenter"] == seg}
        values = [mine.get(s.spec, 0) for s in sources]
        ys = np.arange(len(labels)) + k * height
        ax.barh(ys, values, height, label=f"{seg} test {key.upper()}")
    pseudo = [
        scored[f"pseudo {s.spec}"].row().get(f"pseudo_{key}", np.nan)
        if f"pseudo {s.spec}" in scored else np.nan for s in sources
    ]  # fmt: skip
    ax.scatter(pseudo, np.arange(len(labels)) + 0.4 - height / 2, color="k", marker="|", s=200,
               label=f"pseudo-mask {key.upper()}", zorder=3)  # fmt: skip
    ax.set_yticks(np.arange(len(labels)) + 0.4 - height / 2, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"test {key.upper()}")
    ax.set_title(f"{bench}: segmenters trained on each pseudo-mask source")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / f"{bench}_segmenters.png", dpi=110)
    plt.close(fig)
    if not examples:
        return
    best_seg = {
        s.spec: max(segmenters, key=lambda g: scored[f"{g} {s.spec}"].row()[f"seg_{key}"])
        for s in sources
        if all(f"{g} {s.spec}" in scored for g in segmenters)
    }
    shown = [s for s in sources if f"pseudo {s.spec}" in scored][:6]
    figure = []
    for i in range(min(examples, 4)):
        row = {"image": data.images[i]}
        for s in shown:
            mask = scored[f"pseudo {s.spec}"].examples["pseudo"][i]
            row[f"{s.label}: pseudo"] = overlay(data.images[i], mask)
        for s in sources:
            if (s.spec == TRUTH or s is shown[0]) and s.spec in best_seg:
                g = best_seg[s.spec]
                mask = scored[f"{g} {s.spec}"].examples["seg"][i]
                row[f"{g} on {s.label}"] = overlay(data.images[i], mask)
        row["ground truth"] = colourise(data.masks[i])
        figure.append(row)
    panel_figure(figure, list(figure[0]), out / f"{bench}_examples.jpg")


def seeded_table(b: dict) -> str:
    """The headline rows as mean ± spread over the training seeds."""
    key = b["metric"]
    metrics = [f"pseudo_{key}", f"seg_{key}", "of_bound"]
    if key == "iou":
        metrics[1:1] = ["pseudo_image_iou"]
        metrics.insert(-1, "seg_image_iou")
    head = ["source", "segmenter", *metrics]
    lines = [
        f"Headline rows over training seeds {', '.join(map(str, b['seeds']))} (classifiers "
        "and segmenters retrained; mean ± population standard deviation):",
        "",
        "Classifier "
        + get_task(b["task"]).metric_label
        + ": "
        + ", ".join(
            f"{n} {v['mean']:.3f} ± {v['std']:.3f}" for n, v in b["seeded_classifiers"].items()
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * len(metrics),
    ]
    for r in b["seeded_rows"]:
        cells = [r["source"], r["segmenter"]]
        for m in metrics:
            v = r.get(m)
            if v is None:
                cells.append("")
            elif m == "of_bound":
                cells.append(f"{v['mean']:.2f}x ± {v['std']:.2f}")
            else:
                cells.append(f"{v['mean']:.3f} ± {v['std']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(report: dict) -> str:
    m = report["machine"]
    where = m["gpu"] or f"CPU, {m['cpu_cores']} cores"
    lines = [
        f"# Reproduced: profile `{report['profile']}`",
        "",
        f"`make reproduce PROFILE={report['profile']}` on {where}: "
        f"{report['total_seconds'] / 60:.1f} minutes in all (one run; models trained in "
        "that run unless reused from an identical earlier one).",
        "",
        "Every mask is scored at its photo's own resolution (the model's masks resized back, "
        "nearest), ignored pixels (trimap borders, VOC boundaries) left out: IoU pooled over "
        "the split's pixels and, for binary tasks, the mean of each image's IoU. Rows marked "
        f"*{MORE_THAN_LABELS}* use an off-the-shelf ViT (its saliency, attention or patch "
        "tokens) besides the "
        "image labels (its authors do not say what it was trained on, so Pet images may have "
        "been among them); the others use the image labels only, as the papers' CAM rows do.",
        "",
    ]
    for bench, b in report["benchmarks"].items():
        key = b["metric"]
        lines += [
            f"## {bench} ({b['task']}, {b['image_size']} px, {b['train_images']} training / "
            f"{b['test_images']} test images)",
            "",
            "Classifier "
            + get_task(b["task"]).metric_label
            + ": "
            + ", ".join(f"{n} {v:.3f}" for n, v in b["classifiers"].items()),
            "",
        ]
        metrics = [f"pseudo_{key}", f"seg_{key}", "seg_dice" if key == "iou" else "seg_mdice"]
        if key == "iou":
            metrics[1:1] = ["pseudo_image_iou"]
            metrics += ["seg_image_iou"]
        metrics += ["of_bound", "train_seconds"]
        table = markdown_table(b["rows"], ["source", "segmenter"], metrics)
        lines += [table, ""]
        if b["best"]:
            best = b["best"]
            lines += [
                f"Highest weakly supervised row on the test split (the table's summary, "
                f"chosen by nothing): {best['segmenter']} on {best['source']} "
                f"({key} {best[f'seg_{key}']:.3f}).",
                "",
            ]
        if b.get("seeded_rows"):
            lines += seeded_table(b), ""
        lines += ["Orderings the papers report, checked on these rows:", ""]
        for o in b["orderings"]:
            verdict = "holds" if o["holds"] else "does not hold"
            lines.append(f"- paper {o['paper']}: {o['claim']}: {verdict} ({o['measured']})")
        lines += ["", f"![segmenters]({bench}_segmenters.png)", ""]
        lines += [f"![examples]({bench}_examples.jpg)", ""]
        if b["ablation"]:
            rows = b["ablation"]["rows"]
            lines += [
                f"### Paper 003's ablation (Table 2) on {bench}",
                "",
                markdown_table(rows, ["group", "refiner"]),
            ]
        if b["speed_table"]:
            lines += [f"### Paper 003's speed (Table 3) on {bench}", "", b["speed_table"]]
    return "\n".join(lines) + "\n"
