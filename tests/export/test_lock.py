"""Exports into one repository take turns (export/lock.py): real `wsss export` processes
started at once, one told not to wait, and one killed while it held the lock."""

import re
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from export.check import check_repository
from export.lock import ExportLocked, lock_path, staging_root
from export.repository import export_repository
from tests.conftest import random_export_cfg, wait_for
from wsss.config import save_config

pytestmark = pytest.mark.slow

# Stands in for an export that holds the lock with a half-written version staged, until the
# test closes its stdin.
HOLD = """
import sys
from pathlib import Path
from export.lock import locked_staging
with locked_staging(Path(sys.argv[1])) as staging:
    (staging / "classifier" / "9").mkdir(parents=True)
    (staging / "classifier" / "9" / "model.onnx").write_bytes(b"half written")
    print(staging, flush=True)
    sys.stdin.read()
"""


@contextmanager
def holding(repo: Path):
    """Another process holding ``repo``'s export lock: yields it and its staging folder."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(repo)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # printed once the lock is held
        assert line, "the holder exited before it held the lock"
        yield proc, Path(line.strip())
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def _snapshot(repo):
    return {p: p.read_bytes() for p in sorted(Path(repo).rglob("*")) if p.is_file()}


def _wsss_export(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cli", "export", "--config", str(config), *args]


@pytest.fixture
def setup(tmp_path):
    """A config for the tiny random models, as a file for `wsss export --config`."""
    cfg = random_export_cfg(tmp_path)
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    return cfg, path, Path(cfg.export.repository)


def test_two_exports_at_once_take_turns(setup, tmp_path):
    cfg, config, repo = setup
    # The two exports differ in their networks' files, so each version says whose it is.
    torchscript = [f"export.{m}.format=torchscript" for m in ("classifier", "segmenter")]
    formats = {"torchscript": [x for s in torchscript for x in ("--set", s)], "onnx": []}
    procs = {}
    with holding(repo) as (holder, held):
        for fmt, sets in formats.items():
            with (
                open(tmp_path / f"{fmt}.out", "w") as out,
                open(tmp_path / f"{fmt}.err", "w") as err,
            ):
                procs[fmt] = subprocess.Popen(_wsss_export(config, *sets), stdout=out, stderr=err)
        waiting = f"waiting for the export of {socket.gethostname()} pid {holder.pid} "
        wait_for(
            lambda: all(waiting in (tmp_path / f"{f}.err").read_text() for f in formats),
            120,
            "both exports to say they wait for the holder",
        )
        assert (held / "classifier" / "9" / "model.onnx").exists()  # a live export's: kept
    for proc in procs.values():
        assert proc.wait(timeout=600) == 0
    version = {
        f: int(re.search(r"exported version (\d+)", (tmp_path / f"{f}.out").read_text())[1])
        for f in formats
    }
    assert sorted(version.values()) == [1, 2]
    first, second = sorted(formats, key=version.get)
    # The second waited for the first, by name, once the holder was gone.
    assert f"pid {procs[first].pid} " in (tmp_path / f"{second}.err").read_text()
    for fmt, v in version.items():  # each version holds one export's files, and all of them
        ours, theirs = ("model.pt", "model.onnx")[:: 1 if fmt == "torchscript" else -1]
        for name in ("classifier", "segmenter"):
            files = {p.name for p in (repo / name / str(v)).iterdir()}
            assert ours in files and theirs not in files, (name, v, files)
        meta = yaml.safe_load((repo / "classifier" / str(v) / "wsss_config.yaml").read_text())
        assert meta["export"]["classifier"]["format"] == fmt
    for model in repo.iterdir():
        assert sorted(p.name for p in model.iterdir() if p.name.isdigit()) == ["1", "2"], model
    check = subprocess.run(_wsss_export(config, "--check"), capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.startswith("OK: "), check.stdout
    assert not list(tmp_path.glob(".wsss-staging-*"))


def test_no_wait_fails_at_once_and_changes_nothing(setup):
    cfg, config, repo = setup
    export_repository(cfg)
    before = _snapshot(repo)
    with holding(repo) as (holder, held):
        run = subprocess.run(
            _wsss_export(config, "--no-wait"), capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 1 and run.stdout == ""
        (line,) = run.stderr.splitlines()  # one line, no traceback
        assert line.startswith(f"wsss export: {repo.resolve()} is locked by the export of ")
        assert f"pid {holder.pid} " in line and "not waiting" in line
        cfg.export.lock_wait_seconds = 0.5  # in process, and a wait that runs out
        with pytest.raises(ExportLocked, match=r"gave up after 0\.5 s"):
            export_repository(cfg)
        assert (held / "classifier" / "9" / "model.onnx").read_bytes() == b"half written"
    assert _snapshot(repo) == before
    assert check_repository(repo).ok


def test_a_killed_export_does_not_block_the_next(setup, capsys):
    cfg, config, repo = setup
    elsewhere = repo.parent / ".wsss-staging-another_repository" / "its-staging"
    elsewhere.mkdir(parents=True)  # another repository's export: not this one's to sweep
    proc = subprocess.Popen(
        _wsss_export(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    staged = lambda: list(staging_root(repo).glob(f"*-{proc.pid}-*/classifier/*/model.onnx"))  # noqa: E731
    wait_for(staged, 120, "the export to reach its staging step")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = staged()[0].parents[2]
    assert export_repository(cfg).version == 1  # neither its lock nor its folder in the way
    err = capsys.readouterr().err
    assert f"pid {proc.pid} " in err and "did not finish" in err and f"removing {left}" in err
    assert not staging_root(repo).exists() and elsewhere.is_dir()
    assert lock_path(repo).read_text() == ""  # the note of a finished export: none
    assert check_repository(repo).ok
