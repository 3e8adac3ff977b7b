"""`wsss infer DIR` against `wsss bench` on the same photos: one server, one run.

Both commands run as a user would run them, against the same ``wsss_pipeline_bytes`` at the
same concurrency: ``wsss bench --model wsss_pipeline_bytes --images FILE...`` (perf_analyzer:
what the server gives that load) and ``wsss infer DIR --concurrency C`` with figures off
(every photo read, sent, and its two masks written). Beside them: perf_analyzer called
directly with the same files' bytes (``wsss bench --images`` sends each file as it is, as
``wsss infer`` does: the two rows should agree), and the same folder
through tritonclient's gRPC ``async_infer`` (the other way ``wsss infer`` could keep
requests in flight). The order turns round every other round, so a neighbour's load on a
shared machine falls on all of them; the report gives each round and the medians' ratios.

The server holds ``--repository``, else the profile's networks with untrained weights
exported into a temporary repository (the tests' approach: a network's speed does not
depend on its weights). Writes the tables and the
command that made them to ``--report``.
"""

from __future__ import annotations

import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import SHARED_PETS
from benchmarks.serving import machine
from serving.client import PipelineClient, encoded_input
from serving.infer import MASK_FILES, Item, find_images, write_mask
from serving.perf import PerfSettings, run_perf_analyzer
from serving.server import TritonServer, on_free_ports
from wsss.config import Config, load_config
from wsss.tensors import PIPELINE_BYTES

PHOTOS = str(SHARED_PETS / "images")
BENCH = "wsss bench (perf_analyzer; the files' own bytes)"
OWN_BYTES = "perf_analyzer called directly, the same bytes"
INFER = "wsss infer DIR"
ASYNC = "gRPC async_infer, one client (the alternative)"


@dataclass
class Measured:
    what: str
    round: int
    images_per_s: float
    note: str = ""  # "unstable": perf_analyzer found no stable window; "whole command: ..."


def random_export(cfg: Config) -> Config:
    """The profile's classifier and segmenter (and its level set, where it serves one),
    untrained, exported into its repository."""
    from export.repository import export_repository
    from training.data.synth import ANIMALS
    from training.levelset.model import LevelSetHead
    from training.levelset.train import LevelSetModel, head_kwargs
    from training.loop import save_checkpoint
    from training.models import build_classifier, build_segmenter
    from training.stages import classifier_setup, segmenter_kwargs
    from wsss.served.registry import LEVELSET, RefinerSpec

    ckw, names = classifier_setup(cfg, list(ANIMALS))
    build, skw = segmenter_kwargs(cfg, cfg.data.kind.segmentation_classes(len(names)))
    classifier = build_classifier(cfg.classifier.arch, **ckw)
    task = cfg.data.kind.as_meta()
    cmeta = {"family": "classifier", "arch": cfg.classifier.arch, "task": task, "kwargs": ckw}
    cmeta |= {"class_names": names}
    smeta = {"family": "segmenter", "arch": cfg.segmenter.arch, "task": task, "kwargs": skw}
    saved = [(cmeta, classifier), (smeta, build_segmenter(cfg.segmenter.arch, **build))]
    if RefinerSpec.of(cfg.export.refine or cfg.refine).entry is LEVELSET:
        kwargs = head_kwargs(
            cfg.levelset, classifier.fc.in_features, len(names), cfg.data.image_size
        )
        head = LevelSetHead(**kwargs)
        meta = {"family": "levelset", "task": task, "kwargs": kwargs, "classifier": cmeta}
        meta |= {"finetune": cfg.levelset.finetune}
        saved.append((meta, LevelSetModel(classifier, head, cfg.levelset.finetune)))
    for meta, model in saved:
        out = Path(cfg.runs) / meta["family"]
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint({"state_dict": model.eval().state_dict(), "meta": meta}, out / "best.pt")
    export_repository(cfg)
    return cfg


def repository(config: str, overrides: list[str], given: str | None, tmp: Path):
    """The repository to serve, and how the report names it. Never ``model_repository/``
    unless given: another profile's export may sit there, or be replaced midway."""
    if given:
        return Path(given), f"the export in `{given}`"
    aside = [f"runs={tmp / 'runs'}", f"export.repository={tmp / 'repo'}"]
    random_export(load_config(config, [*overrides, *aside]))
    return tmp / "repo", "the profile's networks, untrained (a network's speed is not its weights')"


