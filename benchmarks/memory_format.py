"""The registry's networks in the default NCHW layout against channels-last (NHWC), side by
side: a training step (forward, backward, Adam) and an inference batch, on this CPU.

``training.models.registry`` builds every network channels-last; this measures what that
buys. Each network is timed in both layouts in alternating rounds (a neighbour's load on a
shared machine falls on both), the medians' ratio reported, and the two layouts' outputs
compared (the same values to float rounding). Not run by the tests (a minute or two):

    .venv/bin/python -m benchmarks.memory_format [--threads N] [--rounds N] [--report FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.serving import machine

# name, builder, its arguments, image side, batch: the profiles' networks at their sizes
NETWORKS = (
    ("MobileNetV2 classifier", "classifier", {"arch": "mobilenet_v2"}, 128, 16),
    ("EfficientNet-Lite0 classifier", "classifier", {"arch": "efficientnet_lite0"}, 224, 16),
    ("ResNet-18 classifier", "classifier", {"arch": "resnet18"}, 224, 16),
    ("UNet 8 x 3", "segmenter", {"arch": "unet", "base_channels": 8, "depth": 3}, 96, 16),
    ("DeepLabV3 MNv2", "segmenter", {"arch": "deeplabv3", "backbone": "mobilenet_v2"}, 224, 8),
)  # fmt: skip
CLASSES = 21  # VOC's 20 and background


def _build(family: str, kwargs: dict) -> torch.nn.Module:
    from training.models import build_classifier, build_segmenter

    kwargs = dict(kwargs, num_classes=CLASSES)
    arch = kwargs.pop("arch")
    return (build_classifier if family == "classifier" else build_segmenter)(arch, **kwargs)


def layouts(family: str, kwargs: dict) -> dict[str, torch.nn.Module]:
    """The registry's network (channels-last) and the same weights in NCHW."""
    last = _build(family, kwargs)
    first = _build(family, kwargs).to(memory_format=torch.contiguous_format)
    first.load_state_dict(last.state_dict())
    return {"NCHW": first, "channels-last": last}


class _Steps:
    """A training step and an inference batch of one network on one batch ``x``."""

    def __init__(self, net: torch.nn.Module, x: torch.Tensor):
        self.net, self.x = net, x
        self.optim = torch.optim.Adam(net.parameters(), lr=1e-4)

    def train(self) -> None:
        self.net.train()
        self.optim.zero_grad()
        self.net(self.x).float().square().mean().backward()
        self.optim.step()

    def infer(self) -> None:
        self.net.eval()
        with torch.no_grad():
            self.net(self.x)


def measure(rounds: int = 5, networks=NETWORKS) -> list[dict]:
    """One row per network: median seconds per training step and per inference batch in
    each layout, their ratios, and the largest difference between the layouts' outputs."""
    rows = []
    for name, family, kwargs, side, batch in networks:
        torch.manual_seed(0)
        x = torch.rand(batch, 3, side, side)
        nets = layouts(family, kwargs)
        with torch.no_grad():
            outs = {k: n.eval()(x) for k, n in nets.items()}
        diff = float((outs["NCHW"] - outs["channels-last"]).abs().max())
        steps = {k: _Steps(n, x) for k, n in nets.items()}
        row = {"network": name, "side": side, "batch": batch, "max_abs_diff": diff}
        for what in ("train", "infer"):
            times: dict[str, list[float]] = {k: [] for k in steps}
            for k in steps:  # warm-up: oneDNN picks its kernels
                getattr(steps[k], what)()
            for r in range(rounds):  # alternate which layout goes first
                for k in list(steps)[:: 1 if r % 2 == 0 else -1]:
                    start = time.perf_counter()
                    getattr(steps[k], what)()
                    times[k].append(time.perf_counter() - start)
            for k, t in times.items():
                row[f"{what}_{k}"] = statistics.median(t)
            row[f"{what}_ratio"] = row[f"{what}_channels-last"] / row[f"{what}_NCHW"]
        rows.append(row)
    return rows


def report(rows: list[dict], threads: int, command: str) -> str:
    lines = [
        "# Channels-last networks against NCHW, side by side",
        "",
        f"Made by `{command}` on {machine()}, {threads} thread(s); medians of alternating "
        "rounds. Ratio: channels-last's time over NCHW's (below 1: faster).",
        "",
        "| network | side, batch | train step NCHW ms | channels-last ms | ratio "
        "| inference NCHW ms | channels-last ms | ratio | outputs differ by |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['network']} | {r['side']} px, {r['batch']} "
            f"| {1e3 * r['train_NCHW']:.0f} | {1e3 * r['train_channels-last']:.0f} "
            f"| {r['train_ratio']:.2f} | {1e3 * r['infer_NCHW']:.0f} "
            f"| {1e3 * r['infer_channels-last']:.0f} | {r['infer_ratio']:.2f} "
            f"| {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--report", default="reports/bench/memory_format.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.rounds)
    command = "python -m benchmarks.memory_format" + (
        f" --threads {args.threads}" if args.threads != 1 else ""
    )
    text = report(rows, args.threads, command)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
