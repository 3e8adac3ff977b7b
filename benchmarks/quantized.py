"""``wsss bench --quantized``: a profile served with its saliency ViT in fp32 and in int8, and
reading smaller images (``--vit-sizes``, ``refine.saliency_size``), and with its classifier
in static int8 too, side by side in one run, on real photos (reports/bench/quantized.md).

Rows: every variant exported first; the ViT graphs and the classifier's fp32 and int8
graphs alone in process (batch 1, the graphs timed in alternating rounds so that a busy
machine slows them alike, no server running), then each variant served in turn by its
own Triton server: ``wsss_pipeline_bytes`` over gRPC with the photos sent as their files,
throughput and p50/p95 per concurrency (perf_analyzer), and the quality of its answers on the
same photos (``served_quality``). The ratios are the serving issue's targets, against the
ViT as it came (fp32, 224 px): the best throughput against its own rate, and p50 at
concurrency 1 against its time.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks import SHARED_PETS
from benchmarks.served_quality import served_quality
from export.quantize import quantize_graph
from export.repository import build_if_missing, export_repository, vit_core
from serving.client import PipelineClient
from serving.perf import PerfSettings, run_perf_analyzer
from serving.server import TritonServer, on_free_ports
from training.data.dataset import WSSSDataset
from training.data.layouts import list_samples
from training.torch_refiners import saliency_graph, saliency_model
from wsss.config import load_config, served_config, with_overrides
from wsss.served.classical import VIT_SIZE, OnnxSaliency
from wsss.served.registry import RefinerSpec
from wsss.tensors import PIPELINE_BYTES

LABEL = {"none": "fp32", "dynamic": "int8", "static": "static int8"}
# The targets' yardstick: the ViT's file as it came, unchanged (the project's own reading of
# it, ``onnx_reading``, computes its position embeddings once; the file does at every call).
AS_IT_CAME = f"fp32, {VIT_SIZE} px, the file as it came"
BASELINE = f"{AS_IT_CAME}, default threads"


def variants(sizes: list[int], side: int) -> list[tuple[str, int, str]]:
    """(export.vit.quantize, refine.saliency_size, export.classifier.quantize) of each
    served variant: fp32 and int8 ViTs at 224 px, then dynamic and static int8 at each other
    side, with the fp32 classifier; then the static int8 ViT at the profile's own ``side``
    with a static int8 classifier too."""
    vits = [("none", VIT_SIZE), ("dynamic", VIT_SIZE)] + [
        (kind, s) for s in sizes if s != VIT_SIZE for kind in ("dynamic", "static")
    ]
    last = ("static", side) if side != VIT_SIZE else ("dynamic", side)
    return [(kind, size, "none") for kind, size in vits] + [(*last, "static")]


def variant_label(kind: str, size: int, classifier: str = "none") -> str:
    label = f"{LABEL[kind]}, {size} px"
    return label + (f", {LABEL[classifier]} classifier" if classifier != "none" else "")


def network_times(graphs: dict[str, bytes], images: np.ndarray, rounds: int) -> dict:
    """ms per image of each network graph (uint8 images in, as exported) at batch 1,
    alternating a round of each over ``images``, with ONNX Runtime's default threads and
    with one."""
    import onnxruntime as ort

    def runner(graph: bytes, threads: int):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        return lambda x: session.run(None, {feed: x})

    runs = {
        f"{label}, {'default threads' if threads == 0 else '1 thread'}": runner(graph, threads)
        for threads in (0, 1)
        for label, graph in graphs.items()
    }
    return alternating(runs, images, rounds)


def vit_times(cfg, sizes: list[int], images: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """ms per image of each graph (the file as it came, then fp32 and int8 at each side as
    the project reads it) at batch 1, alternating a round of each over ``images``: with ONNX
    Runtime's default threads (a thread per core: the targets' baseline) and with the one
    thread each served instance runs."""
    refine = served_config(cfg).refine
    models = {AS_IT_CAME: (saliency_model(refine).read_bytes(), VIT_SIZE)}
    for size in sizes:
        fp32 = saliency_graph(dataclasses.replace(refine, saliency_size=size))
        models[variant_label("none", size)] = (fp32, size)
        models[variant_label("dynamic", size)] = (quantize_graph(fp32), size)
        if size != VIT_SIZE:  # calibrated on the profile's export.vit.calibration photos
            static, done = vit_core(with_overrides(cfg, ["export.vit.quantize=static"]), fp32, size)
            if not done["quantize"].startswith("static"):  # no calibration photos at hand
                raise SystemExit(f"wsss bench --quantized: {done['quantize']}")
            models[variant_label("static", size)] = (static, size)
    graphs = {
        f"{label}, {'default threads' if threads == 0 else '1 thread'}": (
            OnnxSaliency(model, threads=threads, size=size)
        )
        for threads in (0, 1)
        for label, (model, size) in models.items()
    }
    return alternating(graphs, images, rounds)


def alternating(runs: dict, images: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """ms per image of each ``runs`` callable (batch of one image in), a warm-up call each,
    then ``rounds`` rounds of every callable over ``images`` in turn: a busy machine slows
    them alike."""
    for run in runs.values():
        run(images[:1])
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            for image in images:
                t0 = time.perf_counter()
                run(image[None])
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def quantized_report(args) -> str:
    cfg = load_config(args.config or "configs/serve.yaml", args.set)
    refine = served_config(cfg).refine  # the refiner the ensemble serves
    if RefinerSpec.of(refine).entry.vit != "saliency":
        raise SystemExit(
            "wsss bench --quantized: the profile's served refiner runs no saliency ViT"
        )
    build_if_missing(cfg)  # the profile's checkpoints (nothing trained for make serve's)
    root = Path(args.images[0] if args.images else SHARED_PETS)
    samples = list_samples(root, "pets", "test")
    data = WSSSDataset(root, "pets", "test", cfg.data.image_size, samples=samples)
    # The files as they are (a JPEG each), 16 spread over the list.
    photos = [s.image_path.read_bytes() for s in samples[:: max(1, len(samples) // 16)][:16]]
    out = Path(args.out or "reports/bench")
    work = Path(".cache/bench/quantized")
    sizes = sorted({VIT_SIZE, refine.saliency_size, *args.vit_sizes}, reverse=True)
    # Every variant exported first, so that the graphs are timed with no server running.
    repos = {}
    for kind, size, classifier in variants(sizes, refine.saliency_size):
        repo = work / f"{kind}_{size}_{classifier}" / "model_repository"
        variant = with_overrides(
            cfg,
            [
                f"export.repository={repo}",
                f"export.vit.quantize={kind}",
                # the refiner the ensemble serves (unset, export.refine starts as refine)
                f"export.refine.saliency_size={size}",
                f"export.classifier.quantize={classifier}",
                # the classifier calibrated on the ViT's photos (make serve's data is synthetic)
                f"export.classifier.calibration={cfg.export.vit.calibration or cfg.data.root}",
            ],
        )
        shutil.rmtree(repo, ignore_errors=True)  # this profile's models, exported now
        export_repository(variant)
        repos[variant_label(kind, size, classifier)] = (repo, classifier)
    vit = vit_times(cfg, sizes, data.images[:20], rounds=3)
    vit_ms = {k: statistics.median(v) for k, v in vit.items()}
    classifiers = {
        f"{LABEL[classifier]}": next((r / "classifier").glob("*/model.onnx")).read_bytes()
        for r, classifier in repos.values()
    }
    classifier_ms = {
        k: statistics.median(v)
        for k, v in network_times(classifiers, data.images[:20], rounds=3).items()
    }
    settings = PerfSettings(
        concurrency=args.concurrency, stability_percent=25, max_trials=8, request_count=64
    )
    served = {}
    for label, (repo, _) in repos.items():
        name = repo.parent.name
        with TritonServer(repo, on_free_ports(cfg.serve), work / name / "server") as server:
            spec = PipelineClient(server.grpc_url).all_specs[PIPELINE_BYTES]
            results = run_perf_analyzer(spec, server.grpc_url, "grpc", settings, photos)
            quality, meta = served_quality(data, server.grpc_url, concurrency=2)
        served[label] = {
            "perf": [
                {
                    "concurrency": r.concurrency,
                    "images_per_s": r.throughput,
                    "p50_ms": r.p50_ms,
                    "p95_ms": r.p95_ms,
                }
                for r in results
            ],
            "quality": quality.row(),
        }
    text = _report(cfg, vit_ms, served, len(data), root, classifier_ms)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantized.md").write_text(text)
    payload = {
        "vit_ms": vit_ms,
        "classifier_ms": classifier_ms,
        "served": served,
        "photos": str(root),
        "images": len(data),
    }
    (out / "quantized.json").write_text(json.dumps(payload, indent=1, default=float))
    return text


def _report(
    cfg, vit_ms: dict, served: dict, images: int, root: Path, classifier_ms: dict | None = None
) -> str:
    lines = [
        "# The default model's networks in int8, its saliency ViT on smaller images: speed "
        "and masks, side by side",
        "",
        f"Profile `{cfg.runs}`; photos: the {images} test photos of `{root}` (quality) and 16 "
        "of them sent as their files to `wsss_pipeline_bytes` over gRPC, every output asked "
        "for, no response cache (speed). One run, this machine.",
        "",
        "| ViT graph alone, in process, batch 1 | ms / image (median) |",
        "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in vit_ms.items()),
        "",
    ]
    if classifier_ms:
        lines += [
            "| classifier graph alone, in process, batch 1 | ms / image (median) |",
            "|---|---:|",
            *(f"| {k} | {v:.1f} |" for k, v in classifier_ms.items()),
            "",
        ]
    lines += [
        "| served ViT | concurrency | images/s | p50 ms | p95 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in served.items():
        for p in row["perf"]:
            lines.append(
                f"| {name} | {p['concurrency']} | {p['images_per_s']:.1f} | "
                f"{p['p50_ms']:.0f} | {p['p95_ms']:.0f} |"
            )
    lines += ["", "| served ViT | accuracy | pseudo-mask IoU | per image |", "|---|---:|---:|---:|"]
    for name, row in served.items():
        q = row["quality"]
        lines.append(
            f"| {name} | {q['accuracy']:.3f} | {q['pseudo_iou']:.3f} | "
            f"{q['pseudo_image_iou']:.3f} |"
        )
    base = vit_ms[BASELINE]
    vit_rate = 1e3 / base
    lines += [
        "",
        f"Ratios against the ViT as it came ({BASELINE}; the serving issue's targets: "
        "throughput >= 2.5x, p50 <= 0.6x):",
        "",
    ]
    for name, row in served.items():
        best = max(p["images_per_s"] for p in row["perf"])
        c1 = [p["p50_ms"] for p in row["perf"] if p["concurrency"] == 1]
        c1_text = f"{c1[0] / base:.2f}x" if c1 else "n/a"
        lines.append(
            f"- {name}: best throughput {best:.1f} images/s = "
            f"{best / vit_rate:.2f}x the {VIT_SIZE} px fp32 ViT's own rate in process, the file "
            f"as it came ({vit_rate:.1f}/s, default threads); p50 at concurrency 1 = "
            f"{c1_text} its time"
        )
    return "\n".join(lines) + "\n"
