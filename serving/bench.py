"""perf_analyzer against the ensemble: throughput and latency per concurrency level.

Uses the perf_analyzer bundled in ``tritonclient[all]==2.51.0`` (the PyPI perf-analyzer wheels
need a newer glibc than Debian 12's). It links against ``libb64.so.0d`` and
``libcudart.so.12``, which the nvidia-pytriton wheel ships under mangled names: we point
stable symlinks at them. The ``--shape`` flags are generated from the tensor specs.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from serving.server import pytriton_root
from wsss.tensors import ModelSpec


class BenchError(RuntimeError):
    pass


def perf_analyzer_binary() -> Path:
    path = Path(sys.executable).parent / "perf_analyzer"
    if not path.exists():
        found = shutil.which("perf_analyzer")
        if not found:
            raise BenchError("perf_analyzer not found: run `make setup`")
        path = Path(found)
    return path


def perf_analyzer_env(workdir: Path) -> dict[str, str]:
    libs = pytriton_root().parent.parent / "nvidia_pytriton.libs"
    links = workdir / "perf_libs"
    links.mkdir(parents=True, exist_ok=True)
    for pattern, name in (
        ("libb64-*.so.0d", "libb64.so.0d"),
        ("libcudart-*.so.12*", "libcudart.so.12"),
    ):
        matches = sorted(libs.glob(pattern))
        if not matches:
            raise BenchError(f"{libs} has no {pattern}: reinstall nvidia-pytriton")
        link = links / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(matches[0])
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(links), str(libs), env.get("LD_LIBRARY_PATH", "")) if p
    )
    return env


def shape_flags(spec: ModelSpec) -> list[str]:
    """``--shape NAME:d1,d2,...`` for every input, from the spec (batch dimension excluded)."""
    return [f"--shape={t.name}:{','.join(str(d) for d in t.shape)}" for t in spec.inputs]


@dataclass
class BenchResult:
    concurrency: int
    throughput: float  # inferences per second
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float


def perf_command(
    spec: ModelSpec,
    url: str,
    protocol: str,
    batch: int,
    concurrency: str,
    interval_ms: int,
    csv_path: Path,
) -> list[str]:
    return [
        str(perf_analyzer_binary()),
        "-m",
        spec.name,
        "-u",
        url,
        "-i",
        protocol,
        "-b",
        str(batch),
        f"--concurrency-range={concurrency}",
        f"--measurement-interval={interval_ms}",
        "--stability-percentage=50",
        "--max-trials=6",
        "-f",
        str(csv_path),
        *shape_flags(spec),
    ]


def run_perf_analyzer(
    spec: ModelSpec,
    url: str,
    protocol: str = "grpc",
    batch: int = 1,
    concurrency: str = "1:2",
    interval_ms: int = 3000,
    workdir: Path = Path(".cache/bench"),
    timeout: float = 600,
) -> list[BenchResult]:
    workdir.mkdir(parents=True, exist_ok=True)
    csv_path = workdir / f"perf_{spec.name}_{protocol}_b{batch}.csv"
    cmd = perf_command(spec, url, protocol, batch, concurrency, interval_ms, csv_path)
    proc = subprocess.run(
        cmd, env=perf_analyzer_env(workdir), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise BenchError(f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return parse_csv(csv_path)


def parse_csv(path: Path) -> list[BenchResult]:
    rows = list(csv.DictReader(path.open()))
    if not rows:
        raise BenchError(f"{path}: perf_analyzer wrote no measurements")
    # Percentiles only: for an ensemble the CSV's server-side parts add up the composing
    # models, which overlap in time, so they do not sum to a request's latency.
    return [
        BenchResult(
            int(r["Concurrency"]),
            float(r["Inferences/Second"]),
            *(float(r[f"p{q} latency"]) / 1e3 for q in (50, 90, 95, 99)),
        )
        for r in rows
    ]


def format_table(results: list[BenchResult], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| concurrency | infer/s | p50 ms | p90 ms | p95 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.concurrency} | {r.throughput:.1f} | {r.p50_ms:.1f} | {r.p90_ms:.1f} | "
        f"{r.p95_ms:.1f} | {r.p99_ms:.1f} |"
        for r in results
    ]
    return "\n".join(lines)
