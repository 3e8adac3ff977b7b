"""Retrain-and-re-export into a running, polling tritonserver."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.check import check_repository
from export.lock import staging_root
from export.repository import export_repository
from serving.client import PipelineClient
from serving.server import TritonServer
from tests.conftest import random_export_cfg, wait_for
from training.pipeline import pipeline_from_config
from training.torch_refiners import build_refiner
from wsss.config import RefineConfig, load_config, served_config
from wsss.tensors import CHAINS, PIPELINE

pytestmark = [pytest.mark.slow, pytest.mark.triton]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    work = tmp_path_factory.mktemp("live")
    cfg = random_export_cfg(work, "export.keep_versions=2")
    export_repository(cfg)
    with TritonServer(Path(cfg.export.repository), cfg.serve, work / "server") as server:
        yield cfg, server


def _images(n=2, size=48):
    return np.random.default_rng(3).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _snapshot(repo):
    return {p: p.read_bytes() for p in sorted(Path(repo).rglob("*")) if p.is_file()}


def test_a_new_export_is_picked_up_while_serving(live):
    cfg, server = live
    client = PipelineClient(server.grpc_url)
    before = client.infer(_images())
    assert export_repository(cfg).version == 2
    wait_for(lambda: client.client.is_model_ready("classifier", "2"), 60, "classifier v2")
    assert client.client.is_model_ready("classifier", "1")  # keep_versions=2
    after = client.infer(_images())  # same weights re-exported: same answers
    np.testing.assert_allclose(after["SCORES"], before["SCORES"], atol=1e-5)


def test_a_killed_export_leaves_the_served_version(live):
    cfg, server = live
    repo = Path(cfg.export.repository)
    before = _snapshot(repo)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    sets = [
        x
        for o in (
            f"data.image_size={cfg.data.image_size}",
            f"runs={cfg.runs}",
            f"export.repository={repo}",
        )
        for x in ("--set", o)
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "export", *sets],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill it midway: once it has started writing the new version into its staging folder.
    staged = lambda: list(staging_root(repo).glob(f"*-{proc.pid}-*/classifier/*/model.onnx"))  # noqa: E731
    wait_for(staged, 120, "the export to reach its staging step")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _snapshot(repo) == before
    assert check_repository(repo).ok
    client = PipelineClient(server.grpc_url)
    # Wait for a poll that began after the kill: one that loads a canary model added now.
    canary = repo / "poll_canary"
    shutil.copytree(repo / "postprocess", canary)
    config = canary / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "postprocess"', 'name: "poll_canary"'))
    wait_for(lambda: client.client.is_model_ready("poll_canary"), 60, "the poll to load a model")
    shutil.rmtree(canary)
    assert client.client.is_model_ready("classifier", "2")
    assert not client.client.is_model_ready("classifier", "3")
    assert client.infer(_images())["SEGMENTATION"].shape == (2, 48, 48)
    # The next export sweeps the dead export's staging folder and carries on from v2.
    assert export_repository(cfg).version == 3
    assert not list(repo.parent.glob(".wsss-staging-*"))


def test_torchscript_export_is_served_and_matches_pytorch(live):
    cfg, server = live
    cfg.export.classifier.format = "torchscript"
    cfg.export.segmenter.format = "torchscript"
    version = export_repository(cfg).version
    client = PipelineClient(server.grpc_url)
    wait_for(
        lambda: client.client.is_model_ready("classifier", str(version)), 60, "the new classifier"
    )

    # A format switch renames the classifier's tensors (CAMS -> CAMS__1); the poller may
    # load the classifier one poll before the ensemble that maps them, so wait for both.
    def ensemble_switched():
        chain = client.client.get_model_config(CHAINS[PIPELINE]).config
        steps = chain.ensemble_scheduling.step
        return "CAMS__1" in steps[0].output_map and client.client.is_model_ready(PIPELINE)

    wait_for(ensemble_switched, 60, "the ensemble to switch")
    config = client.client.get_model_config("classifier").config
    assert config.backend == "pytorch" and list(config.version_policy.specific.versions) == [
        version
    ]
    images = _images(3)
    got = client.infer(images)
    want = pipeline_from_config(cfg)(images)
    np.testing.assert_allclose(got["SCORES"], want["SCORES"], atol=1e-4)
    np.testing.assert_allclose(got["CAMS"], want["CAMS"], atol=1e-3)
    assert (got["SEGMENTATION"] != want["SEGMENTATION"]).mean() <= 1e-3


def test_served_refiner_follows_the_refine_and_cam_settings(live):
    """Re-export with Grad-CAM++ and Otsu + GrabCut: the ensemble matches the same pipeline."""
    cfg, server = live
    cfg.classifier.cam_method = "gradcam++"
    cfg.refine.grabcut = True
    cfg.refine.grabcut_iterations = 2
    version = export_repository(cfg).version
    client = PipelineClient(server.grpc_url)
    wait_for(lambda: client.client.is_model_ready("refiner", str(version)), 60, "the new refiner")
    wait_for(
        lambda: client.client.is_model_ready("classifier", str(version)), 60, "the new classifier"
    )
    images = _images(2)
    want = pipeline_from_config(cfg)(images)
    # The ensembles reload on the same poll or the next: wait until the served CAMs are the
    # Grad-CAM++ ones.
    wait_for(
        lambda: np.allclose(client.infer(images)["CAMS"], want["CAMS"], atol=1e-3),
        60,
        "the new CAMS",
    )
    got = client.infer(images)
    # GrabCut turns CAM differences of ~1e-5 (ONNX Runtime vs PyTorch) into a few boundary
    # pixels, so the refiner is checked on the served CAMs themselves: exactly equal.
    refiner = build_refiner(cfg.refine, multi_label=False)
    expected = refiner(images, got["SCORES"], got["CAMS"])
    assert expected.any() and np.array_equal(got["PSEUDO_MASK"], expected)
    assert refiner.name == "otsu+grabcut"

    # export.refine serves another refiner than the one that made the training masks: a
    # fixed threshold, as an ONNX graph; the export's saved config keeps both.
    cfg.export.refine = RefineConfig(method="fixed", threshold=0.4)
    version = export_repository(cfg).version
    wait_for(lambda: client.client.is_model_ready("refiner", str(version)), 60, "the new refiner")
    assert client.client.get_model_config("refiner").config.backend == "onnxruntime"

    fixed = build_refiner(cfg.export.refine, multi_label=False)

    def served_threshold() -> bool:  # the ensemble reloads on this poll or the next
        got = client.infer(images)
        return np.array_equal(got["PSEUDO_MASK"], fixed(images, got["SCORES"], got["CAMS"]))

    wait_for(served_threshold, 60, "the new threshold")
    folder = Path(cfg.export.repository) / "classifier" / str(version)
    saved = load_config(folder / "wsss_config.yaml")
    assert saved.refine.grabcut and saved.export.refine.method == "fixed"
    assert (
        fixed.name == "fixed" and pipeline_from_config(served_config(cfg)).refiner.name == "fixed"
    )


def test_deeplabv3_segmenter_is_exported_and_served(tmp_path):
    """The served ensemble runs the segmenter the config names: DeepLabV3 here, with the
    networks at their default two instances (other tests serve one)."""
    seg = ("deeplabv3", {"backbone": "mobilenet_v2", "output_stride": 16})
    two = ["export.classifier.instances=2", "export.segmenter.instances=2"]
    cfg = random_export_cfg(tmp_path, "segmenter.arch=deeplabv3", *two, segmenter=seg)
    result = export_repository(cfg)
    assert result.parity["segmenter"]["SEG_PROBS"] < 1e-3
    images = _images(3)
    want = pipeline_from_config(cfg)(images)
    with TritonServer(Path(cfg.export.repository), cfg.serve, tmp_path / "server") as server:
        grpc_client = PipelineClient(server.grpc_url)
        config = grpc_client.client.get_model_config("segmenter").config
        assert config.instance_group[0].count == 2
        grpc_client.close()
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            client = PipelineClient(url, protocol)
            got = client.infer(images)
            client.close()
            np.testing.assert_allclose(got["SEG_PROBS"], want["SEG_PROBS"], atol=1e-3)
            assert (got["SEGMENTATION"] != want["SEGMENTATION"]).mean() <= 1e-3
