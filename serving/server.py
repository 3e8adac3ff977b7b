"""Run the real ``tritonserver`` binary (from the nvidia-pytriton wheel) on a model repository.

The wheel ships tritonserver 2.51.0 (the NGC 24.10 release) with the Python backend only. We
assemble a backend directory next to the repository: ``python/`` (the backend library, its
utils and the Python 3.11 stub) and ``onnxruntime/model.py`` (our Python-based stand-in for
the native ONNX Runtime backend, see ``serving/backends``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import filecmp
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from wsss.config import ServeConfig
from wsss.errors import WsssError
from wsss.packages import package_file
from wsss.tensors import ENSEMBLES, PIPELINE

_BACKENDS = Path(__file__).parent / "backends"


class ServerError(WsssError, RuntimeError):
    """tritonserver did not start, or died."""


def pytriton_root() -> Path:
    # Not imported: pytriton's own Python deps are not installed (binaries only).
    return package_file("pytriton", "tritonserver", needed_by="The Triton server")


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free now, drawn at random below the kernel's range of
    ephemeral ports. Port 0 would hand out an ephemeral port, which any client's outgoing
    connection may take before the server binds it (CI: tritonserver's gRPC port "already
    in use"); and all ``n`` are held bound until each is found, so no two are the same (CI
    once got one port for gRPC and metrics)."""
    low = _ephemeral_low()
    draw = random.SystemRandom()  # not seeded alike in test workers started together
    found: list[int] = []
    with contextlib.ExitStack() as stack:
        for _ in range(1000):
            if len(found) == n:
                break
            port = draw.randrange(10_000, low)
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))  # also refuses a port already drawn here
            except OSError:  # in use
                continue
            found.append(port)
    if len(found) == n:
        return found
    raise ServerError(f"no {n} free loopback ports between 10000 and {low}")


def check_ports_free(serve: ServeConfig) -> None:
    """Refuse to start where another process listens on one of ``serve``'s ports: the
    readiness check would take that server's answer for this one's (a second `wsss serve`
    on the same ports said "serving" while its tritonserver failed to bind, then started it
    again five times). Each address the host names is bound as a server binds it
    (SO_REUSEADDR: a port in TIME_WAIT after a restart is free), then let go; only "in use"
    refuses (a host that is not this machine's, or a port it may not bind, tritonserver's
    own log says)."""
    busy = []
    for name, port in (
        ("HTTP", serve.http_port),
        ("gRPC", serve.grpc_port),
        ("metrics", serve.metrics_port),
    ):
        try:
            addresses = socket.getaddrinfo(
                serve.host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror:  # a host no resolver knows: tritonserver's log says so
            continue
        for family, kind, proto, _, address in addresses:
            try:
                with socket.socket(family, kind, proto) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(address)
            except OSError as exc:  # EADDRNOTAVAIL, EAFNOSUPPORT (no IPv6), EACCES: not ours
                if exc.errno == errno.EADDRINUSE:
                    busy.append(f"{name} {port}")
                    break
    if busy:
        raise ServerError(
            f"{serve.host}: port{'s' if len(busy) > 1 else ''} {', '.join(busy)} already in "
            "use (another server running?): stop it, or serve on other ports (HTTP_PORT, "
            "GRPC_PORT, METRICS_PORT, or --set serve.http_port=... serve.grpc_port=... "
            "serve.metrics_port=...)"
        )


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux: 32768 by default)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low, 10_100)


def on_free_ports(serve: ServeConfig) -> ServeConfig:
    """``serve`` on free loopback ports (tests, benchmarks: a running `make serve` keeps its
    own)."""
    http, grpc, metrics = free_ports(3)
    return dataclasses.replace(
        serve, host="127.0.0.1", http_port=http, grpc_port=grpc, metrics_port=metrics
    )


def prepare_backends(dest: Path) -> Path:
    """Fill ``dest`` with the python backend (3.11 stub) and our Python-based backends."""
    root = pytriton_root()
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _copy_if_changed(root / "backends" / "python" / name, python / name)
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    _copy_if_changed(stub / "triton_python_backend_stub", python / "triton_python_backend_stub")
    for backend in _BACKENDS.iterdir():
        if (backend / "model.py").is_file():
            (dest / backend.name).mkdir(exist_ok=True)
            _copy_if_changed(backend / "model.py", dest / backend.name / "model.py")
    return dest


