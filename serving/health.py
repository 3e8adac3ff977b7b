"""Container health check: exit 0 when Triton is ready and so is each model named.

    python -m serving.health [MODEL ...]

Triton's ``/v2/health/ready`` alone is not enough: when a step of an ensemble is unloaded or
broken, the ensemble turns UNAVAILABLE while the server can stay ready, so the images name
the ensembles too. Standard library only (the images' HEALTHCHECK runs it often), and each
request closes its connection: an open one would make tritonserver wait out its exit
timeout when the container is stopped.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def ready(base: str, models: list[str], timeout: float = 3.0) -> str | None:
    """None when the server and every model answer 200, else what was not ready."""
    for path in ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models)]:
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
