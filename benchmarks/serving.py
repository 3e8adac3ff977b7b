"""`make bench`: the served ensembles against the same models in process, in one run.

Baselines and the server are measured side by side, so the ratios hold on a noisy machine
better than any absolute figure:

- eager PyTorch: ``training.pipeline.Pipeline`` (classifier, refiner, segmenter), batch 1;
- ONNX Runtime in process: the repository's own ONNX files (and its refiner: the same graph,
  or the same Python code the refiner model runs), batch 1, 4 and 8 - the compute limit;
- served: perf_analyzer against ``wsss_pipeline`` over gRPC and HTTP, with and without
  system shared memory, a concurrency sweep, and ``wsss_pipeline_bytes`` fed real benchmark
  images as base64 JSON.

Writes ``results.json``, ``results.csv``, ``throughput_latency.png`` and ``results.md`` into
``reports/bench/`` (``--out``) and prints the report.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.bench import BenchResult, PerfSettings, run_perf_analyzer
from serving.client import PipelineClient
from serving.server import TritonServer
from training.pipeline import pipeline_from_config
from training.studies import load_test_set
from wsss.config import Config, load_config
from wsss.served.images import resize_image
from wsss.tensors import (
    CAMS,
    CLASSIFIER,
    FEATURES,
    IMAGE,
    PIPELINE,
    PIPELINE_BYTES,
    REFINER,
    SCORES,
    SEGMENTER,
)


@dataclass
class Row:
    """One measured configuration: throughput (images/s) and latency per request (ms)."""

    what: str
    batch: int
    concurrency: int
    images_per_s: float
    p50_ms: float
    p95_ms: float
    stable: bool = True
    extra: dict = field(default_factory=dict)


def _time_calls(fn, batch: int, seconds: float) -> tuple[float, float, float]:
    """Call ``fn`` for about ``seconds`` after a warm-up: images/s, p50 and p95 ms per call."""
    for _ in range(3):
        fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 10:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    ms = sorted(t * 1e3 for t in times)
    return batch * len(times) / sum(times), statistics.median(ms), ms[int(0.95 * (len(ms) - 1))]


def _batches(images: np.ndarray, batch: int):
    k = 0
    while True:
        idx = [(k + i) % len(images) for i in range(batch)]
        k += batch
        yield np.ascontiguousarray(images[idx])


def eager_rows(cfg: Config, images: np.ndarray, seconds: float) -> list[Row]:
    pipe = pipeline_from_config(cfg)
    feed = _batches(images, 1)
    rate, p50, p95 = _time_calls(lambda: pipe(next(feed)), 1, seconds)
    return [Row("eager PyTorch pipeline (in process)", 1, 1, rate, p50, p95)]


class OrtPipeline:
    """The repository's newest ONNX files run in process, chained as the ensemble chains
    them; a Python refiner runs the same code as the served one (``training.refine``)."""

    def __init__(self, cfg: Config):
        repo = Path(cfg.export.repository)

        def session(name: str) -> ort.InferenceSession | None:
            folder = repo / name
            version = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
            path = folder / str(version) / "model.onnx"
            return ort.InferenceSession(str(path)) if path.exists() else None

        self.classifier, self.segmenter = session(CLASSIFIER), session(SEGMENTER)
        self.refiner_graph = session(REFINER)
        self.refiner = None
        if self.refiner_graph is None:
            from training.pipeline import refine_step

            self.refiner = refine_step(cfg)[1]
        if self.classifier is None or self.segmenter is None:
            raise SystemExit("make bench needs ONNX classifier and segmenter exports")

    def __call__(self, images: np.ndarray) -> None:
        names = [o.name for o in self.classifier.get_outputs()]
        out = dict(zip(names, self.classifier.run(None, {IMAGE: images}), strict=True))
        if self.refiner_graph is not None:
            wanted = {i.name for i in self.refiner_graph.get_inputs()}
            feeds = {IMAGE: images, **{k: v for k, v in out.items() if k in wanted}}
            self.refiner_graph.run(None, feeds)
        else:
            self.refiner(images, out[SCORES], out[CAMS], out.get(FEATURES))
        self.segmenter.run(None, {IMAGE: images})


def ort_rows(cfg: Config, images: np.ndarray, seconds: float) -> list[Row]:
    pipe = OrtPipeline(cfg)
    rows = []
    for batch in (1, 4, 8):
        feed = _batches(images, batch)
        rate, p50, p95 = _time_calls(lambda f=feed: pipe(next(f)), batch, seconds)
        rows.append(Row("ONNX Runtime pipeline (in process)", batch, 1, rate, p50, p95))
    return rows


def served_rows(
    server: TritonServer, images: np.ndarray, photos: list[np.ndarray], settings: PerfSettings
) -> list[Row]:
    client = PipelineClient(server.grpc_url)
    specs = client.all_specs
    client.close()
    runs = [
        ("served wsss_pipeline, gRPC", specs[PIPELINE], server.grpc_url, "grpc", "none", None),
        ("served wsss_pipeline, HTTP", specs[PIPELINE], server.http_url, "http", "none", None),
        (
            "served wsss_pipeline, gRPC + system shm",
            specs[PIPELINE],
            server.grpc_url,
            "grpc",
            "system",
            None,
        ),
        (
            "served wsss_pipeline_bytes (real images), gRPC",
            specs[PIPELINE_BYTES],
            server.grpc_url,
            "grpc",
            "none",
            photos,
        ),
    ]
    rows = []
    for what, spec, url, protocol, shm, data in runs:
        one = PerfSettings(**{**asdict(settings), "shared_memory": shm})
        sample = data if data is not None else list(images[:8])
        results: list[BenchResult] = run_perf_analyzer(spec, url, protocol, one, sample)
        rows += [
            Row(
                what,
                1,
                r.concurrency,
                r.throughput,
                r.p50_ms,
                r.p95_ms,
                r.stable,
                {"mean_ms": r.mean_ms},
            )
            for r in results
        ]
    return rows


def ratios(rows: list[Row]) -> dict[str, float]:
    """The issue's targets, each a ratio of figures measured in this run."""
    ort_ = [r for r in rows if r.what.startswith("ONNX Runtime")]
    eager = next(r for r in rows if r.what.startswith("eager"))
    grpc_ = [r for r in rows if r.what == "served wsss_pipeline, gRPC"]
    served = [r for r in rows if r.what.startswith("served wsss_pipeline,")]
    ort_b1 = next(r for r in ort_ if r.batch == 1)
    c1 = next(r for r in grpc_ if r.concurrency == 1)
    best_served = max(r.images_per_s for r in served)
    limit = max(r.images_per_s for r in ort_)
    return {
        "served p50 at concurrency 1 / in-process ONNX Runtime p50 (target <= 1.2)": (
            c1.p50_ms / ort_b1.p50_ms
        ),
        "served best throughput / compute limit (target >= 0.9)": best_served / limit,
        "served best throughput / eager PyTorch (target >= 2)": best_served / eager.images_per_s,
    }


