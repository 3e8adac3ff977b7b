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

The commit (``commit_renames``) moves the staged files in, one rename at a time. Once begun,
it ends with every model new, never with two exports' models side by side: SIGINT, SIGTERM
and SIGHUP wait until it is done, an exception between renames finishes the renames before
it goes on up, and a kill (SIGKILL, a power cut) leaves the list of renames in the staging
folder (``COMMIT_FILE``, written and synced before the first one), which the next holder of
the lock carries out before anything else, instead of removing the folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from wsss.errors import InputError, WsssError

STAGING_PREFIX = ".wsss-staging-"
LOCK_PREFIX = ".wsss-export-"
POLL_SECONDS = 0.5  # how often a waiting export tries the lock again
# In a staging folder from just before its commit's first rename to just after its last:
# the renames, for the next export to finish after a kill.
COMMIT_FILE = ".wsss-commit.json"
# What a commit does with each path (the same under the staging folder and the repository):
# move it in (a version folder, a file), rename its files into the folder there (warm-up
# data: "files"; "swap", the whole folder's exchange of older lists, is finished the same
# way, and an older wsss refuses "files" rather than carry it out as its swap), or retire
# the folder there (an optional model the new ensembles no longer step through, a version
# folder no config serves): moved into the staging folder's RETIRED, deleted with it.
COMMIT_STEPS = ("move", "files", "swap", "retire")
RETIRED = ".retired"  # in a staging folder: what its commit retired, until it is deleted
# Signals that wait for the end of a commit: Ctrl-C, `docker stop`/`kill`, a closed terminal.
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_held: set[Path] = set()  # lock files this process holds: never opened again while held


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
    found on taking the lock were left by exports that died: the commit one of them had
    begun is finished, then they are removed. This one is removed on leaving, before the
    lock is released, unless its commit failed half done: the next export finishes it.
    """
    with _lock(lock_path(repo), repo, wait_seconds) as previous:
        if previous is not None:
            print(f"{previous} did not finish", file=sys.stderr, flush=True)
        root = staging_root(repo)
        _refuse_a_mount(repo, root.parent)
        _remove_leftovers(root, repo)
        root.mkdir(exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{socket.gethostname()}-{os.getpid()}-", dir=root))
        try:
            yield folder
        finally:
            if (folder / COMMIT_FILE).exists():  # its renames failed (an OSError), half done
                print(
                    f"the commit into {repo} did not finish: the next export finishes it "
                    f"(the renames left are listed in {folder / COMMIT_FILE})",
                    file=sys.stderr,
                    flush=True,
                )
            else:  # only ours: nobody stages without the lock
                shutil.rmtree(root, ignore_errors=True)


def _refuse_a_mount(repo: Path, beside: Path) -> None:
    """Refuse a repository that is a mount of its own (a volume mounted at it, a bind mount
    of the same filesystem included): from the staging folder beside it no rename moves a
    version in (the commit failed with EXDEV and a traceback, and every export after it).
    Read from the mount table, not tried: a file renamed into the repository and out again
    could fail a polling tritonserver's listing of it (an entry gone between its readdir
    and its stat), which unloads every model."""
    if not repo.is_dir():
        return
    resolved = repo.resolve()
    if str(resolved) in mount_points() or resolved.stat().st_dev != beside.stat().st_dev:
        raise InputError(
            f"{repo} is a mount of its own (exports stage beside it, in {beside}, and a "
            "rename does not cross mounts): a version cannot move into it atomically; mount "
            "the folder above it instead (docker-compose.yml mounts the folder holding it)"
        )


def mount_points() -> set[str]:
    """This process's mount points (Linux's /proc/self/mountinfo; none where it is not)."""
    try:
        table = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return set()
    octal = re.compile(r"\\([0-7]{3})")  # a space in a path is written \040
    return {
        octal.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        for fields in map(str.split, table.splitlines())
        if len(fields) > 4
    }


def _remove_leftovers(root: Path, repo: Path) -> None:
    """Finish the commit a dead export began, if any; remove every dead export's folder."""
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        planned = _read_commit(folder)
        if planned is not None:
            version, steps = planned
            print(
                f"finishing the commit of version {version} into {repo}, left half done by "
                f"an export that died ({folder})",
                file=sys.stderr,
                flush=True,
            )
            with _signals_deferred():
                _carry_out(folder, repo, steps)
        else:
            print(f"removing {folder}, left by an export that died", file=sys.stderr, flush=True)
        shutil.rmtree(folder)


