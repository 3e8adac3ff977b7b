"""GrabCut pseudo-masks of a training set in one process against several under torchrun.

Each measurement is the whole command a user runs, ``wsss train --stages pseudo``: one plain
process, then ``torchrun --standalone --nproc-per-node N``, each rank decoding and refining
its share of the images (``training.stages.write_pseudo_masks``). Every process gets the
same threads (``--threads``, OMP_NUM_THREADS; 1 by default, torchrun's own default): the
ratio is then the sharding's, and the masks are identical. (GrabCut, most of the time, runs
on one thread anyway; and on a busy machine torch's default of a thread per core can be
many times slower than one thread.) Rounds alternate the order, so a neighbour's load on a
shared machine falls on every setting; the report gives each round, the medians' ratio,
and whether the settings' masks agree.

The classifier is ``--classifier`` (default: the profile's ``<runs>/classifier/best.pt``
where it exists), else an untrained one of the profile's architecture: GrabCut's cost
depends on the images' size and its iterations, not on how good the CAM seeds are. Not run
by the tests (it takes minutes on real photos): run it on an idle machine.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.serving import machine
from wsss.config import Config, load_config

GRABCUT = ["refine.method=fixed+grabcut"]  # CAM, fixed threshold, GrabCut


def place_classifier(cfg: Config, given: str | None, runs: Path) -> str:
    """``runs/classifier/best.pt`` for the measured commands to read; says which it is."""
    from training.data.layouts import read_class_names
    from training.loop import save_checkpoint
    from training.models import build_classifier
    from training.stages import classifier_setup

    source = Path(given or Path(cfg.runs) / "classifier" / "best.pt")
    (runs / "classifier").mkdir(parents=True, exist_ok=True)
    if source.is_file():
        shutil.copy(source, runs / "classifier" / "best.pt")
        return f"the classifier in `{source}`"
    if given:
        raise FileNotFoundError(f"{given}: no such classifier checkpoint")
    names = read_class_names(cfg.data.root, cfg.data.task, cfg.data.layout)
    kwargs, names = classifier_setup(cfg, names)
    net = build_classifier(cfg.classifier.arch, pretrained=False, **kwargs)
    meta = {"family": "classifier", "arch": cfg.classifier.arch, "task": cfg.data.kind.as_meta()}
    meta |= {"kwargs": kwargs | {"weights": None}, "class_names": names}
    save_checkpoint(
        {"state_dict": net.eval().state_dict(), "meta": meta}, runs / "classifier" / "best.pt"
    )
    return f"an untrained {cfg.classifier.arch} (no `{source}`)"


def pseudo_command(args, runs: Path, processes: int, python: str = sys.executable) -> list[str]:
    """``wsss train --stages pseudo`` of the profile into ``runs``, in ``processes``."""
    cmd = [python, "-m", "cli", "train", "--stages", "pseudo"]
    if processes > 1:
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        cmd[1:1] = launch
    sets = [*args.set, *GRABCUT, f"runs={runs}"]
    return [*cmd, "--config", args.config, *(a for s in sets for a in ("--set", s))]


def timed(cmd: list[str], runs: Path, threads: int) -> tuple[float, float]:
    """Seconds of the whole command, and of its pseudo-mask stage (decoding to the merged
    file, as the stage records it in ``train_masks.json``)."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{done.stderr[-3000:]}")
    made = json.loads((runs / "pseudo" / "train_masks.json").read_text())
    return seconds, made["seconds"]


def measure(args, work: Path) -> tuple[dict, dict[int, np.ndarray]]:
    """(whole command, stage) seconds per (processes, round), and each setting's masks of
    its last round."""
    settings = [1, args.processes]
    seconds, masks = {}, {}
    for k in range(1, args.rounds + 1):
        for n in settings if k % 2 else settings[::-1]:
            runs = work / f"runs{n}"
            seconds[n, k] = timed(pseudo_command(args, runs, n), runs, args.threads)
            masks[n] = np.load(runs / "pseudo" / "train_masks.npz")["masks"]
            whole, stage = seconds[n, k]
            print(f"round {k}: {n} process(es): {stage:.1f} s ({whole:.1f} s whole)", flush=True)
    return seconds, masks


def report(args, seconds, masks, count: int, classifier: str, load) -> str:
    n, rounds = args.processes, range(1, args.rounds + 1)

    def row(what: str, i: int) -> str:  # i: 0 the whole command, 1 the stage
        median = [statistics.median(seconds[p, k][i] for k in rounds) for p in (1, n)]
        each = " ".join(f"{seconds[1, k][i] / seconds[n, k][i]:.2f}" for k in rounds)
        ratio = median[0] / median[1]
        return f"| {what} | {median[0]:.1f} | {median[1]:.1f} | {ratio:.2f}x | {each} |"

    same = masks[1].shape == masks[n].shape and bool((masks[1] == masks[n]).all())
    agree = "identical" if same else f"{(masks[1] == masks[n]).mean():.4%} of the pixels agree"
    cfg = load_config(args.config, args.set)
    lines = [
        f"# GrabCut pseudo-masks: 1 process against {n} under torchrun",
        "",
        f"Made by `{args.invocation}` on {machine()}; {count:,} training images of "
        f"`{cfg.data.root}` at {cfg.data.image_size} px, batches of {cfg.train.batch_size}, "
        f"CAM + fixed threshold + GrabCut ({cfg.refine.grabcut_iterations} iterations), "
        f"{classifier}; {args.rounds} rounds in one run, the order reversed every other "
        f"round; the machine's load average {load[0]:.1f} before and {load[1]:.1f} after "
        "(other work shares its cores: compare within a round).",
        "",
        f"| median seconds | 1 process | {n} processes | speed-up | round by round |",
        "|---|---:|---:|---:|---|",
        row("pseudo-masks (decoding to the merged file)", 1),
        row("whole command", 0),
        "",
        f"Masks of the two settings: {agree}.",
        "",
        "| round | processes | pseudo-masks s | whole command s |",
        "|---:|---:|---:|---:|",
        *(
            f"| {k} | {p} | {seconds[p, k][1]:.1f} | {seconds[p, k][0]:.1f} |"
            for k in rounds
            for p in (1, n)
        ),
        "",
        "The commands, as run (`RUNS`: a fresh folder holding the classifier):",
        "",
        "```",
        *(
            f"OMP_NUM_THREADS={args.threads} "
            + shlex.join(pseudo_command(args, Path("RUNS"), p, ".venv/bin/python"))
            for p in (1, n)
        ),
        "```",
        "",
        "pseudo-masks: the stage's own time on rank 0 (`train_masks.json`), from decoding "
        "the images (each rank its share) through the CAMs and GrabCut to the merged file "
        "written; whole command: that plus Python's start and, under torchrun, its "
        f"rendezvous. OMP_NUM_THREADS={args.threads} for every process: {args.threads} "
        "thread(s) each.",
    ]
    return "\n".join(lines) + "\n"


def scaling_report(args) -> None:
    """``wsss scaling``: its flags are the CLI table's ``SCALING``."""
    cfg = load_config(args.config, args.set)
    with tempfile.TemporaryDirectory(prefix="wsss-pseudo-scaling-") as tmp:
        work = Path(tmp)
        classifier = place_classifier(cfg, args.classifier, work / "runs1")
        shutil.copytree(work / "runs1", work / f"runs{args.processes}")  # the same weights
        load = [os.getloadavg()[0]]
        seconds, masks = measure(args, work)
        load.append(os.getloadavg()[0])
    text = report(args, seconds, masks, len(masks[1]), classifier, load)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text)
    print(text)