def _copy_if_changed(src: Path, dst: Path) -> None:
    """Copy unless identical: another server may be executing ``dst`` (Text file busy)."""
    if dst.exists() and filecmp.cmp(src, dst, shallow=False):
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)  # a new inode: a running stub keeps its old file


def server_env() -> dict[str, str]:
    """The stub must find this venv's numpy first, and the wheel's bundled libraries."""
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # for our backends; see export.repository too
    # glibc gives each thread that allocates its own heap arena (up to 8 per core), and
    # tritonserver's gRPC and scheduler threads each keep fragments of theirs: its resident
    # set crept up through a 20,000-request soak (reports/soak/). Two arenas bound that.
    env.setdefault("MALLOC_ARENA_MAX", "2")
    # And glibc raises its mmap threshold to the largest block freed (up to 32 MiB): after
    # the first photo's file or full-size mask, blocks that size come from the heap and
    # leave holes in it. A fixed 128 KiB keeps them mapped and returned when freed:
    # tritonserver grew +8.3% through a 20,000-request soak of make serve's model at
    # concurrency 8 without it (reports/soak/serve_dynamic_mmap/). The preprocess and
    # refiner stubs, faster on their heap, set their own (wsss.served.heap).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    # One BLAS thread per stub process: each instance is one thread of work (Triton scales
    # by instances, as the ONNX Runtime sessions run one intra-op thread each), and numpy's
    # OpenBLAS would start a pool of a thread per core in every stub, whose threads spin
    # after each call on the cores the other stubs need. The multi-object profile's walk
    # refiner (numpy matrix products) served its bytes ensemble at 11.8 / 11.1 photos/s
    # against 10.2 / 10.2 without it, two A/B rounds (reports/bench/coco_voc/results.md).
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libs = pytriton_root().parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p
    )
    return env


# The APIs only this process may call, with the per-start key below in a header: the model
# repository (under `explicit` model control a client could load a model whose config and
# model.py travel in the request, and Triton would run that Python), shared memory (a client
# could register a Python stub's own region, or any /dev/shm object the server may open, and
# have outputs written into it or inputs read from it), trace and logging (their settings
# name files the server writes). Of these the project calls only the repository's index,
# load and unload (the watchdog, which sends the key) and, in one benchmark run, system
# shared memory (perf_analyzer sends no header over gRPC: TritonServer's open_apis); its
# clients read only what stays open: health, metadata, inference, model-config, statistics.
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_HEADER = "wsss-admin-key"
# Set it to call the restricted APIs by hand (`curl -H "wsss-admin-key: $WSSS_ADMIN_KEY"`);
# unset, each start draws a key no one else knows.
ADMIN_KEY_ENV = "WSSS_ADMIN_KEY"
# Triton checks a gRPC restriction's header under this prefix (its refusal names it so).
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"


def admin_key() -> str:
    """``WSSS_ADMIN_KEY`` where the operator set one, else a new random key."""
    key = os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(32)
    # Triton reads the flag as <apis>:<header>=<key>, and a short key is guessable.
    if not re.fullmatch(r"[A-Za-z0-9._~-]{16,}", key):
        raise ServerError(
            f"{ADMIN_KEY_ENV} must be 16 or more letters, digits, '.', '_', '~' or '-'"
        )
    return key


def admin_headers(key: str, protocol: str = "grpc") -> dict[str, str]:
    """The header that opens the restricted APIs to a ``protocol`` client's calls."""
    prefix = GRPC_HEADER_PREFIX if protocol == "grpc" else ""
    return {prefix + ADMIN_HEADER: key}


def restriction_flags(key: str, open_apis: tuple[str, ...] = ()) -> list[str]:
    """tritonserver's flags restricting RESTRICTED_APIS but ``open_apis`` to ``key``."""
    apis = ",".join(api for api in RESTRICTED_APIS if api not in open_apis)
    if not apis:
        return []
    rule = f"{apis}:{ADMIN_HEADER}={key}"
    return [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]


# Every Python-backend stub (all our models but the ensembles) gets a shared-memory region
# in /dev/shm (16 MiB where /dev/shm holds 512 MiB or more), which tritonserver unlinks at a
# clean exit. One it never exits cleanly from (SIGKILL, a crash, a killed owner) stays in
# memory until the machine restarts: 889 of them, 14 GB of this 24 GB machine, in 14 hours
# of test runs. So each server's regions are named after it,
# "wsss_<pid namespace>_<owner pid>_<token>_<uuid>" (the owner: the process that started
# it), and stop() unlinks them; a start unlinks those of owners that are gone, in its own
# PID namespace (a container sharing the host's /dev/shm sees none of the host's
# processes), owned by its own user, where no live process maps them.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "wsss_"


