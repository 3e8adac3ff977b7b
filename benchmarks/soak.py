"""Soak: many requests on ``wsss_pipeline_bytes`` with real photos; every process's memory.

A long run is where a Python-backend stub that keeps a reference per request, or a server
that caches per request, shows itself: its resident memory climbs with the request count
instead of levelling off once every code path has run. This drives ``--requests`` requests
(default 20,000) through the bytes ensemble at ``--concurrency`` (default 8), cycling through
the photos of a folder (the shared Oxford-IIIT Pet subset by default; each request is one
file's own bytes, as ``wsss infer DIR`` sends them), and samples the resident set (VmRSS) of
tritonserver and of every stub serving the repository as the requests go. After the warm-up
(``--warmup`` requests), no process may grow by more than ``--max-growth`` (5%) and no request
may fail; the report says which did, with the samples as a figure.

Memory, not speed, is what is measured: the machine's other work changes how long the run
takes, not what it holds. The server holds ``--repository``, else the profile's networks
with untrained weights (a network's memory is not its weights' values).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.infer_folder import PHOTOS, profile_server
from benchmarks.serving import machine
from serving.client import encoded_input
from serving.infer import find_images
from serving.server import TritonServer
from wsss.errors import InputError, UsageError
from wsss.tensors import PIPELINE_BYTES, SEGMENTATION_FULL

SERVER = "tritonserver"


def processes(server: TritonServer) -> dict[int, str]:
    """pid -> name of tritonserver and of each of its live stubs (a stub is named for its
    model, version and instance: ``classifier/1 (stub 0)``): its own process group's only,
    not those of another server on the same repository (a `make serve` beside it)."""
    found = {server.process.pid: SERVER}
    count: dict[str, int] = {}
    for proc in server.stub_processes():
        key = "/".join(proc.stub_of(server.repository))
        count[key] = count.get(key, -1) + 1
        found[proc.pid] = f"{key} (stub {count[key]})"
    return found


# /proc/<pid>/status fields: the resident set, and its private and shared-memory parts (the
# Python backend moves tensors through shared memory that both tritonserver and the stub map).
FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem"}


def memory_mb(pid: int) -> dict[str, float] | None:
    """The resident set of ``pid`` and its parts in MiB, None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key = line.split(":", 1)[0]
        if key in FIELDS:
            out[FIELDS[key]] = round(int(line.split()[1]) / 1024, 2)
    return out or None


@dataclass
class Sample:
    requests: int  # answered so far
    seconds: float
    rss_mb: dict[str, float]
    parts_mb: dict[str, dict[str, float]] = field(default_factory=dict)  # anon, shmem


@dataclass
class Soak:
    """What one run saw: the samples, the failures, and each process's growth."""

    requests: int
    concurrency: int
    warmup: int
    photos: int
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # processes that exited during the run

    def growth(self) -> dict[str, dict[str, float]]:
        """Per process: its resident set just after the warm-up and at the end (medians of
        the samples in the first and last quarter of the measured requests: a resident set
        swings from one second to the next as allocators take and return memory, and a leak
        is a trend, not a swing), the peak after the warm-up, and the growth."""
        return rss_growth(self.samples, self.warmup, self.requests)


