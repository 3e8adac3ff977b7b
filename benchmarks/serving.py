"""`make bench`: the served ensembles against the same models in process, in one run.

Baselines and the server are measured side by side, so the ratios hold on a noisy machine
better than any absolute figure:

- eager PyTorch: ``training.pipeline.Pipeline`` (classifier, refiner, segmenter), batch 1;
- ONNX Runtime in process: the repository's own ONNX files (and its refiner: the same graph,
  or the same Python code the refiner model runs), batch 1, 4 and 8, with ONNX Runtime's
  default threads and with one thread per session - the best of them is the compute limit;
- served: perf_analyzer against ``wsss_pipeline`` over gRPC and HTTP, with and without
  system shared memory, a concurrency sweep and batch sizes, and ``wsss_pipeline_bytes`` fed
  real benchmark images as base64 JSON; Triton's per-model statistics say where each
  request's time went (queue, inputs, model, outputs) and what batches formed;
- the refiners, per image in process (paper 003's Table 3: FNO level set, GrabCut,
  Chan-Vese at 1/5/10/15/50 iterations, Otsu; ``benchmarks.refiner_speed``).

``--sweep`` exports the repository once per serving setting (ONNX Runtime threads, queue
delay, instances) and measures each served, in one run: the evidence for the defaults
(``reports/bench/tuning.md``).

Writes ``results.json``, ``results.csv``, ``throughput_latency.png`` and ``results.md`` into
``reports/bench/`` (``--out``) and prints the report. Everything is measured on the machine
it runs on; the report names it (CPU or GPU, never mixed).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import platform
import shutil
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from benchmarks import SHARED_PETS
from export.check import versions
from export.configs import parse
from serving.client import PipelineClient
from serving.perf import (
    BenchResult,
    PerfSettings,
    concurrency_levels,
    run_perf_analyzer,
    settled_statistics,
    statistics_delta,
)
from serving.server import TritonServer, has_gpu, on_free_ports, processes
from wsss.config import Config, load_config, served_config, with_overrides
from wsss.served.images import decode_resized, resize_mask
from wsss.served.registry import LEVELSET, RefinerSpec
from wsss.tensors import (
    CAMS,
    CHAINS,
    CLASSIFIER,
    FEATURES,
    IMAGE,
    PIPELINE,
    PIPELINE_BYTES,
    POSTPROCESS,
    PSEUDO_MASK,
    REFINER,
    SCORES,
    SEGMENTATION,
    SEGMENTER,
    VIT,
)

EAGER = "eager PyTorch pipeline (in process)"
FROM_FILES = ", from the photos' files: decoded and resized as served"
FP32_VIT = ", the ViT in fp32 as export writes it unquantized"
# The pair of in-process pipelines measured again once the server has stopped: the host's
# speed over the run, as the in-process rows see it (a shared machine's pair ran a sixth
# slower in one run than in another half an hour before; noise within the served window
# alone does not show here).
AFTER = ", again after the served rows"
HOST_SPEED = (
    "in-process pair after the served rows / before them (the host's speed over the run; no target)"
)
DRIFT = 0.05  # further from 1 than this: the report says the ratios above moved with it
ORT = "ONNX Runtime pipeline (in process"  # + ", N threads)"
PAIR = "in parallel, 1 thread each"  # one pipeline per core: "{ORT}, {cores} {PAIR}..."
SERVED = "served wsss_pipeline"


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
    extra: dict = field(default_factory=dict)  # mean_ms; models: Triton's per-model times


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
    """``cfg`` as served (``served_config``): the refiner the repository runs."""
    from training.pipeline import pipeline_from_config  # torch: only where rows are timed

    pipe = pipeline_from_config(cfg)
    feed = _batches(images, 1)
    rate, p50, p95 = _time_calls(lambda: pipe(next(feed)), 1, seconds)
    return [Row(EAGER, 1, 1, rate, p50, p95)]


class OrtPipeline:
    """The repository's newest ONNX files run in process, chained as the ensemble chains
    them; a Python refiner runs the same code as the served one. ``threads``: ONNX
    Runtime's intra-op threads per session (0: its default, one per core)."""

    def __init__(self, cfg: Config, threads: int = 0, vit: bytes | None = None):
        repo = Path(cfg.export.repository)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads

        def session(name: str) -> ort.InferenceSession | None:
            folder = repo / name
            if not folder.is_dir():
                return None
            path = folder / str(versions(folder)[-1]) / "model.onnx"
            if not path.exists():
                return None
            return ort.InferenceSession(str(path), options, providers=_providers())

        self.classifier, self.segmenter = session(CLASSIFIER), session(SEGMENTER)
        self.refiner_graph = session(REFINER)
        # The saliency, attention or tokens ViT, where the refiner reads one; ``vit``: another
        # form of it (the fp32 graph where the repository serves int8: ``fp32_vit``).
        self.vit = session(VIT)
        if vit is not None:
            self.vit = ort.InferenceSession(vit, options, providers=_providers())
        self.refiner = served_refiner(repo) if self.refiner_graph is None else None
        if self.classifier is None or self.segmenter is None:
            raise SystemExit("make bench needs ONNX classifier and segmenter exports")
        # Read once, not in the timed calls.
        self.scored = [o.name for o in self.classifier.get_outputs()]
        (self.read,) = (i.name for i in self.segmenter.get_inputs())
        self.masked = [o.name for o in self.segmenter.get_outputs()].index(SEGMENTATION)
        # What postprocess reads for SEGMENTATION in the served bytes chain: PSEUDO_MASK where
        # the chain skips a pass-through segmenter (wsss.tensors.ensemble_aliases); an export
        # from before the chains stepped through it.
        chain = repo / CHAINS[PIPELINE_BYTES] / "config.pbtxt"
        steps = parse(chain.read_text()).ensemble_scheduling.step if chain.exists() else []
        post = next((s for s in steps if s.model_name == POSTPROCESS), None)
        self.bytes_reads = post.input_map[SEGMENTATION] if post is not None else SEGMENTATION
        self.wanted = (
            set()
            if self.refiner_graph is None
            else {i.name for i in self.refiner_graph.get_inputs()}
        )

    def __call__(self, images: np.ndarray, bytes_chain: bool = False) -> tuple[np.ndarray, ...]:
        """The PSEUDO_MASK and SEGMENTATION of ``images`` [B, H, W, 3] uint8. ``bytes_chain``:
        as the bytes ensemble's chain runs it, which skips a pass-through segmenter
        (``wsss.tensors.ensemble_aliases``)."""
        out = dict(zip(self.scored, self.classifier.run(None, {IMAGE: images}), strict=True))
        if self.refiner_graph is not None:
            feeds = {IMAGE: images, **{k: v for k, v in out.items() if k in self.wanted}}
            (pseudo,) = self.refiner_graph.run(None, feeds)
        else:
            maps = self.vit.run(None, {IMAGE: images})[0] if self.vit is not None else None
            pseudo = self.refiner(images, out[SCORES], out[CAMS], out.get(FEATURES), maps)
        # A trained segmenter reads the pixels, the pass-through one the refined mask.
        if bytes_chain and self.bytes_reads == PSEUDO_MASK:
            return pseudo, pseudo
        feed = {IMAGE: images, PSEUDO_MASK: pseudo}[self.read]
        return pseudo, self.segmenter.run(None, {self.read: feed})[self.masked]


