"""Free loopback ports for test and benchmark servers: distinct within one call (CI once
started tritonserver with gRPC and metrics on the same port, and it refused to start), and
below the ephemeral range, which clients' outgoing connections draw from (CI once found a
server's port taken by one)."""

from __future__ import annotations

import socket

import pytest

from serving.server import _ephemeral_low, free_ports, on_free_ports
from wsss.config import ServeConfig


def test_ports_of_one_call_are_distinct_and_free():
    ports = free_ports(64)
    assert len(set(ports)) == 64
    assert all(10_000 <= p < _ephemeral_low() for p in ports)
    for port in ports[:8]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free once returned


def test_serve_settings_on_free_ports_use_three_ports_on_loopback():
    serve = on_free_ports(ServeConfig(host="0.0.0.0"))
    assert serve.host == "127.0.0.1"
    assert len({serve.http_port, serve.grpc_port, serve.metrics_port}) == 3


def test_a_port_in_use_is_not_handed_out(monkeypatch):
    """The draw is random: with one port left to draw and it taken, the call says so."""
    import serving.server as server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        taken.listen()
        monkeypatch.setattr(server, "_ephemeral_low", lambda: 10_001)
        monkeypatch.setattr(server.random.SystemRandom, "randrange", lambda self, a, b: port)
        with pytest.raises(server.ServerError, match="no 1 free loopback ports"):
            free_ports(1)
