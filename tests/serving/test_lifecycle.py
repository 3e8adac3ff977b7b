"""Starting and stopping the real tritonserver: one process per server, a quick clean stop on
Ctrl-C or SIGTERM with exit status 0, no process left behind, a clean restart on the same
ports after a kill."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.http as http

from serving.server import (
    SHM_DIR,
    ServerError,
    TritonServer,
    group_members,
    on_free_ports,
    pid_namespace,
    processes,
    shm_regions,
    sweep_shm,
)
from tests.conftest import wait_for
from wsss.tensors import PIPELINE_BYTES

pytestmark = [pytest.mark.slow, pytest.mark.triton]


def _ports(cfg):
    serve = on_free_ports(cfg.serve)
    return dataclasses.replace(cfg, serve=serve)


def test_start_twice_is_refused_and_stop_leaves_nothing(exported, tmp_path):
    cfg = _ports(exported)
    server = TritonServer(Path(cfg.export.repository), cfg.serve, tmp_path)
    with server:
        pid = server.process.pid
        assert len(group_members(pid)) >= 2  # tritonserver and its Python stubs
        regions = shm_regions(server.shm_prefix)
        assert len(regions) >= len(server.stub_processes())  # one /dev/shm region a stub
        with pytest.raises(ServerError, match="already running"):
            server.start()
        assert server.process.pid == pid
    assert group_members(pid) == [] and not any(r.exists() for r in regions)
    # A killed server leaves its stubs' regions in /dev/shm (16 MiB each, until a reboot):
    # stop() unlinks them (a start first stops what is left), and it restarts cleanly on the
    # same repository and ports.
    server.start()
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()
    regions = shm_regions(server.shm_prefix)
    assert regions
    with server:  # a dead server starts again, and what it left goes first
        assert server.running and not any(r.exists() for r in regions)
    assert not server.running


def test_a_start_unlinks_the_regions_of_servers_whose_owner_is_gone():
    """A `wsss serve` killed with its server leaves regions no stop() will unlink: the next
    start does, where their owner is gone and no live process maps them."""
    import mmap

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(gone.stdout)
    token = os.urandom(4).hex()
    ns = pid_namespace()
    names = {
        "orphan": f"wsss_{ns}_{dead}_{token}_a",
        "mapped": f"wsss_{ns}_{dead}_{token}_b",  # an orphaned tritonserver still using it
        "ours": f"wsss_{ns}_{os.getpid()}_{token}_c",
        # another PID namespace's (a container sharing /dev/shm): its processes are not
        # ours to see, so its regions are not ours to judge
        "elsewhere": f"wsss_1{ns}_{dead}_{token}_d",
    }
    for name in names.values():
        (SHM_DIR / name).write_bytes(b"\0" * 4096)
    try:
        with (SHM_DIR / names["mapped"]).open("r+b") as f, mmap.mmap(f.fileno(), 4096):
            removed = sweep_shm()
            assert names["orphan"] in removed
            assert [(SHM_DIR / n).exists() for n in names.values()] == [False, True, True, True]
    finally:
        for name in names.values():
            (SHM_DIR / name).unlink(missing_ok=True)


def test_ctrl_c_while_it_starts_leaves_no_server(exported, tmp_path, monkeypatch):
    """A Ctrl-C while tritonserver loads its models (raised in the wait for readiness) stops
    it: in its own session, it would otherwise outlive the command."""
    cfg = _ports(exported)
    server = TritonServer(Path(cfg.export.repository), cfg.serve, tmp_path)

    def interrupted(timeout):
        raise KeyboardInterrupt

    monkeypatch.setattr(server, "wait_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert server.process.returncode is not None and group_members(server.process.pid) == []


# SIGINT is sent to a `wsss serve` started with SIGINT ignored, as a script's `wsss serve &`
# is (and as the suite itself may be): Ctrl-C / `kill -INT` must stop it all the same.
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_wsss_serve_stops_cleanly_on_ctrl_c_and_sigterm(exported, tmp_path, sig):
    cfg = _ports(exported)
    s = cfg.serve
    proc = _wsss_serve(cfg, tmp_path, ignore_sigint=sig == signal.SIGINT)
    _wait_for_line(proc, "serving ")
    (triton,) = _tritonservers(s.http_port)
    assert len(group_members(triton)) >= 2  # tritonserver and its Python stubs
    # A user's client left connected (keep-alive) holds tritonserver for its exit timeout:
    # Triton's default of 30 s would outlast the wait below; serve.exit_timeout_seconds (5)
    # does not. With SIGINT the client is gone first: a clean stop.
    user = http.InferenceServerClient(f"127.0.0.1:{s.http_port}")
    assert user.is_server_ready()
    if sig == signal.SIGINT:
        user.close()
    proc.send_signal(sig)
    try:
        assert proc.wait(timeout=20) == 0, proc.stdout.read()
    finally:
        user.close()
    assert group_members(triton) == []
    # The log's last line says it stopped as asked, not cut off.
    last = proc.stdout.read().rstrip().splitlines()[-1]
    held = "wsss serve: tritonserver stopped at its exit timeout (1)"
    assert last == ("wsss serve: stopped" if sig == signal.SIGINT else held)


def test_wsss_serve_starts_a_crashed_tritonserver_again(exported, tmp_path):
    """tritonserver aborted (as Triton 2.51 does on an HTTP request whose JSON declares a
    shape too large to allocate) is started again on the same ports, its crash log kept, and
    serves; past serve.restarts, wsss serve exits with it, saying how it died."""
    cfg = _ports(exported)
    s = cfg.serve
    proc = _wsss_serve(cfg, tmp_path, "serve.restarts=1")
    _wait_for_line(proc, "serving ")
    (first,) = _tritonservers(s.http_port)
    os.kill(first, signal.SIGABRT)
    said = _wait_for_line(proc, "wsss: serving again")
    assert "tritonserver died (killed by SIGABRT)" in said and "starting it again (1 of 1" in said
    crashed = f"tritonserver-{s.http_port}.crashed-*.log"  # one log per server, by its port
    assert len(list((tmp_path / ".cache/server").glob(crashed))) == 1
    (second,) = _tritonservers(s.http_port)
    assert second != first and group_members(first) == []
    user = http.InferenceServerClient(f"127.0.0.1:{s.http_port}")
    try:
        assert user.is_server_ready() and user.is_model_ready(PIPELINE_BYTES)
    finally:
        user.close()
    os.kill(second, signal.SIGABRT)  # the second crash within the hour: no restart
    assert proc.wait(timeout=60) == 1
    assert "tritonserver exited (killed by SIGABRT)" in proc.stdout.read()
    assert group_members(second) == []


def test_the_watchdog_watches_on_through_a_restart_and_ends_with_stop(exported, tmp_path):
    """serve_forever's restart keeps the watchdog's thread (a stop() ends it), and a start
    that fails counts against the restarts without ending the loop."""
    import threading

    cfg = _ports(exported)
    server = TritonServer(Path(cfg.export.repository), cfg.serve, tmp_path)
    said: list[str] = []
    with server:
        watchdog = server.watch(0.2)
        os.kill(server.process.pid, signal.SIGABRT)
        code = []
        loop = threading.Thread(
            target=lambda: code.append(server.serve_forever(1, say=said.append))
        )
        loop.start()
        wait_for(lambda: any(s.startswith("wsss: serving again") for s in said), 120, "a restart")
        assert watchdog.is_alive() and server.running
        os.kill(server.process.pid, signal.SIGABRT)  # past the budget: it returns
        loop.join(60)
        assert code == [-signal.SIGABRT]
    watchdog.join(5)
    assert not watchdog.is_alive()


def test_restarts_that_fail_use_up_the_budget_and_end_in_failure(exported, tmp_path, monkeypatch):
    """A restart that fails (never ready: stopped by us, perhaps with status 0) counts
    against serve.restarts, and the end is a failure, not 'it exited by itself'."""
    cfg = _ports(exported)
    server = TritonServer(Path(cfg.export.repository), cfg.serve, tmp_path)
    said: list[str] = []
    with server:

        def never_ready(timeout=120.0):
            raise ServerError("tritonserver not ready after 120 s")

        monkeypatch.setattr(server, "start", never_ready)
        os.kill(server.process.pid, signal.SIGABRT)
        assert server.serve_forever(2, say=said.append) == 1
    assert sum(s.startswith("wsss: it did not start again") for s in said) == 2
    assert len(list(tmp_path.glob("tritonserver.crashed-*.log"))) == 2


def _wsss_serve(cfg, cwd: Path, *overrides: str, ignore_sigint: bool = False):
    """`wsss serve` on ``cfg``'s repository and ports, its output piped (text)."""
    s = cfg.serve
    cmd = [sys.executable, "-m", "wsss", "serve"]
    if ignore_sigint:  # the shell ignores it, and exec keeps it ignored
        cmd = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *cmd]
    for key, value in (
        ("export.repository", cfg.export.repository),
        ("serve.http_port", s.http_port),
        ("serve.grpc_port", s.grpc_port),
        ("serve.metrics_port", s.metrics_port),
    ):
        cmd += ["--set", f"{key}={value}"]
    for override in overrides:
        cmd += ["--set", override]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
        env=os.environ | {"PYTHONPATH": str(Path.cwd())}, start_new_session=True,
    )  # fmt: skip


