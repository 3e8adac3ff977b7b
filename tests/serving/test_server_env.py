"""What tritonserver and its stubs run with (``serving.server.server_env``): the memory and
thread settings the soaks and benchmarks chose, each left to the user where set."""

from __future__ import annotations

from serving.server import server_env


def test_the_server_runs_with_the_measured_memory_and_thread_settings(monkeypatch):
    for name in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    env = server_env()
    assert env["MALLOC_ARENA_MAX"] == "2"
    assert env["MALLOC_MMAP_THRESHOLD_"] == "131072"
    # one BLAS thread per stub: each instance is one thread of work
    assert env["OPENBLAS_NUM_THREADS"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")  # the user's own choice stays
    assert server_env()["OPENBLAS_NUM_THREADS"] == "4"