def pid_namespace() -> str:
    """This process's PID namespace, as a number (``pid:[4026531836]``), or ``0``."""
    try:
        return os.readlink("/proc/self/ns/pid").split("[")[-1].rstrip("]")
    except OSError:
        return "0"


def shm_prefix() -> str:
    """The region-name prefix of one server start, naming the process that owns it."""
    return f"{SHM_PREFIX}{pid_namespace()}_{os.getpid()}_{secrets.token_hex(4)}_"


def shm_regions(prefix: str = SHM_PREFIX, folder: Path = SHM_DIR) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.name.startswith(prefix))
    except OSError:  # no /dev/shm (not Linux): nothing to clean
        return []


def _mapped_shm() -> set[str]:
    """Names of the /dev/shm files any live process (that this one may inspect) maps."""
    names = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            maps = (proc / "maps").read_text()
        except OSError:  # gone, or not ours to read
            continue
        names.update(
            line.split("/dev/shm/", 1)[1].split()[0]
            for line in maps.splitlines()
            if "/dev/shm/" in line
        )
    return names


def sweep_shm(folder: Path = SHM_DIR) -> list[str]:
    """Unlink the stub regions of servers whose owner process is gone (killed before it
    could stop them) that no live process maps; returns their names."""
    ours = f"{SHM_PREFIX}{pid_namespace()}_"
    stale = []
    for region in shm_regions(ours, folder):
        owner = region.name[len(ours) :].split("_", 1)[0]
        try:
            mine = region.stat().st_uid == os.getuid()
        except OSError:  # gone meanwhile
            continue
        if mine and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            stale.append(region)
    if not stale:
        return []
    mapped = _mapped_shm()
    removed = []
    for region in stale:
        if region.name in mapped:
            continue
        try:
            region.unlink(missing_ok=True)
        except OSError:  # not ours to remove after all: it stays, the server starts
            continue
        removed.append(region.name)
    return removed


def server_command(
    repository: Path,
    backends: Path,
    cfg: ServeConfig,
    gpu: bool,
    key: str | None = None,
    open_apis: tuple[str, ...] = (),
    shm: str = SHM_PREFIX,
) -> list[str]:
    """tritonserver's command line; the restricted APIs answer only to ``key`` (None: a
    random key, which closes them to everyone); the stubs' regions are named ``shm``...."""
    cmd = [
        str(pytriton_root() / "bin" / "tritonserver"),
        f"--model-repository={repository.resolve()}",
        f"--backend-directory={backends.resolve()}",
        f"--http-address={cfg.host}",
        f"--http-port={cfg.http_port}",
        f"--grpc-address={cfg.host}",
        f"--grpc-port={cfg.grpc_port}",
        f"--metrics-address={cfg.host}",
        f"--metrics-port={cfg.metrics_port}",
        f"--model-control-mode={cfg.model_control}",
        f"--exit-timeout-secs={cfg.exit_timeout_seconds}",
        "--log-verbose=0",
        *restriction_flags(key or secrets.token_urlsafe(32), open_apis),
    ]
    cmd.append(f"--backend-config=python,shm-region-prefix-name={shm}")
    size = cfg.python_shm_mb if cfg.python_shm_mb is not None else auto_python_shm_mb()
    if size:
        for setting in ("shm-default-byte-size", "shm-growth-byte-size"):
            cmd.append(f"--backend-config=python,{setting}={size << 20}")
    if cfg.model_control == "poll":
        cmd.append(f"--repository-poll-secs={cfg.poll_seconds}")
    elif cfg.model_control == "explicit":  # load everything at start; then only on request
        cmd.append("--load-model=*")
    if not gpu:
        cmd += [
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
            "--allow-gpu-metrics=false",
        ]
    return cmd


def auto_python_shm_mb(shm: str = "/dev/shm") -> int:
    """16 (MiB per Python-backend stub region) where ``shm`` holds at least 512 MiB; else 0,
    Triton's own default (1 MiB): each stub's region is reserved whole at start, and a
    container's default 64 MB /dev/shm holds fewer than eight of 16 MiB."""
    try:
        total = shutil.disk_usage(shm).total
    except OSError:
        return 0
    return 16 if total >= 512 << 20 else 0


