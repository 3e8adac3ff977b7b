"""Reload and load, as Triton's own QA tests them (qa/L0_lifecycle, qa/L0_model_update): the
ensemble under 16 concurrent clients while versions change, break, and stubs die.

Every wait is on a condition (a model state, a count of answers), never a fixed sleep.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import tritonclient.grpc as grpc

from export.check import check_repository
from export.repository import export_repository
from serving import health
from serving.server import TritonServer
from tests.conftest import random_export_cfg, wait_for, write_random_checkpoints
from training.pipeline import pipeline_from_config
from wsss.tensors import (
    CAMS,
    CLASSIFIER,
    ENSEMBLES,
    IMAGE,
    PIPELINE,
    PIPELINE_BYTES,
    POSTPROCESS,
    PREPROCESS,
    PSEUDO_MASK,
    SCORES,
    SEGMENTATION,
    SEGMENTATION_FULL,
    SEGMENTER,
)

pytestmark = [pytest.mark.slow, pytest.mark.triton]

CONCURRENCY = 16
CHECKED = (SCORES, PSEUDO_MASK, SEGMENTATION)


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    if np.issubdtype(want.dtype, np.floating):
        return np.allclose(got, want, atol=1e-3)
    return (got != want).mean() <= 0.01  # argmax masks: near-ties, Otsu within one bin


class Load:
    """``CONCURRENCY`` threads sending one image each to ``wsss_pipeline`` until stopped; every
    answer is checked, tensor by tensor, against the in-process outputs of each version."""

    def __init__(self, url: str, images: np.ndarray, references: dict[str, dict]):
        self.url, self.images, self.references = url, images, references
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers = dict.fromkeys(references, 0)  # tensors equal to that version's
        self.failures: list[str] = []
        self.mismatches: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CONCURRENCY)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()

    def count(self, version: str) -> int:
        with self.lock:
            return self.answers[version]

    def _run(self, worker: int) -> None:
        client = grpc.InferenceServerClient(self.url)
        outputs = [grpc.InferRequestedOutput(n) for n in CHECKED]
        k = worker
        while not self.stop.is_set():
            index = k % len(self.images)
            tensor = grpc.InferInput(IMAGE, [1, *self.images.shape[1:]], "UINT8")
            tensor.set_data_from_numpy(self.images[index : index + 1])
            try:
                result = client.infer(PIPELINE, [tensor], outputs=outputs)
            except Exception as exc:
                with self.lock:
                    self.failures.append(str(exc))
                continue
            for name in CHECKED:
                got = result.as_numpy(name)[0]
                matched = [v for v, ref in self.references.items() if _close(got, ref[name][index])]
                with self.lock:
                    if not matched:
                        self.mismatches.append(f"{name} of image {index}")
                    elif name == SCORES:  # the classifier's version tells the answer's
                        self.answers[matched[0]] += 1
            k += CONCURRENCY
        client.close()


def _images(n=4, size=48):
    return np.random.default_rng(7).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _state(server, client, model: str, version: str) -> str:
    for m in client.get_model_repository_index(headers=server.admin_headers()).models:
        if m.name == model and m.version == version:
            return m.state
    return ""


def _load_all(server, client) -> None:
    """Explicit model control: load what changed, composing models before ensembles (the
    repository API answers only to the server's key)."""
    for name in (CLASSIFIER, "refiner", SEGMENTER, PREPROCESS, POSTPROCESS, *ENSEMBLES):
        client.load_model(name, headers=server.admin_headers())


@pytest.fixture(params=["poll", "explicit"])
def live(request, tmp_path):
    cfg = random_export_cfg(tmp_path, f"serve.model_control={request.param}")
    export_repository(cfg)
    with TritonServer(Path(cfg.export.repository), cfg.serve, tmp_path / "server") as server:
        client = grpc.InferenceServerClient(server.grpc_url)
        yield cfg, server, client
        client.close()


def test_reexport_under_load_fails_nothing_and_answers_old_or_new(live):
    cfg, server, client = live
    images = _images()
    old = pipeline_from_config(cfg)(images)
    torch.manual_seed(123)  # other weights: the new version answers differently
    write_random_checkpoints(cfg.runs)
    new = pipeline_from_config(cfg)(images)
    assert not np.allclose(old[SCORES], new[SCORES], atol=1e-3)
    with Load(server.grpc_url, images, {"old": old, "new": new}) as load:
        wait_for(lambda: load.count("old") >= 50, what="answers from the old version")
        version = export_repository(cfg).version
        if cfg.serve.model_control == "explicit":
            _load_all(server, client)
        wait_for(lambda: load.count("new") >= 50, what="answers from the new version")
        # The old versions unload while the load goes on: the server is ready again (what
        # a health check on /v2/health/ready sees).
        wait_for(client.is_server_ready, timeout=60, what="the server ready under load")
    assert load.failures == [], load.failures[:3]
    assert load.mismatches == [], load.mismatches[:3]
    assert client.is_model_ready(CLASSIFIER, str(version))
    # Triton's own counters agree: every request a success, time spent in the classifier.
    answered = load.count("old") + load.count("new")
    wait_for(
        lambda: _metric(cfg, "nv_inference_request_success", PIPELINE) >= answered,
        what="the success counter",
    )
    assert _metric(cfg, "nv_inference_request_failure", PIPELINE) == 0
    assert _metric(cfg, "nv_inference_compute_infer_duration_us", CLASSIFIER) > 0


def _metric(cfg, name: str, model: str) -> float:
    """Sum over versions of one Prometheus counter of ``model`` from Triton's /metrics."""
    url = f"http://{cfg.serve.host}:{cfg.serve.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    pattern = re.compile(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', re.M)
    return sum(float(v) for v in pattern.findall(text))


def _corrupt(repo: Path, version: int) -> str:
    (repo / CLASSIFIER / str(version) / "model.onnx").write_bytes(b"not an onnx model")
    return "does not load"


def _renamed_output(repo: Path, version: int) -> str:
    path = repo / CLASSIFIER / str(version) / "model.onnx"
    model = onnx.load(str(path))
    for node in model.graph.node:
        node.output[:] = ["CAMS_RENAMED" if o == CAMS else o for o in node.output]
    for out in model.graph.output:
        if out.name == CAMS:
            out.name = "CAMS_RENAMED"
    onnx.save(model, str(path))
    return CAMS


def test_broken_versions_are_refused_and_the_old_keeps_serving(live):
    """Version 2 lands corrupt, then version 3 with an output renamed; one server sees both
    (a server start per breakage cost the suite a minute for the same checks)."""
    cfg, server, client = live
    repo = Path(cfg.export.repository)
    images = _images()
    old = pipeline_from_config(cfg)(images)
    problems = []
    with Load(server.grpc_url, images, {"old": old}) as load:
        wait_for(lambda: load.count("old") >= 50, what="answers")
        for version, breakage in ((2, _corrupt), (3, _renamed_output)):
            # A new version lands beside the old one, then is broken the way a hand-copied
            # or half-synced repository would be (wsss export itself refuses such a file).
            staged = repo.parent / "broken" / str(version)
            staged.mkdir(parents=True)
            (staged / "model.onnx").write_bytes(
                (repo / CLASSIFIER / "1" / "model.onnx").read_bytes()
            )
            os.rename(staged, repo / CLASSIFIER / str(version))
            problems.append(breakage(repo, version))
            config = repo / CLASSIFIER / "config.pbtxt"
            last = f"versions: {version - 1}"
            config.write_text(config.read_text().replace(last, f"{last}\n    versions: {version}"))
            if cfg.serve.model_control == "explicit":
                with pytest.raises(Exception, match="load failed"):
                    client.load_model(CLASSIFIER, headers=server.admin_headers())
            wait_for(
                lambda v=version: _state(server, client, CLASSIFIER, str(v)) == "UNAVAILABLE",
                what=f"version {version} refused",
            )
            seen = load.count("old")
            wait_for(lambda s=seen: load.count("old") >= s + 50, what="answers after it")
    assert load.failures == [], load.failures[:3]
    assert load.mismatches == [], load.mismatches[:3]
    assert client.is_model_ready(CLASSIFIER, "1") and client.is_model_ready(PIPELINE)
    report = str(check_repository(repo))
    for version, problem in zip((2, 3), problems, strict=True):
        assert f"classifier v{version}" in report and problem in report, report


def test_readiness_follows_the_steps_an_ensemble_needs(tmp_path):
    cfg = random_export_cfg(tmp_path, "serve.model_control=explicit")
    export_repository(cfg)
    with TritonServer(Path(cfg.export.repository), cfg.serve, tmp_path / "server") as server:
        client = grpc.InferenceServerClient(server.grpc_url)
        assert client.is_model_ready(PIPELINE) and client.is_model_ready(PIPELINE_BYTES)
        client.unload_model(SEGMENTER, headers=server.admin_headers())
        wait_for(lambda: not client.is_model_ready(PIPELINE), what="the ensemble not ready")
        assert not client.is_model_ready(PIPELINE_BYTES)
        client.load_model(SEGMENTER, headers=server.admin_headers())
        wait_for(lambda: client.is_model_ready(PIPELINE), what="the ensemble ready again")
        assert client.is_model_ready(PIPELINE_BYTES)
        client.close()


def _stub_pid(server, model: str) -> int:
    root = str(server.repository.resolve())
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[1].decode(errors="replace").startswith(f"{root}/{model}/"):
            return int(proc.name)
    raise AssertionError(f"no stub for {model}")


def test_a_killed_stub_is_reported_and_reloaded(live):
    """Triton 2.51 keeps a model whose stub died READY and fails its requests; the server's
    watchdog (on under `wsss serve`) finds the dead stub and reloads the model."""
    cfg, server, client = live
    images = _images()
    pid = _stub_pid(server, PREPROCESS)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (PREPROCESS, "1") in server.dead_instances(client), what="the dead stub")
    # What the serve-gpu image has instead of the watchdog: the ensembles stay READY, and
    # only the health check's inference sees the dead stub.
    base = f"http://{server.http_url}"
    assert health.ready(base, [PIPELINE, PIPELINE_BYTES]) is None
    problem = health.answers(base, timeout=30)
    assert problem is not None and "HTTP 500" in problem and "not healthy" in problem, problem
    server.watch(0.2)
    from serving.client import ClientError, PipelineClient

    bytes_client = PipelineClient(server.grpc_url, model=PIPELINE_BYTES)

    def served() -> bool:
        try:
            return bytes_client.infer(images[:1])[SEGMENTATION_FULL].shape == (1, 48, 48)
        except ClientError:  # "Stub process 'preprocess_0_0' is not healthy" until reloaded
            return False

    try:
        wait_for(served, what="the bytes ensemble serving again")
    finally:
        bytes_client.close()  # an open client makes tritonserver wait out its exit timeout
    assert _stub_pid(server, PREPROCESS) != pid and not server.dead_instances(client)
    assert health.answers(base, timeout=30) is None
