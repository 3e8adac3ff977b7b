"""The model-repository, shared-memory, trace and logging APIs answer only to the key of the
process that started the server: no client loads a model whose code comes in the request,
registers a stub's shared memory, or names a file for the server to write. Inference and
what clients read (health, metadata, config, statistics) stay open."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpc

import serving.server as triton
from serving.server import ServerError, TritonServer, server_command
from tests.serving.conftest import ECHO
from wsss.config import ServeConfig


def _flags(cmd: list[str]) -> dict[str, str]:
    restricted = ("--http-restricted-api=", "--grpc-restricted-protocol=")
    return {c.split("=", 1)[0]: c.split("=", 1)[1] for c in cmd if c.startswith(restricted)}


def test_the_command_restricts_the_apis_to_the_key(tmp_path):
    cmd = server_command(tmp_path, tmp_path, ServeConfig(), gpu=False, key="a" * 32)
    rule = "model-repository,shared-memory,trace,logging:wsss-admin-key=" + "a" * 32
    assert _flags(cmd) == {"--http-restricted-api": rule, "--grpc-restricted-protocol": rule}
    opened = server_command(
        tmp_path, tmp_path, ServeConfig(), gpu=False, key="a" * 32, open_apis=("shared-memory",)
    )
    assert set(_flags(opened).values()) == {rule.replace("shared-memory,", "")}


def test_without_a_key_the_command_draws_one_no_one_knows(tmp_path):
    """A caller that passes no key (a benchmark's own command line) still restricts them."""
    keys = [
        _flags(server_command(tmp_path, tmp_path, ServeConfig(), gpu=False))[
            "--http-restricted-api"
        ].rsplit("=", 1)[1]
        for _ in range(2)
    ]
    assert keys[0] != keys[1] and min(len(k) for k in keys) >= 32


def test_the_key_is_the_operators_where_set_else_new_at_each_start(monkeypatch):
    monkeypatch.delenv(triton.ADMIN_KEY_ENV, raising=False)
    assert triton.admin_key() != triton.admin_key()
    monkeypatch.setenv(triton.ADMIN_KEY_ENV, "operator-key-0123456789")
    assert triton.admin_key() == "operator-key-0123456789"
    for bad in ("short", "with:colon-and=equals-0123", "with space 0123456789"):
        monkeypatch.setenv(triton.ADMIN_KEY_ENV, bad)
        with pytest.raises(ServerError, match=triton.ADMIN_KEY_ENV):
            triton.admin_key()


def test_only_restricted_apis_can_be_opened(tmp_path):
    with pytest.raises(ServerError, match="not restricted"):
        TritonServer(tmp_path, ServeConfig(), tmp_path, open_apis=("inference",))
    with pytest.raises(ServerError, match="not started"):
        TritonServer(tmp_path, ServeConfig(), tmp_path).admin_headers()


# The real server, under explicit model control.


def _http(server, method: str, path: str, body=None, headers=None) -> int:
    request = urllib.request.Request(
        f"http://{server.http_url}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _intruder(marker) -> tuple[str, dict[str, bytes]]:
    """A model whose config and code travel in the load request: its code writes ``marker``."""
    config = {
        "name": "intruder",
        "backend": "python",
        "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [1]}],
        "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [1]}],
    }
    code = (
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        f"        open({str(marker)!r}, 'w').write('ran')\n"
    )
    return json.dumps(config), {"file:1/model.py": code.encode()}


@pytest.mark.triton
def test_http_clients_without_the_key_are_refused(echo_server, tmp_path):
    server = echo_server
    marker = tmp_path / "code_ran"
    config, files = _intruder(marker)
    parameters = {"config": config} | {k: base64.b64encode(v).decode() for k, v in files.items()}
    refused = [
        ("POST", "/v2/repository/index", None),
        ("POST", "/v2/repository/models/intruder/load", {"parameters": parameters}),
        ("POST", f"/v2/repository/models/{ECHO}/unload", {}),
        ("GET", "/v2/systemsharedmemory/status", None),
        ("POST", "/v2/systemsharedmemory/region/r/register", {"key": "/r", "byte_size": 16}),
        ("GET", "/v2/cudasharedmemory/status", None),
        ("POST", "/v2/trace/setting", {"trace_file": str(tmp_path / "trace.json")}),
        ("POST", "/v2/logging", {"log_file": str(tmp_path / "log.txt")}),
    ]
    for method, path, body in refused:
        assert _http(server, method, path, body) == 403, path
        assert _http(server, method, path, body, {"wsss-admin-key": "a guess"}) == 403, path
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    infer = {"inputs": [{"name": "X", "shape": [1], "datatype": "FP32", "data": [2.0]}]}
    opened = [
        ("GET", "/v2/health/ready", None),
        ("GET", f"/v2/models/{ECHO}", None),
        ("GET", f"/v2/models/{ECHO}/config", None),
        ("GET", f"/v2/models/{ECHO}/stats", None),
        ("POST", f"/v2/models/{ECHO}/infer", infer),
    ]
    for method, path, body in opened:
        assert _http(server, method, path, body) == 200, path
    index = ("POST", "/v2/repository/index", None)
    assert _http(server, *index, server.admin_headers("http")) == 200


@pytest.mark.triton
def test_grpc_clients_without_the_key_are_refused(echo_server, tmp_path):
    server = echo_server
    client = grpc.InferenceServerClient(server.grpc_url)
    config, files = _intruder(tmp_path / "code_ran")
    try:
        for call in (
            client.get_model_repository_index,
            lambda: client.load_model("intruder", config=config, files=files),
            lambda: client.unload_model(ECHO),
            client.get_system_shared_memory_status,
            client.get_cuda_shared_memory_status,
            client.get_trace_settings,
            client.get_log_settings,
        ):
            with pytest.raises(grpc.InferenceServerException, match="restricted"):
                call()
        assert not (tmp_path / "code_ran").exists()
        # Open: what the project's clients and benchmarks read, and inference.
        assert client.get_model_config(ECHO).config.name == ECHO
        assert client.get_inference_statistics(ECHO).model_stats
        tensor = grpc.InferInput("X", [1], "FP32")
        tensor.set_data_from_numpy(np.array([3.0], np.float32))
        assert client.infer(ECHO, [tensor]).as_numpy("Y").tolist() == [3.0]
        # The key opens them: the index lists what the server holds, no intruder.
        index = client.get_model_repository_index(headers=server.admin_headers())
        assert "intruder" not in {m.name for m in index.models}
    finally:
        client.close()  # an open client makes tritonserver wait out its exit timeout
