"""A Docker engine of the tests' own, started as ../shared/ENVIRONMENT.md says: no bridge, no
iptables, its own data and exec roots and socket, so containers run with the host's network
and servers bind 127.0.0.1. Its data root is a cache outside the repository
(``WSSS_DOCKER_CACHE``, default ``~/.cache/wsss/docker``): the base image and the build's
layers survive from one run to the next. Stopped by its process id.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

CACHE = Path(os.environ.get("WSSS_DOCKER_CACHE", Path.home() / ".cache" / "wsss" / "docker"))


def missing() -> str | None:
    """Why no engine can be started here, or None."""
    if os.geteuid() != 0:
        return "dockerd and debootstrap need root"
    for tool, package in (("dockerd", "docker.io"), ("docker", "docker.io")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (apt-get install debootstrap)"
    return None


class Engine:
    """``with Engine() as engine:`` a dockerd on its own socket; ``engine.env`` points the
    docker CLI at it. An engine already answering on that socket (a developer's, started
    the same way) is used and left running: only what this object started is stopped."""

    def __init__(self, cache: Path = CACHE):
        self.cache = Path(cache)
        self.socket = self.cache / "docker.sock"
        self.process: subprocess.Popen | None = None
        self.env = os.environ | {"DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "0"}

    def docker(self, *args: str, timeout: float = 120, check: bool = True, **kw):
        return subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, check=check, **kw,
        )  # fmt: skip

    def answers(self) -> bool:
        try:
            return self.docker("version", timeout=20, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def start(self, timeout: float = 120) -> Engine:
        if self.socket.exists() and self.answers():
            return self
        for folder in ("data", "exec"):
            (self.cache / folder).mkdir(parents=True, exist_ok=True)
        cmd = [
            "dockerd",
            "--bridge=none",
            "--iptables=false",
            f"--data-root={self.cache / 'data'}",
            f"--exec-root={self.cache / 'exec'}",
            f"--pidfile={self.cache / 'dockerd.pid'}",
            f"--host=unix://{self.socket}",
        ]
        with (self.cache / "dockerd.log").open("ab") as log:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited ({self.process.returncode}):\n{self.log()}")
            if self.socket.exists() and self.answers():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"dockerd did not answer within {timeout:.0f} s:\n{self.log()}")

    def log(self, lines: int = 30) -> str:
        path = self.cache / "dockerd.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM to the dockerd this object started (it stops its containerd and
        containers), SIGKILL to its process group after ``timeout``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        self._unmount_leftovers()

    def _unmount_leftovers(self) -> None:
        """dockerd leaves its default network namespace (and, when killed, container
        filesystems) mounted under its roots; those mounts are ours to remove."""
        roots = tuple(str(self.cache / folder) + os.sep for folder in ("exec", "data"))
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for point in reversed(mounts):  # the innermost first
            if point.startswith(roots):
                subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