def check_stub_path(what: str, path: Path, remedy: str) -> None:
    """Triton 2.51's Python-backend stub takes its model's path on a command line it splits
    at spaces (a space: the stub dies parsing the next field, `stol`, and the server waits
    for it) and reads it as ASCII (``UnicodeEncodeError`` loading the model): refuse such a
    path before starting, in one line."""
    full = str(Path(path).resolve())  # as tritonserver is given it: links followed
    odd = sorted({c for c in full if c.isspace() or not c.isascii()})
    if odd:
        shown = ", ".join(repr(c) for c in odd)
        raise ServerError(
            f"{what} {full} has {shown} in its path, which Triton's Python backend cannot "
            f"load models from: {remedy}"
        )


_ERROR = re.compile(r"E\d{4} ")  # an error line of tritonserver's log: E<month><day> <time>
# Error lines every start on a machine without a GPU logs, and serves on regardless.
_NO_GPU = ("CudaDriverHelper has not been initialized", "CUDA driver version is insufficient")
_FRAME = re.compile(r"\s*\d+# ")  # a line of tritonserver's stack trace as it dies


def exit_reason(code: int) -> str:
    """A process's exit status in words: ``killed by SIGKILL``, ``exit status 1``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class Process:
    """One live process as /proc shows it: what the server's checks and benchmarks read."""

    pid: int
    argv: tuple[str, ...]
    comm: str  # the kernel's name for it (when argv is empty)
    state: str  # R, S, ..., Z (a zombie: exited, not yet reaped)
    cpu_seconds: float  # user + system so far
    group: int = 0  # its process group (a server's stubs share the server's)

    @property
    def name(self) -> str:
        return Path(self.argv[0]).name if self.argv and self.argv[0] else self.comm

    def stub_of(self, repository: Path | None = None) -> tuple[str, str] | None:
        """(model, version) when this is a Python-backend stub (of ``repository``, if
        given): the stub's first argument is ``<repository>/<model>/<version>/model.py``."""
        if self.name != STUB or len(self.argv) < 2:
            return None
        path = Path(self.argv[1])
        if repository is None:
            return (path.parts[-3], path.parts[-2]) if len(path.parts) >= 3 else None
        try:
            model, version = path.relative_to(repository.resolve()).parts[:2]
        except ValueError:  # another server's stub
            return None
        return model, version

    @property
    def instance(self) -> str:
        """A stub's model instance as Triton names it, ``<group>_<k>``: the stub's ninth
        argument (Python backend 24.10); "" for any other process."""
        return self.argv[8] if self.name == STUB and len(self.argv) > 8 else ""


def expected_instances(config) -> Counter[str]:
    """How many stubs of each instance name a loaded version of ``config`` (a
    ``ModelConfig``) runs: Triton names group g's instances ``<g>_<k>`` for k below its
    count, once on each GPU a KIND_GPU group lists (so names repeat across GPUs). An
    ensemble has none."""
    from tritonclient.grpc.model_config_pb2 import ModelInstanceGroup

    expected: Counter[str] = Counter()
    for group in config.instance_group:
        copies = len(group.gpus) if group.kind == ModelInstanceGroup.KIND_GPU else 1
        for k in range(group.count):
            expected[f"{group.name}_{k}"] += copies
    return expected


def processes() -> Iterator[Process]:
    """Every process in /proc, in pid order (those that exit while read are skipped)."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    for pid in pids:
        proc = Path("/proc") / str(pid)
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_bytes().decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        yield Process(
            pid,
            tuple(a.decode(errors="replace") for a in argv if a),
            stat[stat.index("(") + 1 : stat.rindex(")")],
            fields[0],
            (int(fields[11]) + int(fields[12])) / tick,
            int(fields[2]),
        )


def group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) of process group ``pgid``: a server and its stubs."""
    return [p.pid for p in processes() if p.group == pgid and p.state != "Z"]


def has_gpu() -> bool:
    return (
        shutil.which("nvidia-smi") is not None
        and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    )