def report(rows: list[Row], r: dict[str, float], cfg: Config, command: str) -> str:
    lines = [
        "# Serving benchmark",
        "",
        f"Made by `{command}` on {platform.machine()} ({_cpu()}), "
        f"{cfg.data.image_size} px, refiner `{_refiner(cfg)}`; one run, all rows side by side.",
        "",
        "| ratio | measured |",
        "|---|---:|",
        *(f"| {k} | {v:.2f} |" for k, v in r.items()),
        "",
        "| configuration | batch | concurrency | images/s | p50 ms | p95 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        flag = "" if row.stable else " (unstable)"
        p50 = f"{row.p50_ms:.1f}" if row.stable else f"mean {row.extra['mean_ms']:.1f}"
        p95 = f"{row.p95_ms:.1f}" if row.stable else "-"
        lines.append(
            f"| {row.what}{flag} | {row.batch} | {row.concurrency} | {row.images_per_s:.1f} | "
            f"{p50} | {p95} |"
        )
    lines += ["", "![throughput against p95 latency](throughput_latency.png)", ""]
    return "\n".join(lines)


def _refiner(cfg: Config) -> str:
    extra = "+grabcut" if cfg.refine.grabcut else "+chanvese" if cfg.refine.chanvese else ""
    return cfg.refine.method + extra


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                import os

                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for what in dict.fromkeys(r.what for r in rows):
        pts = [r for r in rows if r.what == what and r.stable]
        if pts:
            ax.plot([r.p95_ms for r in pts], [r.images_per_s for r in pts], "o-", label=what)
    ax.set_xlabel("p95 latency per request (ms)")
    ax.set_ylabel("images / s")
    ax.set_title("throughput against p95 latency (labels: batch or concurrency sweep)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default="reports/bench")
    parser.add_argument("--concurrency", default="1:4:1")
    parser.add_argument("--seconds", type=float, default=5.0, help="per in-process row")
    args = parser.parse_args(argv)
    from wsss.cli import ensure_built

    cfg = load_config(args.config, args.set)
    ensure_built(cfg)
    data = load_test_set(cfg)
    size = (cfg.data.image_size, cfg.data.image_size)
    photos = [np.asarray(img) for img in data.images[:8]]
    images = np.stack([resize_image(p, size) for p in photos])
    rows = eager_rows(cfg, images, args.seconds) + ort_rows(cfg, images, args.seconds)
    workdir = Path(".cache/bench")
    with TritonServer(Path(cfg.export.repository), cfg.serve, workdir / "server") as server:
        settings = PerfSettings(
            concurrency=args.concurrency, stability_percent=25, max_trials=8, request_count=64
        )
        rows += served_rows(server, images, photos, settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r = ratios(rows)
    (out / "results.json").write_text(
        json.dumps({"ratios": r, "rows": [asdict(x) for x in rows]}, indent=2)
    )
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["what", "batch", "concurrency", "images_per_s", "p50_ms", "p95_ms", "stable"]
        )
        for x in rows:
            writer.writerow(
                [
                    x.what,
                    x.batch,
                    x.concurrency,
                    f"{x.images_per_s:.2f}",
                    f"{x.p50_ms:.2f}",
                    f"{x.p95_ms:.2f}",
                    x.stable,
                ]
            )
    plot(rows, out / "throughput_latency.png")
    text = report(rows, r, cfg, "make bench")
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
