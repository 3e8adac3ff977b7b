"""Container health check: exit 0 when Triton is live and each model named is ready (and,
with ``--infer``, answers).

    python -m serving.health [--infer] [MODEL ...]

With models named, the server's own ``/v2/health/ready`` is not asked: it answers 400 as long
as any version of any model is not READY, and after a re-export under load an old ensemble
version was seen to stay UNLOADING for over 90 s (Triton 2.51) while the new one served every
request, so a container would turn unhealthy for no fault. What clients need is the
ensembles: they turn UNAVAILABLE when a step is unloaded. With no model named,
``/v2/health/ready`` is the check.

``--infer`` also sends the bytes ensemble one tiny PNG and fails on an error answer. Triton
2.51 keeps a Python model whose stub died READY and fails every request it gets ("Stub
process ... is not healthy"); `wsss serve` reloads such a model itself (its watchdog), but
the serve-gpu image runs tritonserver alone, so there only this check sees it (a Kubernetes
liveness probe then restarts the pod). A request that times out is not a failure: a server
busy with its clients' batches is no broken one, and ``/v2/health/live`` has already answered.

Standard library only (HEALTHCHECK runs it often, and the serve-gpu image copies this file
alone), and each request closes its connection: an open one would make tritonserver wait out
its exit timeout when the container is stopped.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import urllib.error
import urllib.request
import zlib

# What --infer asks of (served names, spelled here because this file stands alone: the
# tests check them against wsss.tensors).
INFER_MODEL, INFER_INPUT, INFER_OUTPUT = "wsss_pipeline_bytes", "IMAGE_BYTES", "SCORES"


def ready(base: str, models: list[str], timeout: float = 3.0) -> str | None:
    """None when the server is live and every model ready (or, with no models named, the
    server ready), else what was not."""
    paths = [f"/v2/models/{m}/ready" for m in models] if models else ["/v2/health/ready"]
    for path in ["/v2/health/live", *paths]:
        try:
            with urllib.request.urlopen(base + path, timeout=timeout) as response:
                if response.status != 200:
                    return f"{path}: HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:  # HTTPError (400, 503) included
            return f"{path}: {exc}"
    return None


def tiny_png(side: int = 32) -> bytes:
    """A ``side`` x ``side`` grey gradient as a PNG, written with zlib (no imaging library)."""
    rows = b"".join(
        b"\x00" + bytes((x + y) * 255 // (2 * side) for x in range(side) for _ in range(3))
        for y in range(side)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def infer_request(image: bytes) -> tuple[bytes, int]:
    """The body of one binary-extension HTTP inference request (KServe v2) sending ``image``
    to INFER_MODEL and asking INFER_OUTPUT as JSON, and its JSON header's length."""
    blob = struct.pack("<I", len(image)) + image  # a BYTES element: its length, then it
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": INFER_INPUT,
                    "datatype": "BYTES",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            "outputs": [{"name": INFER_OUTPUT, "parameters": {"binary_data": False}}],
        }
    ).encode()
    return header + blob, len(header)


def answers(base: str, timeout: float = 3.0) -> str | None:
    """None when INFER_MODEL answers a tiny PNG (or is too busy to answer in ``timeout``),
    else the error it answered."""
    body, length = infer_request(tiny_png())
    request = urllib.request.Request(
        f"{base}/v2/models/{INFER_MODEL}/infer",
        data=body,
        headers={
            "Inference-Header-Content-Length": str(length),
            "Content-Type": "application/octet-stream",
        },
        method="POST",
    )
    path = f"/v2/models/{INFER_MODEL}/infer"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            outputs = json.loads(response.read()).get("outputs", [])
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", "")
        except (ValueError, OSError):
            reason = ""
        return f"{path}: HTTP {exc.code} {reason}".rstrip()
    except TimeoutError:
        return None  # busy, not broken
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            return None
        return f"{path}: {exc.reason}"
    except (OSError, ValueError) as exc:
        return f"{path}: {exc}"
    if not any(o.get("name") == INFER_OUTPUT for o in outputs):
        return f"{path}: no {INFER_OUTPUT} in the answer"
    return None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    infer = "--infer" in args
    models = [a for a in args if a != "--infer"]
    host = os.environ.get("HEALTH_HOST", "127.0.0.1")
    base = f"http://{host}:{os.environ.get('HTTP_PORT', '8000')}"
    problem = ready(base, models)
    if problem:
        print(f"not ready: {problem}", file=sys.stderr)
        return 1
    if infer:
        problem = answers(base, float(os.environ.get("HEALTH_INFER_TIMEOUT", "3")))
        if problem:
            print(f"not answering: {problem}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
