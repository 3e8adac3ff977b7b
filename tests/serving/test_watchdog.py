"""The stub watchdog matches every instance, not only every model: Triton 2.51 keeps a model
whose stub died READY and hands every other request to the dead instance, so one live stub
of two must not hide the dead one. Fake process lists first, then the real server."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tritonclient.grpc as grpc
from tritonclient.grpc import model_config_pb2 as pb

import serving.server as triton
from serving.server import STUB, Process, TritonServer
from tests.conftest import wait_for
from tests.serving.conftest import ECHO
from wsss.config import ServeConfig

GROUP = 4242  # the fake server's pid, leader of its process group
KEY = "k" * 32
CPU, GPU = pb.ModelInstanceGroup.KIND_CPU, pb.ModelInstanceGroup.KIND_GPU


def _config(name: str, count: int, kind=CPU, gpus=()) -> pb.ModelConfig:
    group = pb.ModelInstanceGroup(name=f"{name}_0", count=count, kind=kind, gpus=gpus)
    return pb.ModelConfig(name=name, backend="python", instance_group=[group])


CONFIGS = {
    "classifier": _config("classifier", 2),  # the shipped default: two instances
    "preprocess": _config("preprocess", 1),
    "segmenter": _config("segmenter", 1, GPU, gpus=[0, 1]),  # one per GPU, the same name
    "wsss_pipeline": pb.ModelConfig(name="wsss_pipeline", platform="ensemble"),
}


def _stub(pid: int, repo: Path, model: str, instance: str, group=GROUP, state="S") -> Process:
    """A stub as /proc shows it under Triton 24.10: the instance's name is the 9th argument."""
    argv = (
        f"/srv/backends/python/{STUB}",
        f"{repo}/{model}/1/model.py",
        f"triton_python_backend_shm_region_{pid}",
        "1048576",
        "1048576",
        str(group),
        "/srv/backends/python",
        "336",
        instance,
        "/srv/backends/onnxruntime",
    )
    return Process(pid, argv, STUB, state, 0.0, group)


class FakeClient:
    """The gRPC client calls the watchdog makes, recording the headers it sends."""

    def __init__(self):
        self.calls: list[tuple[str, str, dict | None]] = []

    def get_model_repository_index(self, headers=None):
        self.calls.append(("index", "", headers))
        models = [SimpleNamespace(name=n, version="1", state="READY") for n in CONFIGS]
        return SimpleNamespace(models=models)

    def get_model_config(self, model_name, model_version="", headers=None):
        return SimpleNamespace(config=CONFIGS[model_name])

    def unload_model(self, model_name, headers=None):
        self.calls.append(("unload", model_name, headers))

    def load_model(self, model_name, headers=None):
        self.calls.append(("load", model_name, headers))

    def close(self):
        self.calls.append(("close", "", None))


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A started server (as far as the watchdog looks) with every stub alive."""
    repo = tmp_path / "repo"
    server = TritonServer(repo, ServeConfig(model_control="explicit"), tmp_path)
    server.process = SimpleNamespace(pid=GROUP)
    server.admin_key = KEY
    alive = [
        _stub(10, repo, "classifier", "classifier_0_0"),
        _stub(11, repo, "classifier", "classifier_0_1"),
        _stub(12, repo, "preprocess", "preprocess_0_0"),
        _stub(13, repo, "segmenter", "segmenter_0_0"),  # on GPU 0
        _stub(14, repo, "segmenter", "segmenter_0_0"),  # on GPU 1
    ]
    monkeypatch.setattr(triton, "processes", lambda: iter(alive))
    return server, alive, repo


def test_every_stub_alive_is_no_dead_stub(fake):
    server, _, _ = fake
    assert server.dead_instances(FakeClient()) == {}


def test_one_dead_instance_of_two_is_found(fake):
    """The old check kept a set of (model, version): classifier_0_0 hid classifier_0_1."""
    server, alive, _ = fake
    del alive[1]  # classifier_0_1 killed
    client = FakeClient()
    assert server.dead_instances(client) == {("classifier", "1"): ["classifier_0_1"]}


def test_a_dead_instance_on_one_gpu_of_two_is_found(fake):
    """Triton gives a KIND_GPU group's instances the same names on every GPU: counted."""
    server, alive, _ = fake
    del alive[4]
    assert server.dead_instances(FakeClient()) == {("segmenter", "1"): ["segmenter_0_0"]}


def test_zombies_and_other_servers_stubs_are_not_ours(fake):
    """A zombie has exited; a stub of another server on the same repository (a benchmark's
    beside `make serve`) serves none of this server's requests."""
    server, alive, repo = fake
    alive[1] = _stub(11, repo, "classifier", "classifier_0_1", state="Z")
    alive[2] = _stub(12, repo, "preprocess", "preprocess_0_0", group=GROUP + 1)
    assert server.dead_instances(FakeClient()) == {
        ("classifier", "1"): ["classifier_0_1"],
        ("preprocess", "1"): ["preprocess_0_0"],
    }


def test_the_watchdog_sends_the_key_the_restricted_apis_ask_for(fake):
    server, _, _ = fake
    client = FakeClient()
    server.dead_instances(client)
    server.reload(client, "classifier")
    header = {"triton-grpc-protocol-wsss-admin-key": KEY}
    assert client.calls[0] == ("index", "", header)
    assert ("unload", "classifier", header) in client.calls
    assert ("load", "classifier", header) in client.calls
    assert ("load", "wsss_pipeline", header) in client.calls  # the ensemble it took down
    assert all(headers == header for *_, headers in client.calls)


