"""``wsss bench --quantized``: a profile served with its saliency ViT in fp32 and in int8, side
by side in one run, on real photos (reports/bench/quantized.md).

Rows: the ViT graph alone in process (batch 1, the two graphs timed in alternating rounds so
that a busy machine slows both alike), then each repository served in turn by its own Triton
server: ``wsss_pipeline_bytes`` over gRPC with the photos sent as their files, throughput and
p50/p95 per concurrency (perf_analyzer), and the quality of its answers on the same photos
(``served_quality``). The ratios are the serving issue's targets: the best throughput against
the fp32 ViT's own rate, and p50 at concurrency 1 against the fp32 ViT's time.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.served_quality import served_quality
from benchmarks.serving import free_ports
from export.quantize import quantize_graph
from export.repository import build_if_missing, export_repository
from serving.client import PipelineClient
from serving.perf import PerfSettings, run_perf_analyzer
from serving.server import TritonServer
from training.data.dataset import WSSSDataset
from training.data.layouts import list_samples
from training.torch_refiners import saliency_model
from wsss.config import load_config, with_overrides
from wsss.served.classical import OnnxSaliency
from wsss.served.registry import RefinerSpec
from wsss.tensors import PIPELINE_BYTES

DEFAULT_PHOTOS = Path("../shared/data/oxford-pet-subset")
KINDS = ("none", "dynamic")  # fp32, int8


def vit_times(fp32: bytes, int8: bytes, images: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """ms per image of each graph at batch 1, alternating a round of each over ``images``:
    with ONNX Runtime's default threads (a thread per core: the targets' baseline) and with
    the one thread each served instance runs."""
    graphs = {
        f"{name}, {'default threads' if threads == 0 else '1 thread'}": OnnxSaliency(
            model, threads=threads
        )
        for threads in (0, 1)
        for name, model in (("fp32", fp32), ("int8", int8))
    }
    for graph in graphs.values():  # warm-up
        graph(images[:1])
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, graph in graphs.items():
            for image in images:
                t0 = time.perf_counter()
                graph(image[None])
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def quantized_report(args) -> str:
    cfg = load_config(args.config or "configs/serve.yaml", args.set)
    if RefinerSpec.of(cfg.export.refine or cfg.refine).entry.vit != "saliency":
        raise SystemExit(
            "wsss bench --quantized: the profile's served refiner runs no saliency ViT"
        )
    build_if_missing(cfg)  # the profile's checkpoints (nothing trained for make serve's)
    root = Path(args.images[0] if args.images else DEFAULT_PHOTOS)
    samples = list_samples(root, "pets", "test")
    data = WSSSDataset(root, "pets", "test", cfg.data.image_size, samples=samples)
    # The files as they are (a JPEG each), 16 spread over the list.
    photos = [s.image_path.read_bytes() for s in samples[:: max(1, len(samples) // 16)][:16]]
    out = Path(args.out or "reports/bench")
    # export/quantize.py: the same call export makes
    work = Path(".cache/bench/quantized")
    fp32 = saliency_model(cfg.refine).read_bytes()
    int8 = quantize_graph(fp32)
    vit = vit_times(fp32, int8, data.images[:20], rounds=3)
    vit_ms = {k: statistics.median(v) for k, v in vit.items()}
    settings = PerfSettings(
        concurrency=args.concurrency, stability_percent=25, max_trials=8, request_count=64
    )
    served = {}
    for kind in KINDS:
        repo = work / kind / "model_repository"
        variant = with_overrides(cfg, [f"export.repository={repo}", f"export.vit.quantize={kind}"])
        shutil.rmtree(repo, ignore_errors=True)  # this profile's models, exported now
        export_repository(variant)
        with TritonServer(repo, free_ports(cfg.serve), work / kind / "server") as server:
            spec = PipelineClient(server.grpc_url).all_specs[PIPELINE_BYTES]
            results = run_perf_analyzer(spec, server.grpc_url, "grpc", settings, photos)
            quality, meta = served_quality(data, server.grpc_url, concurrency=2)
        served[kind] = {
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
    text = _report(cfg, vit_ms, served, len(data), root)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantized.md").write_text(text)
    payload = {"vit_ms": vit_ms, "served": served, "photos": str(root), "images": len(data)}
    (out / "quantized.json").write_text(json.dumps(payload, indent=1, default=float))
    return text


def _report(cfg, vit_ms: dict, served: dict, images: int, root: Path) -> str:
    label = {"none": "fp32", "dynamic": "int8 (dynamic)"}
    lines = [
        "# The default model's saliency ViT in int8: speed and masks, side by side",
        "",
        f"Profile `{cfg.runs}`; photos: the {images} test photos of `{root}` (quality) and 16 "
        "of them sent as their files to `wsss_pipeline_bytes` over gRPC, every output asked "
        "for, no response cache (speed). One run, this machine.",
        "",
        "| ViT graph alone, in process, batch 1 | ms / image (median) |",
        "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in vit_ms.items()),
        "",
        "| served ViT | concurrency | images/s | p50 ms | p95 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, row in served.items():
        for p in row["perf"]:
            lines.append(
                f"| {label[kind]} | {p['concurrency']} | {p['images_per_s']:.1f} | "
                f"{p['p50_ms']:.0f} | {p['p95_ms']:.0f} |"
            )
    lines += ["", "| served ViT | accuracy | pseudo-mask IoU | per image |", "|---|---:|---:|---:|"]
    for kind, row in served.items():
        q = row["quality"]
        lines.append(
            f"| {label[kind]} | {q['accuracy']:.3f} | {q['pseudo_iou']:.3f} | "
            f"{q['pseudo_image_iou']:.3f} |"
        )
    base = vit_ms["fp32, default threads"]
    vit_rate = 1e3 / base
    lines += ["", "Ratios (the serving issue's targets: throughput >= 2.5x, p50 <= 0.6x):", ""]
    for kind, row in served.items():
        best = max(p["images_per_s"] for p in row["perf"])
        c1 = [p["p50_ms"] for p in row["perf"] if p["concurrency"] == 1]
        c1_text = f"{c1[0] / base:.2f}x" if c1 else "n/a"
        lines.append(
            f"- {label[kind]}: best throughput {best:.1f} images/s = "
            f"{best / vit_rate:.2f}x the fp32 ViT's own rate in process ({vit_rate:.1f}/s, "
            f"default threads); p50 at concurrency 1 = {c1_text} the fp32 ViT's time"
        )
    return "\n".join(lines) + "\n"
