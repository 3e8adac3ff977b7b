"""When ``TritonServer`` calls the server ready: tritonserver opens its metrics endpoint after
its HTTP one, so an HTTP "ready" alone let a scrape of /metrics be refused (CI, once)."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import threading
import time

import pytest
import tritonclient.http

from serving.server import ServerError, TritonServer, free_ports
from wsss.config import ServeConfig


class _ReadyOverHttp:
    """tritonclient's HTTP client as a server whose HTTP endpoint is up and ready."""

    def __init__(self, url: str):
        pass

    def is_server_ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


@pytest.fixture
def server(monkeypatch, tmp_path):
    monkeypatch.setattr(tritonclient.http, "InferenceServerClient", _ReadyOverHttp)
    http, grpc, metrics = free_ports(3)
    cfg = ServeConfig(host="127.0.0.1", http_port=http, grpc_port=grpc, metrics_port=metrics)
    server = TritonServer(tmp_path / "repo", cfg, tmp_path)
    # a process that runs until stopped stands in for tritonserver
    server.process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield server
    server._end(timeout=5)


def test_ready_waits_for_the_metrics_endpoint(server):
    opened = threading.Event()
    listener = socket.socket()

    def open_metrics_late() -> None:
        time.sleep(1.0)
        listener.bind(("127.0.0.1", server.cfg.metrics_port))
        opened.set()  # before listen(): no connection can be taken before it is set
        listener.listen()

    threading.Thread(target=open_metrics_late, daemon=True).start()
    try:
        server.wait_ready(timeout=30)
        assert opened.is_set()  # not before the metrics endpoint listened
    finally:
        listener.close()


def test_a_server_whose_metrics_never_listen_is_not_ready(server):
    with pytest.raises(ServerError, match="not ready after 1 s: HTTP ready, metrics port"):
        server.wait_ready(timeout=1)
    assert server.process.poll() is not None  # and is stopped


def test_a_port_another_server_listens_on_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """A second `wsss serve` on the same ports said "serving": its readiness check got the
    first server's answer while its own tritonserver failed to bind (and was started again
    five times). Now it is refused up front, naming the port; a port left in TIME_WAIT is
    not in use."""
    import serving.server as triton

    http, grpc, metrics = free_ports(3)
    cfg = ServeConfig(host="127.0.0.1", http_port=http, grpc_port=grpc, metrics_port=metrics)
    (tmp_path / "repo" / "wsss_pipeline").mkdir(parents=True)
    (tmp_path / "repo" / "wsss_pipeline" / "config.pbtxt").write_text("")
    server = TritonServer(tmp_path / "repo", cfg, tmp_path / "work")
    monkeypatch.setattr(triton.subprocess, "Popen", lambda *a, **k: pytest.fail("started"))
    with socket.socket() as other:
        other.bind(("127.0.0.1", grpc))
        other.listen()
        with pytest.raises(ServerError, match=f"port gRPC {grpc} already in use"):
            server.start()
        # Only "in use" refuses: an address this machine does not hold (no traffic: a
        # numeric address, bound locally) is left to tritonserver, whose log says why.
        triton.check_ports_free(dataclasses.replace(cfg, host="::2"))
        # A port whose lookup fails leaves the other ports checked (it returned at the first).
        real = socket.getaddrinfo

        def lookup(host, port, *args, **kwargs):
            if port == http:
                raise socket.gaierror("no such host")
            return real(host, port, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", lookup)
        with pytest.raises(ServerError, match=f"port gRPC {grpc} already in use"):
            triton.check_ports_free(cfg)
        monkeypatch.setattr(socket, "getaddrinfo", real)
    # A connection closed by this side leaves its port in TIME_WAIT: free to a server.
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", http))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", http))
        accepted, _ = listener.accept()
        accepted.close()  # the server's side closes first: TIME_WAIT on its port
        client.close()
    triton.check_ports_free(cfg)
