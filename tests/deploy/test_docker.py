"""The serve-cpu image, built and run for real: a base image from a debootstrap rootfs, the
image built on it, run on the tiny exported repository with the host's network, its answers
over gRPC and HTTP equal to the local server's, its health check healthy, and SIGTERM to the
container a quick clean stop with status 0. Everything started here is stopped here.

The engine's data root is a cache (tests/docker_engine.py): cold, the base image and the
build take a few minutes; warm, the build is a cache hit and the test takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from serving.client import PipelineClient
from serving.health import ready
from serving.server import free_ports
from tests.conftest import ROOT
from tests.docker_engine import Engine, missing
from wsss.served.images import encode_png
from wsss.tensors import PIPELINE, PIPELINE_BYTES

pytestmark = [pytest.mark.docker, pytest.mark.slow]

BASE = "wsss-base:bookworm"
IMAGE = "wsss:serve-cpu"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    reason = missing()
    if reason:
        pytest.skip(f"no Docker engine can be started here: {reason}")
    with Engine() as engine:
        yield engine


@pytest.fixture(scope="module")
def image(engine, tmp_path_factory):
    """`make image-base` and `make image-cpu` as docs/deployment.md runs them (cached layers)."""
    log = tmp_path_factory.mktemp("docker") / "build.log"
    for target in (["image-base"], ["image-cpu", f"BASE_IMAGE={BASE}"]):
        with log.open("a") as out:
            done = subprocess.run(
                ["make", "--no-print-directory", *target], cwd=ROOT, env=engine.env,
                stdout=out, stderr=subprocess.STDOUT, timeout=1800,
            )  # fmt: skip
        if done.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            pytest.fail(f"make {target[0]} failed ({done.returncode}):\n{tail}")
    return IMAGE


@pytest.fixture
def container(engine, image, exported):
    """serve-cpu on the exported repository (mounted read-only), on free loopback ports."""
    ports = dict(zip(("HTTP_PORT", "GRPC_PORT", "METRICS_PORT"), free_ports(3), strict=True))
    name = f"wsss-test-{os.getpid()}-{ports['HTTP_PORT']}"
    repository = Path(exported.export.repository).resolve()
    args = ["run", "--detach", "--name", name, "--network", "host", "--health-interval=1s"]
    for key, value in ports.items():
        args += ["--env", f"{key}={value}"]
    args += ["--volume", f"{repository}:/var/lib/wsss/model_repository:ro", image]
    engine.docker(*args)
    try:
        yield name, ports
    finally:
        engine.docker("rm", "--force", name, check=False)


def _state(engine, name: str) -> dict:
    return json.loads(engine.docker("inspect", "--format", "{{json .State}}", name).stdout)


def _wait_ready(engine, name: str, http_port: int, timeout: float = 180) -> None:
    """Until Triton and both ensembles answer ready; fails at once if the container exits."""
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _state(engine, name)["Running"]:
            logs = engine.docker("logs", "--tail", "40", name, check=False)
            pytest.fail(f"the container exited:\n{logs.stdout}{logs.stderr}")
        if ready(base, [PIPELINE, PIPELINE_BYTES], timeout=2) is None:
            return
        time.sleep(0.5)
    pytest.fail(f"not ready after {timeout:.0f} s")


def _wait_healthy(engine, name: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = _state(engine, name).get("Health", {}).get("Status")
        if status == "healthy":
            return status
        time.sleep(0.5)
    return status


def test_serve_cpu_image_answers_as_the_local_server(engine, container, server, exported):
    name, ports = container
    _wait_ready(engine, name, ports["HTTP_PORT"])
    assert _wait_healthy(engine, name) == "healthy"

    rng = np.random.default_rng(0)
    size = exported.data.image_size
    images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    blobs = [encode_png(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))]
    local = {p: server.grpc_url if p == "grpc" else server.http_url for p in ("grpc", "http")}
    ours = {"grpc": f"127.0.0.1:{ports['GRPC_PORT']}", "http": f"127.0.0.1:{ports['HTTP_PORT']}"}
    for protocol in ("grpc", "http"):
        for model, send in ((PIPELINE, images), (PIPELINE_BYTES, blobs)):
            answers = []
            for url in (local[protocol], ours[protocol]):
                client = PipelineClient(url, protocol, model)
                try:
                    if model == PIPELINE:
                        answers.append(client.infer(send))
                    else:
                        answers.append(client.infer_encoded(send))
                finally:
                    client.close()  # an open connection would delay the server's stop
            want, got = answers
            assert set(got) == set(want)
            for key in want:  # the same ONNX Runtime release and code: equal outputs
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{model} {key}")

    # SIGTERM, as `docker stop` sends it: a quick stop with status 0, and the container's
    # whole process tree (tritonserver, its Python stubs) gone with it.
    started = time.monotonic()
    engine.docker("kill", "--signal", "TERM", name)
    code = engine.docker("wait", name, timeout=60).stdout.strip()
    elapsed = time.monotonic() - started
    logs = engine.docker("logs", name, check=False)
    assert code == "0", f"exit status {code}:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
    assert elapsed < 20, f"the stop took {elapsed:.1f} s"
    assert "Traceback" not in logs.stdout + logs.stderr
    assert not _state(engine, name)["OOMKilled"]