class TritonServer:
    """A tritonserver process: ``with TritonServer(...) as server:`` waits until it is ready."""

    def __init__(
        self,
        repository: Path,
        cfg: ServeConfig,
        workdir: Path,
        log: Path | None = None,
        open_apis: tuple[str, ...] = (),
    ):
        """``open_apis``: of RESTRICTED_APIS, those left open to every client (a benchmark's
        perf_analyzer registers shared memory and cannot send the key over gRPC)."""
        self.repository, self.cfg, self.workdir = Path(repository), cfg, Path(workdir)
        self.log_path = log or self.workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        unknown = set(open_apis) - set(RESTRICTED_APIS)
        if unknown:
            raise ServerError(f"not restricted APIs: {sorted(unknown)} (see RESTRICTED_APIS)")
        self.open_apis = tuple(open_apis)
        self.admin_key: str | None = None  # drawn at the first start(), kept through restarts
        self.shm_prefix: str | None = None  # its stubs' /dev/shm regions, named at each start
        self._replaced: dict[str, set[int]] = {}  # model: its stubs when the watchdog reloaded it
        self._reloaded_at: dict[str, float] = {}  # model: when the watchdog last reloaded it
        self._watchers: list[threading.Event] = []  # one a watch() thread, set by stop()

    @property
    def http_url(self) -> str:
        return f"{self.cfg.host}:{self.cfg.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.cfg.host}:{self.cfg.grpc_port}"

    def admin_headers(self, protocol: str = "grpc") -> dict[str, str]:
        """Headers that open the restricted APIs (the model repository's index, load and
        unload) of this server to a ``protocol`` client: ``client.load_model(name,
        headers=server.admin_headers())``."""
        if self.admin_key is None:
            raise ServerError("tritonserver was not started: it has no key yet")
        return admin_headers(self.admin_key, protocol)

    def start(self, timeout: float = 120.0) -> TritonServer:
        if self.running:
            raise ServerError(
                f"tritonserver is already running (pid {self.process.pid}): stop() it first"
            )
        if not (self.repository / PIPELINE / "config.pbtxt").exists():
            raise ServerError(f"{self.repository} holds no exported pipeline: run `wsss export`")
        plain = "a path of plain ASCII without spaces"
        check_stub_path("the model repository", self.repository, f"move it to {plain}")
        check_stub_path("the work folder", self.workdir, f"start the server from {plain}")
        if self.process is not None:  # a server that died: what it left goes first
            self._end()
        check_ports_free(self.cfg)
        backends = prepare_backends(self.workdir / "backends")
        self.admin_key = self.admin_key or admin_key()  # one key for the object's life
        sweep_shm()  # what killed servers before this one left
        self.shm_prefix = shm_prefix()
        cmd = server_command(
            self.repository,
            backends,
            self.cfg,
            has_gpu(),
            self.admin_key,
            self.open_apis,
            self.shm_prefix,
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                cmd, env=server_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        # No core file when it aborts (its stubs inherit the limit): `serve_forever` starts
        # it again, and each core of a server holding its models would be gigabytes.
        with contextlib.suppress(OSError):
            resource.prlimit(self.process.pid, resource.RLIMIT_CORE, (0, 0))
        try:
            self.wait_ready(timeout)
        except BaseException:  # Ctrl-C while it starts too: its own session would outlive us
            self._end()
            raise
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float) -> None:
        import tritonclient.http as http

        # Closed when ready: an open keep-alive connection makes tritonserver wait out its
        # exit timeout (30 s) at shutdown.
        client = http.InferenceServerClient(self.http_url)
        http_ready = False
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    code = self.process.returncode
                    raise ServerError(f"tritonserver exited ({exit_reason(code)}):\n{self.said()}")
                try:
                    # tritonserver opens its metrics endpoint after HTTP: ready is both
                    http_ready = client.is_server_ready()
                    if http_ready and self._metrics_listening():
                        return
                except ConnectionError:  # not listening yet; anything else is a real error
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        self._end()
        waiting = (
            f": HTTP ready, metrics port {self.cfg.metrics_port} not listening"
            if http_ready
            else ""
        )
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s{waiting}:\n{self.said()}")

    def _metrics_listening(self) -> bool:
        try:
            socket.create_connection((self.cfg.host, self.cfg.metrics_port), timeout=2).close()
        except OSError:
            return False
        return True

    def said(self, most: int = 8) -> str:
        """Why it did not start, from its log: the errors it logged (a model that failed to
        load names itself and why, above the lines that end the log), else the log's end;
        and where the whole log is."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        errors = [
            line[:600]
            for line in text.splitlines()
            if _ERROR.match(line) and not any(b in line for b in _NO_GPU)
        ][-most:]
        return "\n".join(errors or [self.log_tail(15, frames=False)]) + f"\n(log: {self.log_path})"

    def log_tail(self, lines: int = 40, frames: bool = True) -> str:
        """The log's last ``lines``; without ``frames``, those of a crash's stack trace
        (``12# 0x... in .../tritonserver``) left out: what it said before it died."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        kept = [line for line in text.splitlines() if frames or not _FRAME.match(line)]
        return "\n".join(kept[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT (tritonserver unloads its models and exits), SIGKILL after ``timeout``; then
        whatever is left of its process group (Python backend stubs) is killed too. Its
        watchdog stops."""
        while self._watchers:
            self._watchers.pop().set()
        self._end(timeout)

    def _end(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # the group is already gone
            pass
        else:
            deadline = time.monotonic() + 10  # SIGKILL is not instant: gone when stop returns
            while group_members(self.process.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.shm_prefix and not group_members(self.process.pid):
            for region in shm_regions(self.shm_prefix):  # a clean exit leaves none
                region.unlink(missing_ok=True)

    # Python-backend stubs. Every model but the ensembles runs in one under `wsss serve` (the
    # ONNX Runtime and PyTorch stand-in backends are Python-based). Triton 2.51 keeps a model
    # whose stub was killed READY, and fails each of its requests ("Stub process ... is not
    # healthy") until the model is reloaded; it does not reload it by itself.

    def stub_processes(self) -> list[Process]:
        """This server's live stub processes (from /proc): its own process group only, so
        that another server's stubs on the same repository (a benchmark's beside `make
        serve`) stand in for none of ours."""
        if self.process is None:
            return []
        return [
            p
            for p in processes()
            if p.group == self.process.pid and p.state != "Z" and p.stub_of(self.repository)
        ]

    def stubs(self) -> Counter[tuple[str, str, str]]:
        """(model, version, instance) of this server's current stubs, counted. Those of a
        model the watchdog reloaded are not current once its new stubs run: after a request
        failed on the dead instance, Triton 2.51 keeps the old load, its live stub included,
        until it exits, and that stub has the name of a new one."""
        procs = self.stub_processes()
        retired = set()
        for model, old in list(self._replaced.items()):
            mine = [p for p in procs if p.stub_of(self.repository)[0] == model]
            old &= {p.pid for p in mine}  # an exited stub's pid may come back as any process's
            if not old:
                self._replaced.pop(model, None)
                self._reloaded_at.pop(model, None)
            # The new load's stubs run: new pids of instances (not the short-lived stub the
            # Python backend starts while loading to read the config, named as the model).
            elif any(p.pid not in old and p.instance != model for p in mine):
                retired |= old
                self._reloaded_at.pop(model, None)  # that reload is done
        return Counter(
            (*p.stub_of(self.repository), p.instance) for p in procs if p.pid not in retired
        )

    def dead_instances(self, client) -> dict[tuple[str, str], list[str]]:
        """READY versions with an instance whose stub process is gone, and those instances.
        Each instance is matched, not the model: of a model's two instances, the live one
        answers while Triton hands every other request to the dead one, which fails."""
        index = client.get_model_repository_index(headers=self.admin_headers()).models
        ready = [(m.name, m.version) for m in index if m.state == "READY"]
        live = self.stubs()  # after the index: a version READY there has its stubs started
        dead = {}
        for name, version in ready:
            expected = expected_instances(client.get_model_config(name, version).config)
            missing = [i for i, n in sorted(expected.items()) if live[(name, version, i)] < n]
            if missing:
                dead[(name, version)] = missing
        return dead

    def reload(self, client, model: str) -> None:
        """Load ``model`` again, with new stubs: unload + load (and the ensembles it takes
        down with it) under explicit model control; under poll, newer version-folder
        timestamps make the next poll reload it."""
        self._replaced[model] = {
            p.pid for p in self.stub_processes() if p.stub_of(self.repository)[0] == model
        }
        self._reloaded_at[model] = time.monotonic()
        if self.cfg.model_control == "explicit":
            headers = self.admin_headers()
            ensembles = [
                m.name
                for m in client.get_model_repository_index(headers=headers).models
                if m.state == "READY"
                and client.get_model_config(m.name).config.platform == "ensemble"
            ]
            # The chains before the ensembles that step through them.
            order = list(ENSEMBLES)
            ensembles.sort(key=lambda n: order.index(n) if n in order else len(order))
            client.unload_model(model, headers=headers)
            client.load_model(model, headers=headers)
            for name in ensembles:
                client.load_model(name, headers=headers)
        else:
            # The poller compares folder timestamps, not the config's: an entry added to and
            # removed from each version folder is a change it reloads.
            for folder in (self.repository / model).iterdir():
                if folder.name.isdigit():
                    marker = folder / ".wsss-reload"
                    marker.touch()
                    marker.unlink()

    def _reloading(self, model: str) -> bool:
        """Whether the watchdog's last reload of ``model`` may still be under way: its old
        stubs all still counted (no new one runs yet), within a poll and a load's time.
        Reloading it again then would take the new stubs, still starting, for old ones."""
        if model not in self._reloaded_at:
            return False
        return time.monotonic() - self._reloaded_at[model] < 2 * self.cfg.poll_seconds + 30

    def watch(self, interval: float) -> threading.Thread:
        """A daemon thread that reloads every model whose stub died (seen dead twice in a
        row, ``interval`` seconds apart), until the server is stopped (a server that died
        and is started again, ``serve_forever``, is watched on)."""
        import tritonclient.grpc as grpc

        stopped = threading.Event()
        self._watchers.append(stopped)

        def loop() -> None:
            suspects: set[tuple[str, str]] = set()
            while not stopped.wait(interval):
                if not self.running:  # died: started again, or stopped, by its owner
                    suspects = set()
                    continue
                # A client per round, closed at once: an open connection would make
                # tritonserver wait out its exit timeout when it is stopped.
                client = grpc.InferenceServerClient(self.grpc_url)
                try:
                    dead = self.dead_instances(client)
                    gone: dict[str, list[str]] = {}  # model: its dead stubs, seen twice in a row
                    for model, version in sorted(dead.keys() & suspects):
                        gone.setdefault(model, []).extend(
                            f"{i} (v{version})" for i in dead[model, version]
                        )
                    for model, stubs in gone.items():
                        if self._reloading(model):
                            continue  # said when that reload began
                        print(f"wsss: stub {', '.join(stubs)} of {model} died", flush=True)
                        print(f"wsss: reloading {model}", flush=True)
                        try:
                            self.reload(client, model)
                        except OSError as exc:  # under poll: a read-only repository, say
                            print(f"wsss: cannot reload {model}: {exc}", flush=True)
                    suspects = set(dead)
                except Exception:  # the server is stopping, or busy reloading
                    suspects = set()
                finally:
                    client.close()

        thread = threading.Thread(target=loop, name="wsss-stub-watchdog", daemon=True)
        thread.start()
        return thread

    def serve_forever(
        self, restarts: int, window: float = 3600.0, say: Callable[[str], None] = print
    ) -> int:
        """Wait on tritonserver. Where it dies unasked (a crash: Triton 2.51 aborts on an
        HTTP request whose JSON declares a shape too large to allocate, before it reads the
        data; the OOM killer), keep its log beside the new one and start it again on the
        same ports and key, up to ``restarts`` times in ``window`` seconds (a start that
        fails counts as one). Its exit status when it is not started again (0: it exited by
        itself)."""
        starts: deque[float] = deque()
        code = self.process.wait()
        while True:
            now = time.monotonic()
            while starts and now - starts[0] > window:
                starts.popleft()
            if code == 0 or len(starts) >= restarts:
                return code
            starts.append(now)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            kept = self.log_path.with_name(
                f"{self.log_path.stem}.crashed-{stamp}-{len(starts)}{self.log_path.suffix}"
            )
            shutil.copyfile(self.log_path, kept)
            say(
                f"wsss: tritonserver died ({exit_reason(code)}); its log: {kept}\n"
                f"{self.log_tail(3, frames=False)}\nwsss: starting it again "
                f"({len(starts)} of {restarts} in {window / 60:.0f} min)"
            )
            try:
                self.start()
            except ServerError as exc:  # died again while loading, or never ready
                say(f"wsss: it did not start again: {exc}")
                code = 1  # stopped by us, perhaps cleanly: still a failure, for the budget
                continue
            say(f"wsss: serving again: HTTP {self.http_url}, gRPC {self.grpc_url}")
            code = self.process.wait()

    def __enter__(self) -> TritonServer:
        return self if self.running else self.start()  # a stopped or dead server starts again

    def __exit__(self, *exc) -> None:
        self.stop()