def profile_server(args, work: Path) -> tuple[TritonServer, str]:
    """A tritonserver (not started) on free ports for ``args.repository``, else for the
    profile's (``args.config``, ``args.set``) networks, untrained, and how the report names
    what it serves: the flags of a benchmark that serves a profile to photos (this one, the
    soak)."""
    repo, served = repository(args.config, args.set, args.repository, work)
    serve = on_free_ports(load_config(args.config, args.set).serve)
    return TritonServer(repo, serve, work / "server"), served


def _wsss(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def bench_rate(url: str, files: list[Path], concurrency: int, window: list[str]) -> Measured:
    """``wsss bench`` as a user runs it; its table's one row."""
    level = f"{concurrency}:{concurrency}"
    flags = ["--model", PIPELINE_BYTES, "--url", url, "--concurrency", level, *window]
    proc = _wsss("bench", *flags, "--images", *map(str, files))
    row = re.search(r"^\| \d+( \(unstable\))? \| ([\d.]+) \|", proc.stdout, re.MULTILINE)
    if proc.returncode or not row:
        raise RuntimeError(f"wsss bench failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return Measured(BENCH, 0, float(row.group(2)), "unstable" if row.group(1) else "")


def own_bytes_rate(url: str, files: list[Path], settings: PerfSettings, work: Path) -> Measured:
    """perf_analyzer fed the very bytes ``wsss infer`` sends, called here rather than through
    ``wsss bench --images`` (which sends the same bytes: a check on the CLI between)."""
    spec = PipelineClient(url, "grpc", PIPELINE_BYTES).all_specs[PIPELINE_BYTES]
    (r,) = run_perf_analyzer(spec, url, "grpc", settings, [f.read_bytes() for f in files], work)
    return Measured(OWN_BYTES, 0, r.throughput, "" if r.stable else "unstable")


def infer_rate(url: str, folder: str, concurrency: int, out: Path) -> Measured:
    """``wsss infer DIR`` as a user runs it, figures off: its own images/s (first request to
    last file written), and the whole command's beside it (Python's start included)."""
    start = time.monotonic()
    flags = ["--url", url, "--concurrency", str(concurrency), "--out", str(out), "--no-figures"]
    proc = _wsss("infer", folder, *flags)
    whole = time.monotonic() - start
    rate = re.search(r"(\d+) written in [\d.]+ s \(([\d.]+) images/s\)", proc.stderr)
    if proc.returncode or not rate:
        raise RuntimeError(f"wsss infer failed ({proc.returncode}):\n{proc.stderr}")
    done = int(rate.group(1))
    return Measured(INFER, 0, float(rate.group(2)), f"whole command {done / whole:.1f}")


def async_rate(url: str, items: list[Item], concurrency: int, out: Path) -> Measured:
    """What ``wsss infer`` would get from tritonclient's gRPC ``async_infer`` instead of a
    thread and a client per request in flight: one client, callbacks, files written here."""
    import tritonclient.grpc as grpc

    base = PipelineClient(url, "grpc", PIPELINE_BYTES)
    client = grpc.InferenceServerClient(url)
    landed, slots = queue.Queue(), threading.Semaphore(concurrency)  # results; requests in flight

    def write(item: Item, result, error) -> None:
        if error is not None:
            raise RuntimeError(f"{item.path}: {error}")
        for key, what in MASK_FILES.items():
            write_mask(result.as_numpy(key)[0], base.palette, item.output(out, what))

    start, pending = time.monotonic(), 0
    for item in items:
        slots.acquire()
        client.async_infer(
            PIPELINE_BYTES,
            [encoded_input(grpc, [item.path.read_bytes()])],
            lambda result, error, item=item: (landed.put((item, result, error)), slots.release()),
        )
        pending += 1
        while not landed.empty():
            write(*landed.get())
            pending -= 1
    for _ in range(pending):
        write(*landed.get())
    rate = len(items) / (time.monotonic() - start)
    client.close()
    base.close()
    return Measured(ASYNC, 0, rate)


def measure(url: str, args, work: Path) -> tuple[list[Measured], tuple[float, float]]:
    """Every round runs each way once; the order turns round each round. Also the machine's
    load average before and after."""
    items, _ = find_images([args.images])
    files = [item.path for item in items]
    count = args.request_count or len(files)
    window = ["--request-count", str(count), "--stability", str(args.stability)]
    level = f"{args.concurrency}:{args.concurrency}"
    settings = PerfSettings(
        concurrency=level, stability_percent=args.stability, request_count=count
    )
    c = args.concurrency
    ways = [
        lambda k: bench_rate(url, files, c, window),
        lambda k: own_bytes_rate(url, files, settings, work / "perf"),
        lambda k: infer_rate(url, args.images, c, work / f"infer{k}"),
        lambda k: async_rate(url, items, c, work / f"async{k}"),
    ]
    infer_rate(url, args.images, c, work / "warmup")  # the server's first requests are slow
    rows, load = [], os.getloadavg()[0]
    for k in range(1, args.rounds + 1):
        for way in ways if k % 2 else ways[::-1]:
            row = way(k)
            row.round = k
            rows.append(row)
            print(f"round {k}: {row.what}: {row.images_per_s:.1f} images/s {row.note}", flush=True)
    return rows, (load, os.getloadavg()[0])


def report(rows: list[Measured], load: tuple[float, float], args, served: str, count: int):
    level = f"{args.concurrency}:{args.concurrency}"
    rate = {(r.what, r.round): r.images_per_s for r in rows}
    rounds = sorted({r.round for r in rows})

    def ratio(name: str, a: str, b: str) -> str:
        medians = [statistics.median(rate[w, k] for k in rounds) for w in (a, b)]
        each = " ".join(f"{rate[a, k] / rate[b, k]:.2f}" for k in rounds)
        return f"| {name} | {medians[0] / medians[1]:.2f} | {each} |"

    lines = [
        "# `wsss infer DIR` against `wsss bench`: same server, photos, ensemble, concurrency",
        "",
        f"Made by `{args.invocation}` on {machine()}; {served}, the `{Path(args.config).stem}` "
        f"profile; {count} photos in `{args.images}` (JPEG, read in place), "
        f"`{PIPELINE_BYTES}` over gRPC at concurrency {args.concurrency}, figures off; "
        f"{args.rounds} rounds in one run, the order reversed every other round; the "
        f"machine's load average {load[0]:.1f} before them and {load[1]:.1f} after (other "
        "work shares its cores: compare rows within a round).",
        "",
        "| images/s | ratio of the medians | round by round |",
        "|---|---:|---|",
        ratio(f"{INFER} / {BENCH} (target >= 0.9)", INFER, BENCH),
        ratio(f"{INFER} / {OWN_BYTES}", INFER, OWN_BYTES),
        ratio(f"{INFER} (a thread and a client per request in flight) / {ASYNC}", INFER, ASYNC),
        "",
        "| round | measured | images/s | |",
        "|---:|---|---:|---|",
        *(f"| {r.round} | {r.what} | {r.images_per_s:.1f} | {r.note} |" for r in rows),
        "",
        "The commands, as run (`FILES`: the photos, one argument each):",
        "",
        "```",
        f"wsss bench --model {PIPELINE_BYTES} --concurrency {level} "
        f"--request-count {args.request_count or count} --stability {args.stability} "
        "--images FILES",
        f"wsss infer {args.images} --concurrency {args.concurrency} --no-figures --out OUT",
        "```",
        "",
        "`wsss bench --images` sends each file's own bytes, as `wsss infer` does; "
        f"the row '{OWN_BYTES}' checks the CLI in between. "
        "`wsss infer`'s images/s runs from its "
        "first request to its last file written; the whole command's (Python's start, the "
        "server's metadata) is noted beside it. unstable: perf_analyzer found no window "
        f"within {args.stability}% of the others; its last trial's figure.",
    ]
    return "\n".join(lines) + "\n"


def infer_folder_report(args) -> None:
    """``wsss infer-bench``: its flags are the CLI table's ``INFER_BENCH``."""
    args.images = args.images or PHOTOS
    with tempfile.TemporaryDirectory(prefix="wsss-infer-folder-") as tmp:
        work = Path(tmp)
        server, served = profile_server(args, work)
        with server:
            rows, load = measure(server.grpc_url, args, work)
        count = len(find_images([args.images])[0])
    text = report(rows, load, args, served, count)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text)
    print(text)