def test_a_stub_the_reload_replaced_hides_no_new_one(fake):
    """Triton 2.51 keeps the old load of a model whose dead instance failed a request, its
    live stub included: once the new stubs run, that old classifier_0_0 stands in for none."""
    server, alive, repo = fake
    del alive[1]  # classifier_0_1 dies; the watchdog reloads the classifier
    server.reload(FakeClient(), "classifier")
    assert list(server.dead_instances(FakeClient())) == [("classifier", "1")]  # no poll yet
    alive += [_stub(20, repo, "classifier", "classifier_0_0")]  # the new load's stubs
    alive += [_stub(21, repo, "classifier", "classifier_0_1")]
    assert server.dead_instances(FakeClient()) == {}
    del alive[-2]  # the new classifier_0_0 dies; the old one (pid 10) lingers
    assert server.dead_instances(FakeClient()) == {("classifier", "1"): ["classifier_0_0"]}
    del alive[0]  # the old one exits at last: forgotten
    assert server.dead_instances(FakeClient()) == {("classifier", "1"): ["classifier_0_0"]}
    assert server._replaced == {}


# The real server: one of echo's two stubs killed, the watchdog reloads echo.


def _stub_pids(server: TritonServer, instance: str) -> list[int]:
    return [
        p.pid
        for p in triton.processes()
        if p.stub_of(server.repository) and p.instance == instance and p.state != "Z"
    ]


def _all_answer(client, n: int = 20) -> bool:
    """``n`` requests in a row, each answered (Triton takes turns between the instances)."""
    x = np.ones((1,), np.float32)
    for _ in range(n):
        tensor = grpc.InferInput("X", [1], "FP32")
        tensor.set_data_from_numpy(x)
        try:
            client.infer(ECHO, [tensor])
        except grpc.InferenceServerException:  # "Stub process 'echo_0_1' is not healthy"
            return False
    return True


def _kill(server: TritonServer, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid not in {p.pid for p in server.stub_processes()}, what=f"{pid} gone")


@pytest.mark.triton
def test_a_killed_stub_beside_a_live_one_is_reloaded(echo_server):
    """Then the new stub of the instance whose old stub may linger (Triton 2.51 keeps the
    old load when a request failed on its dead instance) is killed: reloaded too."""
    server = echo_server
    names = (f"{ECHO}_0_0", f"{ECHO}_0_1")
    (first, victim) = (_stub_pids(server, n) for n in names)  # its argv names its instance
    assert len(first) == len(victim) == 1
    one_each = {(ECHO, "1", n): 1 for n in names}
    client = grpc.InferenceServerClient(server.grpc_url)
    try:
        _kill(server, victim[0])
        assert server.dead_instances(client) == {(ECHO, "1"): [names[1]]}
        server.watch(0.2)  # explicit model control: its unload and load send the key
        wait_for(lambda: _all_answer(client), what="every request answered again")
        assert server.dead_instances(client) == {} and server.stubs() == one_each
        (second,) = set(_stub_pids(server, names[0])) - set(first)
        _kill(server, second)  # Triton would hand it every other request
        wait_for(lambda: _all_answer(client), what="every request answered again")
        assert second not in _stub_pids(server, names[0]) and server.stubs() == one_each
    finally:
        client.close()  # an open client makes tritonserver wait out its exit timeout


def test_a_reload_under_way_is_not_repeated_and_the_config_stub_is_no_new_load(fake):
    """Under poll the reload lands at the next poll: seen dead again before it, the model is
    not reloaded twice (the new stubs, still starting, would pass for old ones); the stub the
    Python backend starts to read the config (named as the model) is not the new load."""
    server, alive, repo = fake
    del alive[1]  # classifier_0_1 dies
    server.reload(FakeClient(), "classifier")
    assert server._reloading("classifier")
    alive += [_stub(30, repo, "classifier", "classifier")]  # the config-reading stub
    server.stubs()
    assert server._reloading("classifier") and 10 in server._replaced["classifier"]
    alive += [_stub(31, repo, "classifier", "classifier_0_0")]  # the new load's stubs
    server.stubs()
    assert not server._reloading("classifier")


def test_a_reload_that_cannot_be_made_is_said_and_the_watchdog_goes_on(fake, monkeypatch, capsys):
    """Under poll the reload touches the version folders; on a read-only repository that
    fails, and the watchdog says so instead of passing it over in silence."""
    server, alive, _ = fake
    del alive[1]  # classifier_0_1 dies
    rounds = []
    server.process = SimpleNamespace(pid=GROUP, poll=lambda: None if len(rounds) < 3 else 0)
    monkeypatch.setattr(grpc, "InferenceServerClient", lambda url: _Counted(rounds))

    def read_only(client, model):
        raise PermissionError(13, "Read-only file system", str(server.repository / model))

    monkeypatch.setattr(server, "reload", read_only)
    server.watch(0.01).join(timeout=10)
    out = capsys.readouterr().out
    assert "wsss: cannot reload classifier: [Errno 13] Read-only file system" in out
    assert len(rounds) >= 3  # it went on watching


class _Counted(FakeClient):
    """A FakeClient that counts the watchdog's rounds (one client a round)."""

    def __init__(self, rounds):
        super().__init__()
        rounds.append(self)