def _wait_for_line(proc, start: str) -> str:
    """What ``proc`` said up to its first line starting with ``start``: waits on the server
    saying so, not on a clock."""
    said = []
    for line in proc.stdout:
        said.append(line)
        if line.startswith(start):
            return "".join(said)
    pytest.fail(f"wsss serve exited ({proc.wait()}) before {start!r}:\n{''.join(said)}")


def _tritonservers(http_port: int) -> list[int]:
    """Live tritonservers serving ``http_port`` (other tests' processes may hold file names
    that are not UTF-8: CI once failed reading one)."""
    return [
        p.pid
        for p in processes()
        if p.state != "Z" and p.name == "tritonserver" and f"--http-port={http_port}" in p.argv
    ]


@pytest.mark.parametrize("name", ["my repo", "repo_ü"])
def test_a_repository_path_the_python_backend_cannot_load_is_refused_at_once(
    exported, tmp_path, name
):
    """A space (the stub dies parsing its command line and the server waited 120 s) or a
    non-ASCII letter (the model fails to load, said far above the log's end) in the path:
    one line before anything starts."""
    import shutil

    repo = tmp_path / name
    shutil.copytree(exported.export.repository, repo)
    server = TritonServer(repo, _ports(exported).serve, tmp_path / "work")
    with pytest.raises(
        ServerError, match="cannot load models from: move it to a path of plain ASCII"
    ):
        server.start()
    assert server.process is None
    # A plain link to it is no way round: tritonserver is given the link's target.
    (tmp_path / "plain").symlink_to(repo)
    linked = TritonServer(tmp_path / "plain", _ports(exported).serve, tmp_path / "work")
    with pytest.raises(ServerError, match="cannot load models from"):
        linked.start()


def test_a_failed_start_says_the_errors_tritonserver_logged(tmp_path):
    """The model that failed to load and why, not only the log's last lines (which say
    that some model failed, and other models' READY)."""
    from wsss.config import ServeConfig

    server = TritonServer(tmp_path, ServeConfig(), tmp_path)
    server.log_path.write_text(
        'E1205 10:00:00.0 1 server.cc:241] "CudaDriverHelper has not been initialized."\n'
        'I1205 10:00:00.1 1 model.cc:1] "loading: preprocess:1"\n'
        "E1205 10:00:01.2 1 model_lifecycle.cc:2] \"failed to load 'preprocess' version 1: "
        "UnicodeEncodeError: 'ascii' codec can't encode\"\n"
        + "I1205 10:00:02.3 1 server.cc:3] | classifier | 1 | READY |\n" * 40
        + "error: creating server: Internal - failed to load all models\n"
    )
    said = server.said()
    assert "failed to load 'preprocess' version 1: UnicodeEncodeError" in said
    assert f"(log: {server.log_path})" in said and "CudaDriverHelper" not in said