def served_refiner(repo: Path):
    """The repository's Python refiner, built in process as the served model builds itself:
    from its config.pbtxt's settings. It runs no network: the ViT model's maps are given to
    it (``OrtPipeline``). An export from before the ViT was its own model kept the ViT in the
    refiner's version folder: that is run as it was served."""
    from wsss.served.classical import OnnxAttention, OnnxSaliency
    from wsss.served.refiners import build_classical

    folder = repo / REFINER
    config = parse((folder / "config.pbtxt").read_text())
    params = {k: v.string_value for k, v in config.parameters.items()}
    settings = json.loads(params["refine"])
    version = folder / str(versions(folder)[-1])
    runners = {"attention": OnnxAttention, "saliency": OnnxSaliency}
    old = settings.pop("runners", {})
    built = {role: runners[role](version / name) for role, name in old.items()}
    return build_classical(settings, params["multi_label"] == "true", **built)


def _providers() -> list[str]:
    """CUDA where a GPU is present (the served models then run on it too), else the CPU."""
    if has_gpu() and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_rows(
    cfg: Config,
    images: np.ndarray,
    seconds: float,
    batches: tuple[int, ...] = (1, 4, 8),
    threads: tuple[int, ...] = (0, 1),
    vit: bytes | None = None,
) -> list[Row]:
    """The pipeline in one process, per thread setting and batch size; ``vit``: with that
    ViT graph instead of the repository's (``FP32_VIT`` in the label)."""
    rows = []
    form = FP32_VIT if vit is not None else ""
    for n in threads:
        pipe = OrtPipeline(cfg, n, vit)
        label = f"{ORT}, {'default' if n == 0 else n} thread{'s' if n != 1 else ''}{form})"
        for batch in batches:
            feed = _batches(images, batch)
            rate, p50, p95 = _time_calls(lambda f=feed, p=pipe: p(next(f)), batch, seconds)
            rows.append(Row(label, batch, 1, rate, p50, p95))
    return rows


def _loop(pipe, feed, stop: threading.Event, out: list[float], least: int = 3) -> None:
    """Call ``pipe`` on ``feed`` until ``stop`` and at least ``least`` times, after a warm-up
    call; seconds per call to out (a slow profile's batch may outlast the window)."""
    pipe(next(feed))
    while len(out) < least or not stop.is_set():
        t0 = time.perf_counter()
        pipe(next(feed))
        out.append(time.perf_counter() - t0)


def _from_files(pipe: OrtPipeline, size: int):
    """``pipe`` fed one photo's file at a time, decoded and resized as the bytes ensemble's
    preprocess model does it, its masks brought back to the photo's size as its postprocess
    model does (``wsss.served.images``): the in-process twin of ``wsss_pipeline_bytes``."""

    def run(blob: bytes) -> None:
        pixels, shape = decode_resized(blob, (size, size))
        masks = pipe(pixels[None], bytes_chain=True)
        for mask in masks:
            resize_mask(mask[0], shape)

    return run