def commit_renames(folder: Path, repo: Path, version: int, steps: list[tuple[str, str]]) -> None:
    """Carry out ``steps`` (``COMMIT_STEPS``, each on a path relative to both ``folder`` and
    ``repo``) in order: all of them, even if interrupted once begun.

    The staged files are synced first (a rename must not outlive its file's contents in a
    power cut); then the list is written beside them, so that an export that dies from here
    on is finished by the next; the renames run with SIGINT, SIGTERM and SIGHUP deferred
    (delivered once they are done); an exception between them (KeyboardInterrupt where the
    signals could not be deferred) finishes them, then goes on up. Only an error of the
    renames themselves (an OSError) leaves them undone, and the list for the next export
    where some were made (none made: no list, the repository as it was).
    """
    _check_steps(steps)
    _sync_tree(folder)
    landed = f"after its commit: version {version} is in {repo}"
    done = False
    try:
        with _signals_deferred():
            _write_commit(folder, version, steps)
            _carry_out_to_the_end(folder, repo, steps, landed)
            done = True
    except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: held back until the renames ended
        if not done:
            raise
        raise type(exc)(landed) from exc


def _carry_out_to_the_end(folder: Path, repo: Path, steps: list[tuple[str, str]], landed: str):
    """``_carry_out``, finished after an exception between two renames, which then goes on
    up (an interrupt saying ``landed``); an OSError of the renames themselves leaves the
    list (none made: no list)."""
    try:
        _carry_out(folder, repo, steps)
    except BaseException as exc:
        try:
            _carry_out(folder, repo, steps)  # what was left
        except OSError:
            if all(_staged(folder / path, op) for op, path in steps if op != "retire"):
                _nothing_moved(folder, repo, steps)
            raise
        if isinstance(exc, KeyboardInterrupt):
            raise type(exc)(landed) from exc
        raise


def _nothing_moved(folder: Path, repo: Path, steps: list[tuple[str, str]]) -> None:
    """Not one move made (a permission, a full disk at the first rename): the repository
    as it was (less a model folder made for the first move, if empty), and no list for a
    later export to finish, which would fail the same way."""
    (folder / COMMIT_FILE).unlink(missing_ok=True)
    for _, path in steps:
        if (repo / path).parent != repo:
            with contextlib.suppress(OSError):  # not empty, or gone: left as it is
                (repo / path).parent.rmdir()


@dataclass(frozen=True)
class Unfinished:
    """A commit an export began and did not finish: whether the repository serves one
    export meanwhile (``servable``: none of its moves done, or all of them), and what to
    tell."""

    servable: bool
    message: str

    def __str__(self) -> str:
        return self.message


def unfinished_commit(repo: str | Path) -> Unfinished | None:
    """What to tell of a commit into ``repo`` that an export began and did not finish (it
    died): None when there is none, or the export that wrote the list is committing now."""
    repo = Path(repo)
    root = staging_root(repo)
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        planned = _read_commit(folder)
        if planned is None:
            continue
        if _in_use(lock_path(repo)):  # its export is alive, committing now
            return None
        version, steps = planned
        moves = [(op, path) for op, path in steps if op != "retire"]
        # a warm-up folder whose files all moved is done, though not yet removed
        left = [path for op, path in moves if _staged(folder / path, op)]
        retiring = [path for op, path in steps if op == "retire" and (repo / path).exists()]
        if not left and not retiring:
            continue  # every step done, the list not yet removed
        if not left:  # every config new: what stays is what no config serves
            return Unfinished(
                True,
                f"{repo}: the commit of version {version} did not finish removing "
                f"{', '.join(retiring)} (an export stopped; {folder / COMMIT_FILE} lists "
                "them): the next `wsss export` removes them",
            )
        if len(left) == len(moves):
            return Unfinished(
                True,
                f"{repo}: the commit of version {version} did not begin its moves (an export "
                f"stopped; {folder / COMMIT_FILE} lists them): it serves the export before "
                "as it was, and the next `wsss export` carries the commit out before its own",
            )
        return Unfinished(
            False,
            f"{repo}: the commit of version {version} did not finish (an export stopped "
            f"after {len(moves) - len(left)} of its {len(moves)} moves; {folder / COMMIT_FILE} "
            "lists them): it serves models of two exports until the next `wsss export` "
            "finishes the commit, before its own",
        )
    return None


def _staged(path: Path, op: str) -> bool:
    """Whether a move step still has something staged to move in."""
    if op in ("files", "swap") and path.is_dir():
        return any(path.iterdir())
    return path.exists()


def _carry_out(folder: Path, repo: Path, steps: list[tuple[str, str]]) -> None:
    """Do the steps whose source is still staged (the others are done), sync the folders
    they changed, then remove the list: what a commit does, and what finishes a dead one."""
    for op, path in steps:
        src, dest = folder / path, repo / path
        if op == "retire":
            _retire(dest, folder / RETIRED / path)
        elif op in ("files", "swap"):
            _move_files(src, dest)
        elif src.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
    changed = {repo, folder} | {
        (root / path).parent for _, path in steps for root in (repo, folder)
    }
    changed |= {repo / path for op, path in steps if op in ("files", "swap")}  # files renamed in
    for path in changed:
        _sync_dir(path)
    (folder / COMMIT_FILE).unlink(missing_ok=True)


