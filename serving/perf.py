"""perf_analyzer against the ensemble: throughput and latency per concurrency level.

Uses the perf_analyzer bundled in ``tritonclient[all]==2.51.0`` (the PyPI perf-analyzer wheels
need a newer glibc than Debian 12's). It links against ``libb64.so.0d`` and
``libcudart.so.12``, which the nvidia-pytriton wheel ships under mangled names: we point
stable symlinks at them. The ``--shape`` flags are generated from the tensor specs.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tritonclient.utils import serialize_byte_tensor

from serving.server import pytriton_root
from wsss.errors import WsssError
from wsss.served.images import decode_resized, encode_png, resize_image
from wsss.tensors import ModelSpec


class BenchError(WsssError, RuntimeError):
    """perf_analyzer could not run, or produced no measurement."""


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
    """``--shape NAME:d1,d2,...`` for every fixed-shape input (batch dimension excluded)."""
    return [
        f"--shape={t.name}:{','.join(str(d) for d in t.shape)}"
        for t in spec.inputs
        if -1 not in t.shape
    ]


def output_bytes(spec: ModelSpec) -> int:
    """The largest output of one item, in bytes: perf_analyzer's shared-memory region size."""
    sizes = []
    for t in spec.outputs:
        if -1 in t.shape or t.dtype == "bytes":
            raise BenchError(f"{spec.name}.{t.name} has no fixed size: no shared memory for it")
        sizes.append(int(np.prod(t.shape)) * t.np_dtype.itemsize)
    return max(sizes)


