"""Container health check: exit 0 when Triton is live and each model named is ready.

    python -m serving.health [MODEL ...]

With models named, the server's own ``/v2/health/ready`` is not asked: it answers 400 as long
as any version of any model is not READY, and after a re-export under load an old ensemble
version was seen to stay UNLOADING for over 90 s (Triton 2.51) while the new one served every
request, so a container would turn unhealthy for no fault. What clients need is the
ensembles: they turn UNAVAILABLE when a step is unloaded or broken. With no model named,
``/v2/health/ready`` is the check. Standard library only (HEALTHCHECK runs it often), and each
request closes its connection: an open one would make tritonserver wait out its exit
timeout when the container is stopped.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


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


def main(argv: list[str] | None = None) -> int:
    host = os.environ.get("HEALTH_HOST", "127.0.0.1")
    base = f"http://{host}:{os.environ.get('HTTP_PORT', '8000')}"
    problem = ready(base, list(sys.argv[1:] if argv is None else argv))
    if problem:
        print(f"not ready: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