def _move_files(src: Path, dest: Path) -> None:
    """The files of the folder ``src`` into the folder ``dest``, a rename each, so that
    ``dest`` is never without a file a config on disk names: moving the old folder aside
    and the new one in left a moment without it, and an export killed there left a
    repository whose model a fresh server could not load (its warm-up file missing). A
    file only the old data had stays (its config may name it until replaced; a few bytes).
    """
    if src.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        for file in sorted(src.iterdir()):
            os.replace(file, dest / file.name)
        src.rmdir()
    shutil.rmtree(dest.with_name(f".{dest.name}.old"), ignore_errors=True)  # older wsss's


def _retire(dest: Path, aside: Path) -> None:
    """Out of the repository Triton polls, by a rename into the staging folder (``aside``),
    which is deleted with it once the export is done: hundreds of MB are not deleted while
    the signals wait, and what a killed export left goes with its folder."""
    if dest.is_dir():
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(dest, aside)


def _check_steps(steps: list[tuple[str, str]]) -> None:
    for op, path in steps:
        parts = Path(path).parts
        if op not in COMMIT_STEPS or not parts or Path(path).is_absolute() or ".." in parts:
            raise WsssError(f"not a commit step: {op} {path}")


def _write_commit(folder: Path, version: int, steps: list[tuple[str, str]]) -> None:
    try:
        with open(folder / COMMIT_FILE, "w") as f:
            json.dump({"version": version, "steps": steps}, f)
            f.flush()
            os.fsync(f.fileno())
        _sync_dir(folder)
    except BaseException:
        (folder / COMMIT_FILE).unlink(missing_ok=True)  # not begun: nothing changed
        raise


def _read_commit(folder: Path) -> tuple[int, list[tuple[str, str]]] | None:
    """The version and steps of ``folder``'s commit; None where none began (no list, or one
    cut short while written: no rename comes before it is whole on disk)."""
    try:
        planned = json.loads((folder / COMMIT_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    try:
        version, steps = int(planned["version"]), [(op, p) for op, p in planned["steps"]]
        _check_steps(steps)
    except (KeyError, TypeError, ValueError, WsssError) as exc:
        raise WsssError(
            f"{folder / COMMIT_FILE} lists no commit this version of wsss reads ({exc}): "
            "finish its renames into the repository by hand, or remove the folder"
        ) from exc
    return version, steps


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold ``DEFERRED_SIGNALS`` back until the block ends, then deliver them as they would
    have been (KeyboardInterrupt, the end of the process): meanwhile their handler only
    notes them. A handler, not a signal mask: the kernel hands a signal to any thread that
    does not block it (ONNX Runtime's and torch's have their own masks), and Python runs its
    handlers in the main thread whichever received it. In another thread, where no handler
    can be set, there is nothing to defer: an interrupt is raised in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, Any] = {}
    try:  # one at a time, each noted before it changes: a signal between two, put back too
        for sig in DEFERRED_SIGNALS:
            if (before := signal.getsignal(sig)) is not None:  # None: set outside Python
                previous[sig] = before
                signal.signal(sig, lambda signum, frame: received.append(signum))
        yield
    finally:
        _restore(list(previous.items()))
        for sig in sorted(set(received)):
            signal.raise_signal(sig)


def _restore(handlers: list[tuple[int, Any]]) -> None:
    """Each signal's handler back, every one of them even where a signal delivered to one
    just restored raises before the next (each of the rest restored in a ``finally``)."""
    if handlers:
        (sig, handler), rest = handlers[0], handlers[1:]
        try:
            signal.signal(sig, handler)
        finally:
            _restore(rest)


def _sync_tree(folder: Path) -> None:
    """Every file under ``folder`` on disk, then the folders that name them."""
    for parent, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dir(Path(parent))


def _sync_dir(folder: Path) -> None:
    """A folder's entries (renames in or out of it) on disk; nothing where none is left."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot sync a folder (EINVAL): nothing to do
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _in_use(path: Path) -> bool:
    """Whether an export holds the lock file ``path`` (this process's included), tried
    without waiting and let go at once."""
    if path.resolve() in _held:  # a second descriptor's close would release our lock
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # none yet, or not ours to read: none that we can tell
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EACCES, errno.EAGAIN)
    finally:
        os.close(fd)
    return False


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
        _held.add(path.resolve())
        previous = _read(fd)
        _write(fd, json.dumps(asdict(Holder.me())).encode())
        try:
            yield previous
        finally:
            _write(fd, b"")  # finished: a note left in the file says its writer died
    finally:
        _held.discard(path.resolve())
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
