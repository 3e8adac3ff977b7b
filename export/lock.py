"""One export at a time per repository, and staging folders that only a dead export leaves.

An export holds an advisory lock on ``.wsss-export-<repo>.lock`` beside the repository from
before it picks its version number until after its last rename, and has a staging folder
(under ``.wsss-staging-<repo>/``, also beside it) only while it holds the lock. So a second
export waits (or, told not to, fails at once), and whoever holds the lock knows that every
staging folder it finds was left by an export that died: no process ids are compared, which
a host and a container (or two pods) could not do, as each sees its own.

The lock is a POSIX record lock (``fcntl.lockf``: ``F_SETLK`` on the whole file), not
``flock``: it is what NFS itself implements (NLM for NFSv3, part of the protocol in NFSv4),
and CephFS keeps it on its metadata servers, so it holds between hosts on the ReadWriteMany
volumes ``deploy/kubernetes`` mounts (NFS, EFS, Filestore, CephFS); ``flock`` reaches an NFS
server only because Linux clients emulate it with this very lock (since 2.6.12), and not
every network filesystem's client carries it at all. On one host (compose's bind mount) the
host and its containers share the kernel's locks. The holder's kernel releases the lock
when the process dies, however it dies; an NFSv4 server releases the lock of a client
machine that vanished when its lease runs out (90 s by default on Linux). It relies on the
volume's locks reaching the server: an NFS mount with ``nolock`` or ``local_lock=posix|all``
keeps them on one node, and exports from two nodes would no longer be kept apart. A caveat
of POSIX locks: closing any descriptor of the lock file releases the process's lock, so
nothing else in an export opens it.

The lock file itself is never removed (removing it would let a waiter lock a file nobody
else opens any more); it holds a line saying who holds it, for the waiter's message, and is
emptied by an export that finishes, so that a note found on taking it says who did not.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from wsss.errors import InputError, WsssError

STAGING_PREFIX = ".wsss-staging-"
LOCK_PREFIX = ".wsss-export-"
POLL_SECONDS = 0.5  # how often a waiting export tries the lock again


class ExportLocked(WsssError):
    """The repository's export lock was not taken: another export holds it, or it can't be."""


@dataclass(frozen=True)
class Holder:
    """Who holds the lock, as written in the lock file."""

    host: str  # a container's or pod's own host name: the pid is only unique there
    pid: int
    started: str
    command: str

    @classmethod
    def me(cls) -> Holder:
        command = " ".join(shlex.join(sys.orig_argv).split())  # one line, for messages
        return cls(
            socket.gethostname(),
            os.getpid(),
            datetime.now().astimezone().isoformat(timespec="seconds"),
            command if len(command) <= 200 else command[:197] + "...",
        )

    def __str__(self) -> str:
        return (
            f"the export of {self.host} pid {self.pid} started at {self.started} ({self.command})"
        )


def lock_path(repo: Path) -> Path:
    repo = repo.resolve()
    return repo.parent / f"{LOCK_PREFIX}{repo.name}.lock"


def staging_root(repo: Path) -> Path:
    """Where exports into ``repo`` stage: beside it, so that a rename moves a folder in."""
    repo = repo.resolve()
    return repo.parent / f"{STAGING_PREFIX}{repo.name}"


@contextmanager
def locked_staging(repo: Path, wait_seconds: float | None = None) -> Iterator[Path]:
    """Hold ``repo``'s export lock and yield a new, empty staging folder beside it.

    Waits for another export holding the lock, saying so on stderr, up to ``wait_seconds``
    (None: as long as it takes; 0: not at all), then raises ExportLocked. Staging folders
    found on taking the lock were left by exports that died, and are removed; this one is
    removed on leaving, before the lock is released.
    """
    with _lock(lock_path(repo), repo, wait_seconds) as previous:
        if previous is not None:
            print(f"{previous} did not finish", file=sys.stderr, flush=True)
        root = staging_root(repo)
        _remove_leftovers(root)
        root.mkdir(exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{socket.gethostname()}-{os.getpid()}-", dir=root))
        try:
            yield folder
        finally:
            shutil.rmtree(root, ignore_errors=True)  # only ours: nobody stages without the lock


def _remove_leftovers(root: Path) -> None:
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        print(f"removing {folder}, left by an export that died", file=sys.stderr, flush=True)
        shutil.rmtree(folder)


@contextmanager
def _lock(path: Path, repo: Path, wait_seconds: float | None) -> Iterator[Holder | None]:
    """Hold the lock on ``path``; yield the note of a holder that did not finish, if any."""
    if wait_seconds is not None and wait_seconds < 0:
        raise InputError(f"export.lock_wait_seconds must be >= 0, not {wait_seconds}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError as exc:
        raise ExportLocked(
            f"cannot open the export lock {path} ({exc.strerror}): export as a user who can "
            f"write beside {repo}"
        ) from exc
    try:
        _acquire(fd, repo, wait_seconds)
        previous = _read(fd)
        _write(fd, json.dumps(asdict(Holder.me())).encode())
        try:
            yield previous
        finally:
            _write(fd, b"")  # finished: a note left in the file says its writer died
    finally:
        os.close(fd)  # releases the lock (so does the holder's death)


def _acquire(fd: int, repo: Path, wait_seconds: float | None) -> None:
    deadline = None if wait_seconds is None else time.monotonic() + wait_seconds
    told: Holder | str | None = None
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno == errno.ENOLCK:
                raise ExportLocked(
                    f"the filesystem of {repo} grants no locks (an NFS mount without a lock "
                    "manager?): two exports into it could not be kept apart"
                ) from exc
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        holder = _read(fd) or "another export"  # unnamed: it has not written its note yet
        if deadline is not None and time.monotonic() >= deadline:
            waited = f"gave up after {wait_seconds:g} s" if wait_seconds else "not waiting"
            raise ExportLocked(
                f"{repo} is locked by {holder}; {waited} (export.lock_wait_seconds, --no-wait)"
            )
        if told is None or (holder != told and isinstance(holder, Holder)):
            print(f"waiting for {holder} to finish with {repo}", file=sys.stderr, flush=True)
            told = holder
        time.sleep(POLL_SECONDS)


def _read(fd: int) -> Holder | None:
    """The note in the lock file; None when empty or half-written."""
    text = os.pread(fd, 4096, 0)
    try:
        return Holder(**json.loads(text)) if text else None
    except (ValueError, TypeError):  # being written as we read it, or not ours
        return None


def _write(fd: int, note: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, note, 0)
    os.fsync(fd)  # on NFS: to the server, where a waiter on another host reads it