def rss_growth(samples: list[Sample], warmup: int, total: int) -> dict[str, dict[str, float]]:
    span = max(1, (total - warmup) // 4)
    after = [s for s in samples if s.requests >= warmup]
    start = [s for s in after if s.requests <= warmup + span] or after[:1]
    end = [s for s in after if s.requests >= total - span] or after[-1:]
    out = {}
    for name in samples[0].rss_mb if samples else []:
        first = statistics.median(s.rss_mb[name] for s in start if name in s.rss_mb)
        last = statistics.median(s.rss_mb[name] for s in end if name in s.rss_mb)
        peak = max(s.rss_mb[name] for s in after if name in s.rss_mb)
        out[name] = {
            "after_warmup_mb": first,
            "end_mb": last,
            "peak_mb": peak,
            "growth": last / first - 1,
            "peak_growth": peak / first - 1,
        }
        for part in ("anon", "shmem"):  # where the growth is, in MiB
            values = [
                [s.parts_mb[name][part] for s in group if part in s.parts_mb.get(name, {})]
                for group in (start, end)
            ]
            if all(values):
                out[name][f"{part}_growth_mb"] = statistics.median(values[1]) - statistics.median(
                    values[0]
                )
    return out


def soak(
    server: TritonServer,
    photos: list[bytes],
    requests: int,
    concurrency: int,
    warmup: int,
    interval: float = 1.0,
    progress: bool = True,
) -> Soak:
    """``requests`` requests through the bytes ensemble, ``concurrency`` in flight (gRPC
    ``async_infer``, one client), the photos in turn; the memory of every process sampled
    every ``interval`` seconds and at the warm-up's end."""
    import tritonclient.grpc as grpc

    run = Soak(requests, concurrency, warmup, len(photos))
    procs = processes(server)
    done = 0
    lock, stop = threading.Lock(), threading.Event()

    def sample() -> None:
        mem = {name: memory_mb(pid) for pid, name in procs.items()}
        for name in [n for n, v in mem.items() if v is None]:
            if name not in run.gone:
                run.gone.append(name)
        mem = {n: v for n, v in mem.items() if v}
        rss = {n: v["rss"] for n, v in mem.items()}
        parts = {n: {k: x for k, x in v.items() if k != "rss"} for n, v in mem.items()}
        with lock:
            run.samples.append(Sample(done, time.monotonic() - started, rss, parts))

    def sampler() -> None:
        while not stop.wait(interval):
            sample()

    slots = threading.Semaphore(concurrency)
    client = grpc.InferenceServerClient(server.grpc_url)
    bar = tqdm(total=requests, desc="soak", unit="req", disable=not progress)
    started = time.monotonic()
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    sample()

    def finish(k: int, result, error) -> None:
        nonlocal done
        try:
            if error is not None or result.as_numpy(SEGMENTATION_FULL) is None:
                run.failures.append(f"request {k}: {error or 'no ' + SEGMENTATION_FULL}")
        finally:
            with lock:
                done += 1
            bar.update()
            slots.release()

    try:
        for k in range(requests):
            slots.acquire()
            if k == warmup:
                sample()  # the baseline, whatever the interval
            client.async_infer(
                PIPELINE_BYTES,
                [encoded_input(grpc, [photos[k % len(photos)]])],
                lambda result, error, k=k: finish(k, result, error),
            )  # every output, as `wsss infer` asks
        for _ in range(concurrency):  # every request answered
            slots.acquire()
        sample()
    finally:
        stop.set()
        thread.join()
        bar.close()
        client.close()
    run.seconds = time.monotonic() - started
    return run


def plot(run: Soak, path: Path) -> None:
    """Each process's resident set against requests answered (left), and relative to its
    value just after the warm-up (right), with the warm-up's end and the allowed band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    growth = run.growth()
    fig, (ax, rel) = plt.subplots(1, 2, figsize=(13, 5))
    for name in growth:
        pts = [(s.requests, s.rss_mb[name]) for s in run.samples if name in s.rss_mb]
        x, y = np.array(pts).T
        ax.plot(x, y, label=name, lw=1)
        rel.plot(x, 100 * (y / growth[name]["after_warmup_mb"] - 1), label=name, lw=1)
    for a in (ax, rel):
        a.axvline(run.warmup, color="grey", ls="--", lw=1)
        a.set_xlabel("requests answered")
        a.grid(alpha=0.3)
    rel.axhspan(-5, 5, color="green", alpha=0.08)
    rel.set_ylim(-10, 10)
    ax.set_ylabel("resident set (MiB)")
    rel.set_ylabel("% of its resident set after the warm-up (band: +-5%)")
    ax.set_title("memory of every process (dashed: end of warm-up)")
    rel.set_title("relative to the warm-up's end")
    rel.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(run: Soak, args, served: str, max_growth: float) -> str:
    growth = run.growth()
    worst = max(g["growth"] for g in growth.values())
    ok = not run.failures and not run.gone and worst <= max_growth
    rate = run.requests / run.seconds
    lines = [
        f"# Soak: {run.requests:,} requests on `{PIPELINE_BYTES}`, concurrency {run.concurrency}",
        "",
        f"Made by `{args.invocation}` on {machine()}; {served}, the `{Path(args.config).stem}` "
        f"profile; the {run.photos} photos of `{args.images}` in turn, each request one file's "
        f"own bytes, over gRPC. {run.seconds / 60:.1f} minutes ({rate:.1f} requests/s, other "
        "work sharing the cores). The resident set (VmRSS) of tritonserver and of every stub "
        f"was sampled each second; growth is measured from the end of the warm-up "
        f"({run.warmup:,} requests) to the end, each the median of the samples over a "
        "quarter of the measured requests.",
        "",
        f"**{'Passed' if ok else 'FAILED'}**: {len(run.failures)} of {run.requests:,} requests "
        f"failed; the most any process grew after the warm-up: {100 * worst:+.1f}% "
        f"(allowed {100 * max_growth:.0f}%)"
        + (f"; exited during the run: {', '.join(run.gone)}" if run.gone else "")
        + ".",
        "",
        "![resident set against requests](rss.png)",
        "",
        "| process | after warm-up (MiB) | end (MiB) | growth | peak after warm-up | "
        "of which private (MiB) | shared memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {g['after_warmup_mb']:.1f} | {g['end_mb']:.1f} | "
            f"{100 * g['growth']:+.1f}% | {100 * g['peak_growth']:+.1f}% | "
            f"{g.get('anon_growth_mb', float('nan')):+.1f} | "
            f"{g.get('shmem_growth_mb', float('nan')):+.1f} |"
            for name, g in growth.items()
        ),
    ]
    if run.failures:
        lines += ["", "First failures:", "", *(f"- {f}" for f in run.failures[:10])]
    return "\n".join(lines) + "\n"


def soak_report(args) -> int:
    """``wsss soak`` (``make soak``): its flags are the CLI table's ``SOAK``; 0 when no
    process grew past --max-growth and every request was answered, else 1."""
    if args.concurrency < 1:
        raise UsageError(
            f"--concurrency is the requests in flight, at least 1: not {args.concurrency}"
        )
    if not 0 <= args.warmup < args.requests:
        raise UsageError(
            f"--requests ({args.requests}) must be more than --warmup ({args.warmup}, at least "
            "0): growth is measured over the requests after the warm-up"
        )
    if args.max_growth <= 0:
        raise UsageError(f"--max-growth is a fraction (0.05: 5%), above 0: not {args.max_growth}")
    args.images = args.images or PHOTOS
    items, missing = find_images([args.images])
    if missing or not items:
        raise InputError(f"{args.images}: no such folder, or no photos in it")
    photos = [item.path.read_bytes() for item in items]
    with tempfile.TemporaryDirectory(prefix="wsss-soak-") as tmp:
        work = Path(tmp)
        server, served = profile_server(args, work)
        with server:
            run = soak(server, photos, args.requests, args.concurrency, args.warmup)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(run, out / "rss.png")
    text = report(run, args, served, args.max_growth)
    (out / "results.md").write_text(text)
    payload = asdict(run) | {"growth": run.growth(), "command": args.invocation}
    (out / "results.json").write_text(json.dumps(payload, separators=(",", ":")))
    print(text)
    worst = max(g["growth"] for g in run.growth().values())
    return 0 if not run.failures and not run.gone and worst <= args.max_growth else 1