def parallel_rows(
    cfg: Config,
    images: np.ndarray,
    seconds: float,
    batches: tuple[int, ...] = (1, 8),
    blobs: list[bytes] | None = None,
    vit: bytes | None = None,
    after: bool = False,
) -> list[Row]:
    """One single-threaded pipeline per core, all running at once: every core busy with no
    serving in between, the most these models compute on this machine. ONNX Runtime
    releases the GIL, so the threads run in parallel. With ``blobs`` (photos' files), one
    more row at batch 1: each pipeline decodes and resizes a file before it runs, as the
    bytes ensemble does (``FROM_FILES``). ``vit``: as ``ort_rows``. ``after``: the rows
    measured again once the served ones are done (``AFTER``)."""
    workers = os.cpu_count() or 1
    pipes = [OrtPipeline(cfg, 1, vit) for _ in range(workers)]
    form = FP32_VIT if vit is not None else ""
    rows = []
    plan = [(batch, False) for batch in batches] + ([(1, True)] if blobs else [])
    for batch, files in plan:
        stop, times = threading.Event(), [[] for _ in pipes]
        size = cfg.data.image_size
        runs = [_from_files(pipe, size) if files else pipe for pipe in pipes]
        feeds = [itertools.cycle(blobs) if files else _batches(images, batch) for _ in pipes]
        threads = [
            threading.Thread(target=_loop, args=(run, feed, stop, out))
            for run, feed, out in zip(runs, feeds, times, strict=True)
        ]
        for t in threads:
            t.start()
        stop.wait(seconds)
        stop.set()
        for t in threads:
            t.join()
        ms = sorted(x * 1e3 for out in times for x in out)
        rate = sum(batch * len(out) / sum(out) for out in times if out)
        p50, p95 = statistics.median(ms), ms[int(0.95 * (len(ms) - 1))]
        when = AFTER if after else ""
        label = f"{ORT}, {workers} {PAIR}{form}{FROM_FILES if files else ''}{when})"
        rows.append(Row(label, batch, workers, rate, p50, p95))
    return rows


@dataclass(frozen=True)
class ServerRun:
    what: str
    model: str
    protocol: str
    shared_memory: str = "none"
    real_images: bool = False  # the bytes ensemble gets encoded benchmark photos


SERVED_RUNS = (
    ServerRun(f"{SERVED}, gRPC", PIPELINE, "grpc"),
    ServerRun(f"{SERVED}, HTTP", PIPELINE, "http"),
    ServerRun(f"{SERVED}, gRPC + system shm", PIPELINE, "grpc", "system"),
    ServerRun(
        "served wsss_pipeline_bytes (real images), gRPC", PIPELINE_BYTES, "grpc", "none", True
    ),
)