def sample_image(size: int = 160) -> np.ndarray:
    """A deterministic RGB test card, for when no real image is given."""
    yy, xx = np.mgrid[:size, :size]
    return np.stack([xx * 255 // size, yy * 255 // size, (xx ^ yy) & 255], -1).astype(np.uint8)


def input_data(spec: ModelSpec, images: list[np.ndarray | bytes]) -> dict:
    """perf_analyzer's ``--input-data`` JSON: one entry per image, for the model's one input.

    Pixel inputs get the image resized to the spec's shape; bytes inputs get it PNG-encoded,
    or as it is where it comes encoded already (a file's own bytes).
    """
    (tensor,) = spec.inputs
    entries = []
    for image in images:
        if tensor.dtype == "bytes":
            data = image if isinstance(image, bytes) else encode_png(image)
            # b64 is the raw serialized BYTES tensor (Triton's length-prefixed elements).
            raw = serialize_byte_tensor(np.array([data], np.object_)).item()
            entries.append({tensor.name: {"b64": base64.b64encode(raw).decode()}})
        else:
            size = tensor.shape[:2]
            if isinstance(image, bytes):
                pixels = decode_resized(image, size)[0]
            else:
                pixels = resize_image(image, size)
            entries.append(
                {tensor.name: {"content": pixels.ravel().tolist(), "shape": list(pixels.shape)}}
            )
    return {"data": entries}


@dataclass
class BenchResult:
    concurrency: int
    throughput: float  # inferences per second
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    # False: perf_analyzer found no stable window for this level (a busy machine); the figures
    # are its last trial's throughput and average latency, and the percentiles are unknown.
    stable: bool = True
    mean_ms: float = float("nan")  # the average latency (given for unstable levels)


@dataclass
class PerfSettings:
    batch: int = 1
    concurrency: str = "1:4:1"  # start:end:step
    interval_ms: int = 3000  # time window per measurement
    stability_percent: float = 10.0  # perf_analyzer's own default
    max_trials: int = 10
    # > 0: measure windows of this many requests instead of fixed time (steadier when noisy)
    request_count: int = 0
    # "system": tensors travel through system shared memory instead of the socket
    shared_memory: str = "none"

    def __post_init__(self):
        """Refused here, in one line, rather than by perf_analyzer with its whole usage."""
        concurrency_levels(self.concurrency)
        for name in ("batch", "interval_ms", "max_trials"):
            if getattr(self, name) < 1:
                raise BenchError(f"{name.replace('_', '-')} {getattr(self, name)}: at least 1")
        if self.stability_percent <= 0 or self.request_count < 0:
            raise BenchError("stability is a percentage above 0, request-count 0 or more")
        if self.shared_memory not in ("none", "system"):
            raise BenchError(f"shared memory {self.shared_memory!r}: none or system")


def perf_command(
    spec: ModelSpec,
    url: str,
    protocol: str,
    settings: PerfSettings,
    csv_path: Path,
    data_path: Path,
) -> list[str]:
    cmd = [
        str(perf_analyzer_binary()),
        "-m",
        spec.name,
        "-u",
        url,
        "-i",
        protocol,
        "-b",
        str(settings.batch),
        f"--concurrency-range={settings.concurrency}",
        f"--stability-percentage={settings.stability_percent}",
        f"--max-trials={settings.max_trials}",
        f"--input-data={data_path}",
        "-f",
        str(csv_path),
        *shape_flags(spec),
    ]
    if settings.shared_memory != "none":
        cmd += [
            f"--shared-memory={settings.shared_memory}",
            f"--output-shared-memory-size={output_bytes(spec) * settings.batch}",
        ]
    if settings.request_count > 0:
        cmd += [
            "--measurement-mode=count_windows",
            f"--measurement-request-count={settings.request_count}",
        ]
    else:
        cmd.append(f"--measurement-interval={settings.interval_ms}")
    return cmd


def run_perf_analyzer(
    spec: ModelSpec,
    url: str,
    protocol: str = "grpc",
    settings: PerfSettings | None = None,
    images: list[np.ndarray | bytes] | None = None,
    workdir: Path = Path(".cache/bench"),
    timeout: float = 600,
) -> list[BenchResult]:
    settings = settings or PerfSettings()
    if settings.batch != 1 and any(t.dtype == "bytes" for t in spec.inputs):
        # perf_analyzer cannot spread one encoded image per batch item of a BYTES input; load
        # the server with concurrency instead (Triton's dynamic batcher batches server-side).
        raise BenchError(
            f"{spec.name} takes encoded images: benchmark it with batch 1 and raise --concurrency"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    stem = f"perf_{spec.name}_{protocol}_b{settings.batch}"
    data_path = workdir / f"{stem}_input.json"
    data_path.write_text(json.dumps(input_data(spec, images or [sample_image()])))
    results = []
    for level in concurrency_levels(settings.concurrency):
        csv_path = workdir / f"{stem}_c{level}.csv"
        one = dataclasses.replace(settings, concurrency=f"{level}:{level}:1")
        cmd = [*perf_command(spec, url, protocol, one, csv_path, data_path), "-v"]
        try:
            proc = subprocess.run(
                cmd, env=perf_analyzer_env(workdir), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(
                f"perf_analyzer ran past {timeout:.0f} s on {spec.name} (batch {settings.batch}, "
                f"concurrency {level}): its measurement windows take too long for this model "
                "here; measure lower concurrency or smaller batches"
            ) from exc
        if proc.returncode == 0:
            results += parse_csv(csv_path)
        elif "Failed to obtain stable measurement" in proc.stdout + proc.stderr and _PASS.search(
            proc.stdout
        ):
            throughput, latency_us = _PASS.findall(proc.stdout)[-1]
            nan = float("nan")
            results.append(
                BenchResult(
                    level, float(throughput), nan, nan, nan, nan, False, float(latency_us) / 1e3
                )
            )
        else:
            raise BenchError(
                f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
    return results


# perf_analyzer -v prints each trial: "Pass [3] throughput: 74.5 infer/sec. Avg latency: ..."
_PASS = re.compile(r"Pass \[\d+\] throughput: ([\d.]+) infer/sec\. Avg latency: (\d+) usec")


def concurrency_levels(spec: str) -> list[int]:
    """perf_analyzer's start:end:step (end and step optional) -> every level it names."""
    try:
        parts = [int(p) for p in spec.split(":")]
    except ValueError:
        raise BenchError(
            f"concurrency {spec!r}: want N or start:end[:step], whole numbers"
        ) from None
    start, end, step = (parts + [parts[0], 1][len(parts) - 1 :])[:3]
    if start < 1 or end < start or step < 1:
        raise BenchError(f"concurrency range {spec!r}: want start:end:step with 1 <= start <= end")
    return list(range(start, end + 1, step))


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
        for r in sorted(rows, key=lambda r: int(r["Concurrency"]))  # the CSV's order varies
    ]


def format_table(results: list[BenchResult], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| concurrency | infer/s | p50 ms | p90 ms | p95 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.stable:
            lines.append(
                f"| {r.concurrency} | {r.throughput:.1f} | {r.p50_ms:.1f} | {r.p90_ms:.1f} | "
                f"{r.p95_ms:.1f} | {r.p99_ms:.1f} |"
            )
        else:
            lines.append(
                f"| {r.concurrency} (unstable) | {r.throughput:.1f} | mean {r.mean_ms:.1f} | "
                "- | - | - |"
            )
    if not all(r.stable for r in results):
        lines += ["", "unstable: no window within the stability band; the last trial's figures."]
    return "\n".join(lines)


# Triton's cumulative per-model counters (GET /v2/models/stats), summed over versions.
_PARTS = ("queue", "compute_input", "compute_infer", "compute_output")


def model_statistics(url: str) -> dict[str, dict[str, int]]:
    """Per model: successful requests, executions (batches), inferences (items), and the
    nanoseconds spent queued and computing inputs, the model and outputs, since it loaded."""
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(as_json=True)
    finally:
        client.close()
    out: dict[str, dict[str, int]] = {}
    for model in stats.get("model_stats", []):
        s = model.get("inference_stats", {})
        d = out.setdefault(model["name"], dict.fromkeys(("requests", "executions", "items"), 0))
        d["requests"] += int(s.get("success", {}).get("count", 0))
        d["executions"] += int(model.get("execution_count", 0))
        d["items"] += int(model.get("inference_count", 0))
        for part in _PARTS:
            d[part] = d.get(part, 0) + int(s.get(part, {}).get("ns", 0))
    return out


def settled_statistics(url: str, timeout: float = 10.0) -> dict[str, dict[str, int]]:
    """``model_statistics`` once two reads in a row agree: Triton records a request's
    statistics as its steps release it, a moment after the client has its answer."""
    import time

    last = model_statistics(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = model_statistics(url)
        if now == last:
            break
        last = now
    return last


@dataclass
class ModelTime:
    """Where one model's time went over a measurement: per request, in microseconds."""

    requests: int
    mean_batch: float  # items per execution: what the dynamic batcher formed
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float


def statistics_delta(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, ModelTime]:
    """The per-request breakdown of every model that served requests between two snapshots."""
    out = {}
    for name, now in after.items():
        was = before.get(name, {})
        diff = {k: v - was.get(k, 0) for k, v in now.items()}
        if diff["requests"] <= 0:
            continue
        per = 1e-3 / diff["requests"]
        out[name] = ModelTime(
            diff["requests"],
            diff["items"] / max(diff["executions"], 1),
            *(diff[part] * per for part in _PARTS),
        )
    return out
