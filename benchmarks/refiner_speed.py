"""Paper 003's Table 3: per-image time of the FNO evolution beside Chan-Vese iterations,
GrabCut and the Otsu threshold, measured in one run and reported as ratios.

``wsss bench --refiners``. The level-set refiner is also timed as the repository serves it:
exported to ONNX and run in ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from experiments.levelset_study import CHANVESE_ITERATIONS
from export.onnx_export import export_onnx
from training.evaluate import load_test_set
from training.levelset.model import LevelSetGraph
from training.levelset.train import load_levelset
from training.models.common import to_pixels
from training.pipeline import ClassifierGraph, one_hot, resolved_refine
from training.torch_refiners import build_refiner, seeded
from wsss.config import Config
from wsss.served.images import resize_image
from wsss.served.registry import LEVELSET
from wsss.task import get_task
from wsss.tensors import CAMS, FEATURES, IMAGE, REFINER, SCORES, served_models


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

    Uses the run's level-set checkpoint (``<runs>/levelset``); ``size`` resizes the images
    (the networks are fully convolutional) to time the paper's scale. Chan-Vese and GrabCut
    refine the image's labelled classes; so does the FNO (all K level sets evolve at once,
    whatever the number of classes present).
    """
    data = load_test_set(cfg)
    size = size or cfg.data.image_size
    net, head, meta = load_levelset(Path(cfg.runs) / LEVELSET.checkpoint)
    multi = get_task(meta["classifier"]["task"]).multi_label
    classifier = ClassifierGraph(net, multi, True, cfg.classifier.cam_method).eval()
    refine = resolved_refine(cfg, meta["classifier"])  # the classifier's own thresholds
    levelset = LevelSetGraph(head, multi, refine.score_threshold, refine.min_score).eval()
    samples = [resize_image(img, (size, size)) for img in data.images[:images]]
    labels = [data.samples[i].labels for i in range(len(samples))]
    start = seeded(refine, cfg.levelset.seed)
    classical = {f"{cfg.levelset.seed.capitalize()} threshold": build_refiner(start, multi)}
    start = refine.only(start.method)  # the follow-ups refine the seed's threshold
    grabcut = dataclasses.replace(start, grabcut=True, grabcut_iterations=5)
    classical["GrabCut (5 it.)"] = build_refiner(grabcut, multi)
    for n in CHANVESE_ITERATIONS:
        chanvese = dataclasses.replace(start, chanvese=True, chanvese_iterations=n)
        classical[f"Chan-Vese ({n} it.)"] = build_refiner(chanvese, multi)
    totals: dict[str, float] = {}
    session = None
    for image, cls in tqdm(list(zip(samples, labels, strict=True)), desc="refiner speed"):
        x = torch.from_numpy(image[None])
        _, cams, feats = classifier(x)
        scores = torch.from_numpy(one_hot([cls], cams.shape[1]))
        if session is None:  # the served graph, as the repository's refiner runs it
            session = _refiner_session(levelset, (x, scores, cams, feats))
        phi0 = head.init(feats, levelset.normalize(to_pixels(x)), cams)
        feeds = {IMAGE: x, SCORES: scores, CAMS: cams, FEATURES: feats}
        feeds = {k: v.numpy() for k, v in feeds.items()}
        timings = {
            "FNO evolution (PyTorch)": _timed(partial(head.evolution, phi0), repeat),
            "level-set refiner (PyTorch)": _timed(
                partial(levelset, x, scores, cams, feats), repeat
            ),
            "level-set refiner (ONNX Runtime)": _timed(partial(session.run, None, feeds), repeat),
        }
        arrays = (image[None], scores.numpy(), cams.numpy())
        for name, refiner in classical.items():
            timings[name] = _timed(partial(refiner, *arrays), repeat)
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


def table3(cfg: Config) -> tuple[dict, str]:
    """Paper 003's Table 3 for ``wsss reproduce``: the refiners timed side by side, and
    their markdown table."""
    timings = refiner_speed(cfg)
    return timings, speed_table(timings)