def served_rows(
    server: TritonServer,
    images: np.ndarray,
    photos: list[np.ndarray],
    settings: PerfSettings,
    batches: tuple[int, ...] = (),
    runs: tuple[ServerRun, ...] = SERVED_RUNS,
) -> list[Row]:
    """Every run at every concurrency level of ``settings``, then ``wsss_pipeline`` over gRPC
    at each of ``batches`` (concurrency 1), each with Triton's per-model statistics."""
    client = PipelineClient(server.grpc_url)
    specs = client.all_specs
    client.close()
    plan = [(run, level, 1) for run in runs for level in concurrency_levels(settings.concurrency)]
    plan += [(runs[0], 1, b) for b in batches]
    rows = []
    for run, level, batch in plan:
        url = server.grpc_url if run.protocol == "grpc" else server.http_url
        # Windows of about as many images as at batch 1: a 320 px DeepLabV3 profile's 64
        # requests of 8 images ran past perf_analyzer's 10 minutes.
        count = max(8, settings.request_count // batch) if settings.request_count else 0
        one = dataclasses.replace(
            settings,
            batch=batch,
            concurrency=str(level),
            shared_memory=run.shared_memory,
            request_count=count,
        )
        sample = photos if run.real_images else list(images[:8])
        before = settled_statistics(server.grpc_url)
        (result,) = run_perf_analyzer(specs[run.model], url, run.protocol, one, sample)
        models = statistics_delta(before, settled_statistics(server.grpc_url))
        rows.append(_row(run.what, batch, result, models))
    return rows


OUTPUT_SETS = {
    "every output": None,
    "SCORES + SEGMENTATION": (SCORES, SEGMENTATION),
    "SEGMENTATION only": (SEGMENTATION,),
}


def output_rows(server: TritonServer, images: np.ndarray, seconds: float) -> list[Row]:
    """One gRPC client at a time asking for each set of outputs: the ensemble runs its whole
    chain (wsss.tensors.CHAINS) and sends only those (CAMS alone is K x H x W floats)."""
    client = PipelineClient(server.grpc_url)
    rows = []
    try:
        for name, outputs in OUTPUT_SETS.items():
            feed = _batches(images, 1)
            rate, p50, p95 = _time_calls(
                lambda o=outputs, f=feed: client.infer(next(f), o), 1, seconds
            )
            rows.append(Row(f"{SERVED}, gRPC client asking for {name}", 1, 1, rate, p50, p95))
    finally:
        client.close()
    return rows


def _cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (what it is, CPU seconds so far): tritonserver, each model's stub, the rest."""
    found = {}
    for proc in processes():
        stub = proc.stub_of()
        name = f"{stub[0]} (Python stub)" if stub else proc.name
        found[proc.pid] = (name, proc.cpu_seconds)
    return found


@dataclass
class CpuShare:
    """CPU milliseconds per served image of each process (``cpu_per_image``), and the
    window they were measured over: its images per second and how many cores its
    processes kept busy. A window that served slowly with every core busy was disturbed
    (a make bench run once gave the ViT's stubs 61 ms a photo where a rerun gave 38)."""

    per_image: dict[str, float]
    seconds: float
    images_per_s: float
    cores_busy: float


def cpu_per_image(server: TritonServer, images: np.ndarray, settings: PerfSettings) -> CpuShare:
    """CPU milliseconds per image of every process that worked during one perf_analyzer run
    of ``wsss_pipeline`` over gRPC: where the cores go, the load generator included (it
    shares this machine's cores with the server)."""
    client = PipelineClient(server.grpc_url)
    spec = client.all_specs[PIPELINE]
    client.close()
    first, seen, done = _cpu_seconds(), {}, threading.Event()

    def sample() -> None:  # until perf_analyzer is done, so its own time is seen before exit
        while not done.is_set():
            seen.update(_cpu_seconds())
            done.wait(0.1)

    sampler = threading.Thread(target=sample)
    before = settled_statistics(server.grpc_url)
    started = time.perf_counter()
    sampler.start()
    try:
        run_perf_analyzer(spec, server.grpc_url, "grpc", settings, list(images[:8]))
    finally:
        done.set()
        sampler.join()
    seconds = time.perf_counter() - started
    served = statistics_delta(before, settled_statistics(server.grpc_url))[PIPELINE]
    images_done = served.requests * settings.batch
    out: dict[str, float] = {}
    for pid, (name, t) in seen.items():
        spent = t - first.get(pid, (name, 0.0))[1]
        if spent > 0:
            key = name if ("stub" in name or name in ("tritonserver", "perf_analyzer")) else "other"
            out[key] = out.get(key, 0.0) + 1e3 * spent / images_done
    per_image = dict(sorted(out.items(), key=lambda kv: -kv[1]))
    rate = images_done / seconds
    return CpuShare(per_image, seconds, rate, sum(per_image.values()) * rate / 1e3)


def _row(what: str, batch: int, r: BenchResult, models: dict) -> Row:
    extra = {"mean_ms": r.mean_ms, "models": {k: asdict(v) for k, v in models.items()}}
    return Row(what, batch, r.concurrency, r.throughput, r.p50_ms, r.p95_ms, r.stable, extra)


def ratios(rows: list[Row]) -> dict[str, float]:
    """The serving targets, each a ratio of figures measured in this run.

    The compute limit is the best in-process ONNX Runtime pipeline over the batch sizes and
    thread settings measured; the latency reference is its best batch-1 median. Beside it,
    a stricter limit with no target: one pipeline per core, all at once, with no server,
    no client and no copies between them on the same cores.
    """
    # The served graphs' own rows: the fp32 ViT's rows are a form the server does not serve.
    in_process = [r for r in rows if r.what.startswith(ORT) and FP32_VIT not in r.what]
    single = [r for r in in_process if r.concurrency == 1]  # one pipeline at a time
    eager = next(r for r in rows if r.what == EAGER)
    tensor_in = {run.what for run in SERVED_RUNS if run.model == PIPELINE}  # perf_analyzer's
    served = [r for r in rows if r.what in tensor_in]
    c1 = next(r for r in served if r.what == f"{SERVED}, gRPC" and r.concurrency == r.batch == 1)
    best_p50 = min(r.p50_ms for r in single if r.batch == 1)
    best_served = max(r.images_per_s for r in served)
    out = {
        "served p50 at concurrency 1 / in-process ONNX Runtime p50 (target <= 1.2)": (
            c1.p50_ms / best_p50
        ),
        "served best throughput / in-process ONNX Runtime at its best batch size "
        "(target >= 0.9)": best_served / max(r.images_per_s for r in single),
        "served best throughput / eager PyTorch (target >= 2)": best_served / eager.images_per_s,
    }
    every_core = [r for r in in_process if r.concurrency > 1 and FROM_FILES not in r.what]
    if every_core:  # the stricter limit: every core computing, nothing serving or sending
        out["served best throughput / one in-process pipeline per core, all at once"] = (
            best_served / max(r.images_per_s for r in every_core)
        )
    # The host's own speed over the run: each pair measured before the server started and
    # again after it stopped (both count in the limits above), the one that moved most.
    moved = []
    for files in (False, True):
        pairs = [
            r
            for r in in_process
            if PAIR in r.what and r.batch == 1 and (FROM_FILES in r.what) == files
        ]
        before = [r for r in pairs if AFTER not in r.what]
        again = [r for r in pairs if AFTER in r.what]
        if before and again:
            moved.append(again[0].images_per_s / before[0].images_per_s)
    if moved:
        out[HOST_SPEED] = max(moved, key=lambda m: abs(m - 1))
    # The serving issue's target is on the bytes ensemble (the photos' files): against the
    # best in-process row (which is given decoded images), and against its in-process twin
    # that decodes the same files, each pipeline on its own core.
    sent = [r for r in rows if r.what == BYTES_RUN.what]
    files = [r for r in in_process if FROM_FILES in r.what]
    if sent:
        best_bytes = max(r.images_per_s for r in sent)
        out[
            "served bytes ensemble (the files) best throughput / the best in-process row "
            "(target >= 0.9)"
        ] = best_bytes / max(r.images_per_s for r in in_process)
        if files:
            out[
                "served bytes ensemble best throughput / one in-process pipeline per core "
                "decoding the same files"
            ] = best_bytes / max(r.images_per_s for r in files)
    return out


def time_table(rows: list[Row]) -> list[str]:
    """Triton's per-model statistics for gRPC at concurrency 1 and at the best level."""
    grpc_ = [r for r in rows if r.what == f"{SERVED}, gRPC" and r.batch == 1 and r.extra]
    if not grpc_:
        return []
    best = max(grpc_, key=lambda r: r.images_per_s)
    lines = [
        "| where | model | requests | mean batch | queue us | inputs us | model us | outputs us |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in [grpc_[0]] + ([best] if best is not grpc_[0] else []):
        for name, t in row.extra["models"].items():
            lines.append(
                f"| gRPC, concurrency {row.concurrency} | {name} | {t['requests']} | "
                f"{t['mean_batch']:.2f} | {t['queue_us']:.0f} | {t['compute_input_us']:.0f} | "
                f"{t['compute_infer_us']:.0f} | {t['compute_output_us']:.0f} |"
            )
    return lines


def best_grpc(rows: list[Row]) -> Row:
    """The concurrency level at which ``wsss_pipeline`` over gRPC (batch 1) served most."""
    grpc_ = [r for r in rows if r.what == f"{SERVED}, gRPC" and r.batch == 1]
    return max(grpc_, key=lambda r: r.images_per_s)


def cpu_table(cpu: CpuShare | None, concurrency: str) -> list[str]:
    if not cpu:
        return []
    lines = [
        f"CPU time per served image, by process (`wsss_pipeline` over gRPC at concurrency "
        f"{concurrency}; `other` is the rest of the machine, this benchmark's own Python "
        "included):",
        "",
        "| process | CPU ms / image |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in cpu.per_image.items()]
    lines.append(f"| all | {sum(cpu.per_image.values()):.2f} |")
    return lines + [
        "",
        f"Over that window ({cpu.seconds:.0f} s, perf_analyzer's start included): "
        f"{cpu.images_per_s:.1f} images/s, the processes above busy for {cpu.cores_busy:.2f} "
        f"of the machine's {os.cpu_count() or 1} cores. Every core busy at a rate well "
        f"below the gRPC row's at concurrency {concurrency} above means something else ran "
        "in that window: measure again.",
    ]


def report(
    rows: list[Row],
    r: dict[str, float],
    cfg: Config,
    command: str,
    refiners: dict | None = None,
    cpu: CpuShare | None = None,
    photos: str = "",
    untrained: bool = False,
) -> str:
    served = served_config(cfg)
    sent = f" Photos: {photos}, the bytes ensemble gets their files." if photos else ""
    lines = [
        "# Serving benchmark",
        "",
        f"Made by `{command}` on {machine()}, profile `{cfg.runs}`"
        + (" (its networks untrained: a network's speed is not its weights')" if untrained else "")
        + f", {cfg.data.image_size} px, "
        f"served refiner `{refiner_label(served)}` (training pseudo-masks: "
        f"`{refiner_label(cfg)}`); one run, all rows side by side.{sent}",
        "",
        "| ratio | measured |",
        "|---|---:|",
        *(f"| {k} | {v:.2f} |" for k, v in r.items()),
        *_drift_note(r),
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
    table = time_table(rows)
    if table:
        lines += ["", "Where a served request's time goes (Triton's per-model statistics):", ""]
        lines += table
    best = best_grpc(rows)
    if cpu:
        lines += ["", *cpu_table(cpu, str(best.concurrency))]
    if refiners:
        from benchmarks.refiner_speed import speed_table

        lines += ["", "Refiners, in process:", "", speed_table(refiners)]
    lines += ["", "![throughput against p95 latency](throughput_latency.png)", ""]
    return "\n".join(lines)


def _drift_note(r: dict[str, float]) -> list[str]:
    """A line under the ratios where the machine's speed moved over the run: each limit is
    the faster of the two in-process measurements, and the served rows came in between."""
    speed = r.get(HOST_SPEED)
    if speed is None or abs(speed - 1) <= DRIFT:
        return []
    return [
        "",
        f"The in-process pair ran at {speed:.2f}x its first rate once the server had "
        "stopped: this machine's speed moved during the run (other work on its cores), so "
        "the served rows, measured in between, compare with either limit only roughly. "
        "Measure again on a quieter machine. (A steady pair does not rule out noise within "
        "the served rows alone.)",
    ]


def refiner_label(cfg: Config) -> str:
    return str(RefinerSpec.of(cfg.refine))


def machine() -> str:
    """The hardware the figures belong to: the GPU when one is used, else the CPU."""
    if has_gpu():
        import subprocess

        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"GPU {gpu}"
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()} CPU ({cpu}, {os.cpu_count()} cores)"


def plot(rows: list[Row], path: Path) -> None:
    """One line per configuration: served ones across concurrency levels, in-process ones
    across batch sizes, and the served batch sizes as a line of their own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series: dict[str, list[Row]] = {}
    for r in rows:
        if r.stable:
            batched = r.what.startswith(SERVED) and r.batch > 1
            series.setdefault(f"{r.what}, batch > 1" if batched else r.what, []).append(r)
    fig, ax = plt.subplots(figsize=(9, 7.5))
    colours = plt.cm.tab20.colors
    for k, (label, pts) in enumerate(series.items()):
        ax.plot(
            [r.p95_ms for r in pts],
            [r.images_per_s for r in pts],
            "os^D"[k % 4] + "-",
            color=colours[(2 * k) % 20 + (k // 10) % 2],
            label=label,
        )
    ax.set_xscale("log")
    p95 = [r.p95_ms for r in rows if r.stable]
    ticks = [
        t
        for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
        if min(p95) / 2 <= t <= 2 * max(p95)
    ]
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("p95 latency per request (ms, log)")
    ax.set_ylabel("images / s")
    ax.set_title("throughput against p95 latency (points: concurrency or batch size)")
    # Below the axes: beside them, the long labels left the axes (and the title) too narrow.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write(
    rows: list[Row],
    r: dict,
    out: Path,
    text: str,
    refiners: dict | None,
    cpu: CpuShare | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "ratios": r,
        "rows": [asdict(x) for x in rows],
        "refiners": refiners,
        "cpu_ms_per_image": cpu.per_image if cpu else None,
        "cpu_window": ({k: v for k, v in asdict(cpu).items() if k != "per_image"} if cpu else None),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["what", "batch", "concurrency", "images_per_s", "p50_ms", "p95_ms", "stable"]
        )
        for x in rows:
            writer.writerow(
                [x.what, x.batch, x.concurrency]
                + [f"{v:.2f}" for v in (x.images_per_s, x.p50_ms, x.p95_ms)]
                + [x.stable]
            )
    plot(rows, out / "throughput_latency.png")
    (out / "results.md").write_text(text)


def ensure_levelset(cfg: Config) -> Config:
    """The config whose run holds a trained level set, training one if missing: the refiner
    table needs it (``make bench`` runs from a fresh clone)."""
    from training import stages

    refine = cfg.refine.only("levelset")
    cfg = dataclasses.replace(cfg, refine=refine)
    if not (Path(cfg.runs) / LEVELSET.checkpoint).exists():
        stages.run(cfg, ("levelset",))
    return cfg


@dataclass(frozen=True)
class Setting:
    """One serving setting of the sweep, every model's, explicit whatever the config says:
    instances and ONNX Runtime threads of the networks (classifier and segmenter), of the
    ViT (where the profile serves one) and the refiner's instances, and the batching delay
    of them all."""

    threads: int  # ONNX Runtime intra-op threads per session (0: one per core)
    delay_us: int  # dynamic batcher queue delay, every model
    instances: int  # of the classifier and the segmenter
    refiner: int = 1  # instances of the refiner
    vit: int = 1  # instances of the ViT
    vit_threads: int = 1  # the ViT's intra-op threads
    accelerator: str = "none"  # on a GPU: cuda or tensorrt (instances on the GPU)

    def overrides(self) -> list[str]:
        out = []
        models = {
            "classifier": (self.instances, self.threads),
            "segmenter": (self.instances, self.threads),
            "refiner": (self.refiner, self.threads),
            "vit": (self.vit, self.vit_threads),
        }
        for model, (instances, threads) in models.items():
            out += [
                f"export.{model}.onnxruntime.intra_op_threads={threads}",
                f"export.{model}.max_queue_delay_us={self.delay_us}",
                f"export.{model}.instances={instances}",
            ]
            if self.accelerator != "none":
                out += [
                    f"export.{model}.kind=KIND_GPU",
                    f"export.{model}.onnxruntime.gpu_accelerator={self.accelerator}",
                ]
        return out

    @property
    def label(self) -> str:
        def threads(n: int) -> str:
            return "default threads" if n == 0 else f"{n} thread" + ("s" if n > 1 else "")

        label = (
            f"networks {self.instances} x {threads(self.threads)}, refiner {self.refiner}, "
            f"ViT {self.vit} x {threads(self.vit_threads)}, {self.delay_us} us queue delay"
        )
        return label if self.accelerator == "none" else f"{self.accelerator}, {label}"


CPU_SWEEP = (
    Setting(0, 500, 1, 1, 1, 0),  # ONNX Runtime's and Triton's usual defaults
    Setting(1, 0, 2, 2, 2, 1),  # the shipped defaults before the first sweep (wsss/config.py)
    Setting(1, 0, 2, 1, 2, 1),  # configs/serve.yaml's choice of that sweep
    Setting(1, 500, 2, 1, 2, 1),
    Setting(1, 0, 1, 1, 1, 1),
    Setting(1, 0, 1, 1, 1, 2),
    Setting(1, 0, 2, 1, 1, 2),
    Setting(1, 0, 2, 1, 2, 2),
)
GPU_SWEEP = tuple(
    Setting(0, delay, n, n, n, 0, acc)
    for acc in ("cuda", "tensorrt")
    for delay in (0, 500)
    for n in (1, 2)
)
BYTES_RUN = SERVED_RUNS[3]  # the targets' ensemble: real photos' files, gRPC


def sweep(cfg: Config, blobs: list[bytes], settings: PerfSettings, out: Path, command: str) -> str:
    """Export once per SWEEP setting, serve each and measure the bytes ensemble over gRPC
    (the photos' files) over the concurrency range: which serving settings measure best on
    this machine, and so which the profile ships."""
    from export.repository import export_repository

    results = {}
    base = Path(".cache/bench/sweep")
    for setting in tqdm(GPU_SWEEP if has_gpu() else CPU_SWEEP, desc="sweep", unit="setting"):
        name = setting.label
        slug = "_".join(str(v) for v in dataclasses.astuple(setting))
        repo = base / slug / "repository"
        variant = with_overrides(cfg, setting.overrides() + [f"export.repository={repo}"])
        shutil.rmtree(repo, ignore_errors=True)
        export_repository(variant)
        with TritonServer(repo, on_free_ports(variant.serve), base / slug / "server") as server:
            rows = served_rows(server, np.zeros((0,)), blobs, settings, runs=(BYTES_RUN,))
        results[name] = [asdict(r) for r in rows]
        shutil.rmtree(repo, ignore_errors=True)
    best = max(results, key=lambda n: max(r["images_per_s"] for r in results[n]))
    lines = [
        "# Serving settings, measured side by side",
        "",
        f"Made by `{command}` on {machine()}, {cfg.data.image_size} "
        f"px, served refiner `{refiner_label(served_config(cfg))}`; `wsss_pipeline_bytes` over "
        f"gRPC, {len(blobs)} real photos sent as their files, every output, one run. "
        "Networks: the classifier and the segmenter.",
        "",
        "| setting | concurrency | images/s | p50 ms | p95 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rows in results.items():
        for row in rows:
            stable = "" if row["stable"] else " (unstable)"
            lines.append(
                f"| {name}{stable} | {row['concurrency']} | {row['images_per_s']:.1f} | "
                f"{row['p50_ms']:.1f} | {row['p95_ms']:.1f} |"
            )
    c1 = {
        n: next(r["p50_ms"] for r in rows if r["concurrency"] == 1) for n, rows in results.items()
    }
    lines += [
        "",
        f"Best throughput: **{best}** "
        f"({max(r['images_per_s'] for r in results[best]):.1f} images/s); lowest p50 at "
        f"concurrency 1: **{min(c1, key=c1.get)}** ({min(c1.values()):.0f} ms).",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").write_text(json.dumps(results, indent=2))
    text = "\n".join(lines) + "\n"
    (out / "tuning.md").write_text(text)
    return text


PHOTOS = 8  # photos sent (each request one of them, in turn) and timed in process


def bench_photos(cfg: Config, images: list[str]) -> tuple[np.ndarray, list[bytes], str]:
    """The photos a benchmark sends: ``images`` (files or folders), else the profile's own
    test photos where they are real, else the shared Pet test photos (a profile on synthetic
    data, e.g. make serve's); their pixels at the profile's size as the server reads them
    (``decode_resized``), their files' bytes, and what they are."""
    if images:
        from serving.infer import find_images

        items, missing = find_images(images)
        if missing or not items:
            raise SystemExit(f"wsss bench: no images in {', '.join(images)}")
        files = [item.path for item in items[:PHOTOS]]
        where = ", ".join(images)
    else:
        real = cfg.data.synth_count == 0 or not SHARED_PETS.is_dir()
        data_cfg = (
            cfg if real else with_overrides(cfg, [f"data.root={SHARED_PETS}", "data.task=pets"])
        )
        from training.data import list_samples

        samples = list_samples(data_cfg.data.root, data_cfg.data.task, "test", data_cfg.data.layout)
        files = [s.image_path for s in samples[:: max(1, len(samples) // PHOTOS)][:PHOTOS]]
        where = f"the test photos of {data_cfg.data.root}"
        missing = [f for f in files if not Path(f).is_file()]
        if missing:  # listed but absent: one line, as training says it
            raise SystemExit(f"wsss bench: {missing[0]}: the image is missing (listed in {where})")
    blobs = [Path(f).read_bytes() for f in files]
    size = (cfg.data.image_size, cfg.data.image_size)
    pixels = np.stack([decode_resized(b, size)[0] for b in blobs])
    return pixels, blobs, f"{len(files)} of {where}"


def report_folder(config: str | None, out: str | None) -> Path:
    """reports/bench for the quick profile (its history), reports/bench/<profile> for the
    others; reports/bench/gpu[/<profile>] on a GPU."""
    base = Path("reports/bench/gpu" if has_gpu() else "reports/bench")
    if out:
        return Path(out)
    stem = Path(config or "configs/quick.yaml").stem
    return base if stem == "quick" else base / stem


def own_repository(cfg: Config, config: str | None, sets: list[str]) -> Config:
    """The profile's own repository: make serve's for its profile, ``<runs>/model_repository``
    for the others (every profile's export.repository defaults to make serve's), unless
    ``--set export.repository=...`` names one."""
    if Path(config or "").stem == "serve" or any(s.startswith("export.repository=") for s in sets):
        return cfg
    return with_overrides(cfg, [f"export.repository={Path(cfg.runs) / 'model_repository'}"])


def untrained(cfg: Config, config: str | None) -> Config:
    """The profile's networks (and level set) with random weights, in a runs folder and
    repository of their own under .cache/bench/untrained/<profile>, made afresh: what a
    profile's speed needs without training it (a network's speed is not its weights'; its
    masks are not measured)."""
    from benchmarks.infer_folder import random_export

    work = Path(".cache/bench/untrained") / Path(config or "configs/quick.yaml").stem
    shutil.rmtree(work, ignore_errors=True)
    return random_export(
        with_overrides(cfg, [f"runs={work / 'runs'}", f"export.repository={work / 'repo'}"])
    )


def _serves_int8_vit(cfg: Config) -> bool:
    """Whether the repository's newest ViT model is an int8 graph."""
    from export.quantize import is_quantized

    folder = Path(cfg.export.repository) / VIT
    found = versions(folder) if folder.is_dir() else []
    if not found:
        return False
    path = folder / str(found[-1]) / "model.onnx"
    return path.is_file() and is_quantized(path.read_bytes())


def bench_report(args) -> None:
    """``wsss bench --report`` (``make bench``): its flags are the CLI table's ``BENCH``."""
    from export.repository import build_if_missing, fp32_vit

    args.config = args.config or "configs/serve.yaml"  # what make serve serves
    cfg = load_config(args.config, args.set)
    cfg = own_repository(cfg, args.config, args.set)
    command = args.invocation  # the command as run, every flag in it
    if args.untrained:
        cfg = untrained(cfg, args.config)
    else:
        build_if_missing(cfg)
    served = served_config(cfg)
    images, blobs, source = bench_photos(cfg, args.images)
    settings = PerfSettings(
        concurrency=args.concurrency, stability_percent=25, max_trials=8, request_count=64
    )
    out = report_folder(args.config, args.out)
    if args.sweep:
        print(sweep(cfg, blobs, settings, out, command))
        return
    refiners = None
    # The refiner-speed table where the profile serves a level set (the quick profile trains
    # one for it: its history has the table).
    levelset = RefinerSpec.of(served.refine).checkpoint is not None
    if not args.no_refiners and (levelset or Path(args.config or "").stem in ("", "quick")):
        from benchmarks.refiner_speed import refiner_speed

        refiners = refiner_speed(ensure_levelset(cfg))
    rows = eager_rows(served, images, args.seconds) + ort_rows(served, images, args.seconds)
    rows += parallel_rows(served, images, args.seconds, blobs=blobs)
    # The unoptimised form beside the shipped one, where the profile serves an int8 ViT:
    # batch 1, one pipeline and one per core (the issue: "each optimised form").
    fp32 = fp32_vit(cfg) if _serves_int8_vit(cfg) else None
    if fp32 is not None:
        rows += ort_rows(served, images, args.seconds, batches=(1,), vit=fp32)
        rows += parallel_rows(served, images, args.seconds, batches=(1,), vit=fp32)
    batches = args.batches
    repo = Path(cfg.export.repository)
    # perf_analyzer registers system shared memory for the "+ system shm" run and sends no
    # header for it over gRPC: this private loopback server leaves that one API open.
    with TritonServer(
        repo, on_free_ports(cfg.serve), Path(".cache/bench/server"), open_apis=("shared-memory",)
    ) as s:
        rows += served_rows(s, images, blobs, settings, batches)
        rows += output_rows(s, images, args.seconds)
        best = best_grpc(rows)
        cpu = cpu_per_image(
            s, images, dataclasses.replace(settings, concurrency=str(best.concurrency))
        )
    # The pair again with no server running: how far the machine's speed moved meanwhile.
    rows += parallel_rows(served, images, args.seconds, batches=(1,), blobs=blobs, after=True)
    r = ratios(rows)
    text = report(rows, r, cfg, command, refiners, cpu, source, args.untrained)
    write(rows, r, out, text, refiners, cpu)
    print(text)
