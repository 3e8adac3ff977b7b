"""Free loopback ports for test and benchmark servers: distinct within one call (CI once
started tritonserver with gRPC and metrics on the same port, and it refused to start)."""

from __future__ import annotations

import socket

from serving.server import free_ports, on_free_ports
from wsss.config import ServeConfig


def test_ports_of_one_call_are_distinct_and_free():
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:8]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free once returned


def test_serve_settings_on_free_ports_use_three_ports_on_loopback():
    serve = on_free_ports(ServeConfig(host="0.0.0.0"))
    assert serve.host == "127.0.0.1"
    assert len({serve.http_port, serve.grpc_port, serve.metrics_port}) == 3
