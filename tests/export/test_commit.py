"""An export's commit (its renames into the repository), once begun, ends with every model new:
interrupted at any rename it finishes first, and killed, the next export finishes it
(export/lock.py). Before it begins, the repository stays as it was."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from export.check import check_repository
from export.configs import parse
from export.lock import COMMIT_FILE, locked_staging, staging_root, unfinished_commit
from export.repository import commit, commit_plan, export_repository
from tests.conftest import ROOT, random_export_cfg
from wsss.config import save_config
from wsss.tensors import ENSEMBLES, LABELS_FILE

MODELS = ["preprocess", "classifier", "refiner", "segmenter", "postprocess", *ENSEMBLES]
NEW = 2  # the version the second export commits


def _model(folder: Path, version: int, text: str) -> None:
    """A model's files as an export writes them, each saying which export wrote it."""
    (folder / str(version)).mkdir(parents=True)
    (folder / str(version) / "model.onnx").write_text(text)
    (folder / "warmup").mkdir()
    (folder / "warmup" / "ORIGINAL_SIZE").write_text(text)
    (folder / LABELS_FILE).write_text(text)
    (folder / "config.pbtxt").write_text(text)


def _two_exports(tmp_path: Path, name: str = "host-1-dead") -> tuple[Path, Path]:
    """A repository of export 1 (with a ViT that export 2 retires), and export 2 staged."""
    repo = tmp_path / "repo"
    staging = staging_root(repo) / name
    for model in MODELS:
        _model(repo / model, 1, "old")
        _model(staging / model, NEW, "new")
    _model(repo / "vit", 1, "old")
    return repo, staging


def _commit(repo: Path, staging: Path) -> None:
    commit(staging, repo, NEW, MODELS, retire=["vit"])


def _assert_new(repo: Path) -> None:
    """Every model is export 2's, beside export 1's version; the ViT is gone."""
    for model in MODELS:
        folder = repo / model
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["1", "2", "warmup"]
        for path in ("config.pbtxt", LABELS_FILE, "warmup/ORIGINAL_SIZE", "2/model.onnx"):
            assert (folder / path).read_text() == "new", (model, path)
    assert sorted(p.name for p in repo.iterdir()) == sorted(MODELS)


def _snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_commit_interrupted_at_any_rename_ends_entirely_new(tmp_path, monkeypatch):
    """KeyboardInterrupt (a signal that could not be deferred) at the n-th rename, for every
    n: the commit finishes, then the interrupt goes on up."""
    real = os.replace
    for n in range(1, 1000):
        repo, staging = _two_exports(tmp_path / str(n))
        calls = []

        def interrupted(src, dest, n=n, calls=calls):
            calls.append(dest)
            if len(calls) == n:
                raise KeyboardInterrupt(f"at rename {n}")
            return real(src, dest)

        monkeypatch.setattr(os, "replace", interrupted)
        try:
            _commit(repo, staging)
        except KeyboardInterrupt as exc:  # said to have landed: it did
            assert str(exc) == f"after its commit: version {NEW} is in {repo}"
            assert str(exc.__cause__) == f"at rename {n}"
        else:
            break  # n is past the last rename: every one of them was interrupted once
        finally:
            monkeypatch.setattr(os, "replace", real)
        _assert_new(repo)
        assert not (staging / COMMIT_FILE).exists()
    assert n > len(MODELS) * 4  # per model: its version, warm-up file, labels and config
    _assert_new(repo)


def test_no_rename_leaves_a_config_naming_warm_up_data_that_is_not_there(tmp_path, monkeypatch):
    """The warm-up folder was moved aside, then the new one in: an export killed between
    the two left preprocess's config naming warmup/IMAGE_BYTES with no such file, and a
    fresh tritonserver could not load it. Now each file is renamed into the folder."""
    repo, staging = _two_exports(tmp_path)
    real = os.replace

    def checked(src, dest):
        for model in MODELS:  # before and after every rename of the commit
            assert (repo / model / "warmup" / "ORIGINAL_SIZE").is_file(), (model, dest)
        real(src, dest)
        for model in MODELS:
            assert (repo / model / "warmup" / "ORIGINAL_SIZE").is_file(), (model, dest)

    monkeypatch.setattr(os, "replace", checked)
    _commit(repo, staging)
    monkeypatch.undo()
    _assert_new(repo)


def test_a_list_an_older_wsss_wrote_is_finished_and_an_older_wsss_refuses_ours(tmp_path):
    """Older lists say "swap" for the warm-up folder: finished as its files' renames. Ours
    say "files", which an older wsss, whose swap would drop the files already moved, does
    not know: it refuses the list instead of carrying it out."""
    from export.lock import COMMIT_STEPS, commit_renames

    repo, staging = _two_exports(tmp_path)
    steps = commit_plan(staging, NEW, MODELS, retire=["vit"])
    assert ("files", "preprocess/warmup") in steps and "swap" in COMMIT_STEPS
    older = [("swap" if op == "files" else op, path) for op, path in steps]
    commit_renames(staging, repo, NEW, older)
    _assert_new(repo)


def test_a_commit_interrupted_before_its_first_rename_changes_nothing(tmp_path, monkeypatch):
    import export.lock as lock

    repo, staging = _two_exports(tmp_path)
    before = _snapshot(repo)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(lock, "_write_commit", interrupted)
    with pytest.raises(KeyboardInterrupt) as stopped:
        _commit(repo, staging)
    assert "after its commit" not in str(stopped.value)  # it did not begin: not said landed
    assert _snapshot(repo) == before
    assert not (staging / COMMIT_FILE).exists()  # the next export sweeps the folder


def test_sigint_during_a_commit_waits_for_its_last_rename(tmp_path, monkeypatch):
    """A real Ctrl-C in the middle: deferred, then delivered once the commit is done."""
    # Python's own handler, as in a terminal: a suite started in the background (`make
    # test &`) inherits SIGINT ignored, and nothing would be delivered.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupted_commit(tmp_path, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted_commit(tmp_path, monkeypatch):
    repo, staging = _two_exports(tmp_path)
    real, renamed = os.replace, []

    def interrupting(src, dest):
        if not renamed:  # handled before raise_signal returns: here, if it were not deferred
            signal.raise_signal(signal.SIGINT)
        renamed.append(dest)
        return real(src, dest)

    monkeypatch.setattr(os, "replace", interrupting)
    with pytest.raises(KeyboardInterrupt, match=f"after its commit: version {NEW} is in "):
        _commit(repo, staging)
    monkeypatch.undo()
    assert len(renamed) == len(set(renamed)) > len(MODELS) * 4  # each once, none redone
    _assert_new(repo)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# Runs a commit planned by the test, killing itself with a signal at the n-th rename.
KILLED = """
import json, os, signal, sys
from pathlib import Path
from export.lock import commit_renames
staging, repo, steps, n, sig = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), *sys.argv[4:]
real, calls = os.replace, []
def replace(src, dest):
    calls.append(dest)
    if len(calls) == int(n):
        os.kill(os.getpid(), int(sig))
    return real(src, dest)
os.replace = replace
commit_renames(Path(staging), Path(repo), 2, [tuple(s) for s in steps])
"""


def _killed_commit(repo: Path, staging: Path, n: int, sig: signal.Signals) -> int:
    steps = commit_plan(staging, NEW, MODELS, retire=["vit"])
    args = [staging, repo, json.dumps(steps), n, int(sig)]
    run = subprocess.run(
        [sys.executable, "-c", KILLED, *map(str, args)], cwd=ROOT, capture_output=True, text=True
    )
    return run.returncode


def test_sigterm_during_a_commit_stops_the_export_after_its_last_rename(tmp_path):
    repo, staging = _two_exports(tmp_path)
    assert _killed_commit(repo, staging, 12, signal.SIGTERM) == -signal.SIGTERM
    _assert_new(repo)
    assert not (staging / COMMIT_FILE).exists() and unfinished_commit(repo) is None


def test_a_commit_killed_midway_is_finished_by_the_next_export(tmp_path, capsys):
    repo, staging = _two_exports(tmp_path)
    moves = len(commit_plan(staging, NEW, MODELS))  # the retirement of vit is no move
    assert _killed_commit(repo, staging, 12, signal.SIGKILL) == -signal.SIGKILL
    # Half done: the first models are export 2's, the others still export 1's.
    configs = [(repo / m / "config.pbtxt").read_text() for m in MODELS]
    assert configs[0] == "new" and configs[-1] == "old", configs
    said = str(unfinished_commit(repo))
    assert f"version 2 did not finish (an export stopped after 11 of its {moves} moves" in said
    with locked_staging(repo) as ours:  # what the next export does on taking the lock
        assert not staging.exists() and ours.is_dir()
    _assert_new(repo)
    assert f"finishing the commit of version 2 into {repo}" in capsys.readouterr().err
    assert not staging_root(repo).exists() and unfinished_commit(repo) is None


def _commit_failing(repo: Path, monkeypatch, fails) -> Path:
    """Export 2 staged under the lock and committed with every rename into a ``dest`` that
    ``fails`` raising PermissionError (a filesystem's error); the staging folder."""
    real = os.replace

    def failing(src, dest):
        if fails(dest):
            raise PermissionError(13, "injected", str(dest))
        return real(src, dest)

    with pytest.raises(PermissionError), locked_staging(repo) as staging:
        for model in MODELS:
            _model(staging / model, NEW, "new")
        monkeypatch.setattr(os, "replace", failing)
        _commit(repo, staging)
    monkeypatch.undo()
    return staging


def test_a_commit_whose_first_rename_fails_leaves_no_list(tmp_path, monkeypatch, capsys):
    """Nothing moved (a permission at the first rename): the repository is as it was, and
    the next export has no list to finish, which would fail the same way. A model new to
    the repository (its folder made for the first move) leaves no empty folder."""
    import shutil

    repo, _ = _two_exports(tmp_path)
    shutil.rmtree(repo / MODELS[0])
    before = _snapshot(repo)
    # every rename into a model's folder fails
    _commit_failing(repo, monkeypatch, lambda dest: Path(dest).parent.parent == repo)
    assert "did not finish" not in capsys.readouterr().err
    assert _snapshot(repo) == before and unfinished_commit(repo) is None
    assert sorted(p.name for p in repo.iterdir()) == sorted([*MODELS[1:], "vit"])
    assert not staging_root(repo).exists() or not any(staging_root(repo).iterdir())


def test_a_commit_whose_rename_fails_is_kept_for_the_next_export(tmp_path, monkeypatch, capsys):
    """An error of the filesystem mid-commit: the renames left and their list stay, and the
    next export carries them out."""
    repo, _ = _two_exports(tmp_path)
    refiner = repo / "refiner" / "config.pbtxt"
    staging = _commit_failing(repo, monkeypatch, lambda dest: Path(dest) == refiner)
    assert "the commit into" in capsys.readouterr().err
    assert (staging / COMMIT_FILE).exists()
    assert (repo / "refiner" / "config.pbtxt").read_text() == "old"
    assert "did not finish" in str(unfinished_commit(repo))
    with locked_staging(repo):
        assert unfinished_commit(repo) is None  # ours is the lock: and it was finished
    _assert_new(repo)


def _served(repo: Path) -> dict[str, list[int]]:
    return {
        m: list(parse((repo / m / "config.pbtxt").read_text()).version_policy.specific.versions)
        for m in MODELS
        if m not in ENSEMBLES
    }


def test_an_export_interrupted_in_its_commit_serves_its_version_everywhere(tmp_path, monkeypatch):
    cfg = random_export_cfg(tmp_path)
    export_repository(cfg)
    repo = Path(cfg.export.repository)
    real, configs = os.replace, []

    def interrupted(src, dest):  # where the review's run stopped: the third config
        if Path(dest).name == "config.pbtxt":
            configs.append(dest)
            if len(configs) == 3:
                raise KeyboardInterrupt
        return real(src, dest)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_repository(cfg)
    monkeypatch.undo()
    assert {versions[-1] for versions in _served(repo).values()} == {NEW}
    assert all((repo / m / str(NEW)).is_dir() for m in MODELS)
    assert check_repository(repo).ok
    assert not staging_root(repo).exists()


# An export that kills itself at the rename of its third config.
KILLED_EXPORT = """
import os, signal, sys
from export.repository import export_repository
from wsss.config import load_config
real, configs = os.replace, []
def replace(src, dest):
    if str(dest).endswith("config.pbtxt"):
        configs.append(dest)
        if len(configs) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dest)
os.replace = replace
export_repository(load_config(sys.argv[1], []))
"""


@pytest.mark.slow  # an export in a process of its own (torch to import)
def test_an_export_killed_in_its_commit_is_finished_by_the_next(tmp_path, capsys):
    cfg = random_export_cfg(tmp_path)
    export_repository(cfg)
    repo = Path(cfg.export.repository)
    save_config(cfg, tmp_path / "config.yaml")
    run = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT, str(tmp_path / "config.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert {versions[-1] for versions in _served(repo).values()} == {1, NEW}  # mixed
    assert "did not finish" in str(unfinished_commit(repo))
    assert export_repository(cfg).version == NEW + 1
    assert "finishing the commit of version 2" in capsys.readouterr().err
    for model in MODELS:  # version 2 is whole in every model, not only in the first three
        assert sorted(p.name for p in (repo / model).iterdir() if p.name.isdigit()) == [
            "1",
            "2",
            "3",
        ]
    assert check_repository(repo).ok and unfinished_commit(repo) is None


def test_check_says_a_commit_did_not_finish(tmp_path):
    repo, staging = _two_exports(tmp_path)
    _killed_commit(repo, staging, 12, signal.SIGKILL)
    report = check_repository(repo, load_models=False)
    assert any("the commit of version 2 did not finish" in p for p in report.problems)


def test_a_commit_that_moved_nothing_or_all_but_its_removals_is_said_not_failed(tmp_path):
    """Killed before its first move, or while removing what no config serves: the
    repository serves one export; --check said it served two, and failed."""
    repo, staging = _two_exports(tmp_path / "none")
    steps = commit_plan(staging, NEW, MODELS, retire=["vit"])
    (staging / COMMIT_FILE).write_text(json.dumps({"version": NEW, "steps": steps}))
    said = unfinished_commit(repo)
    assert said.servable and "did not begin its moves" in said.message
    assert "it serves the export before as it was" in said.message
    repo, staging = _two_exports(tmp_path / "all")
    moves = len([s for s in steps if s[0] != "retire"])
    assert _killed_commit(repo, staging, moves + 1, signal.SIGKILL) == -signal.SIGKILL
    said = unfinished_commit(repo)
    assert said.servable and "did not finish removing vit" in said.message


def test_a_repository_mounted_on_its_own_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    """A volume mounted at the repository itself (a bind mount of the same filesystem too):
    the staging folder beside it is across a mount, and the commit's renames failed (EXDEV)
    with a traceback, leaving a list every later export failed on. Read from the mount
    table: nothing is written into the repository a server polls."""
    import export.lock as lock
    from wsss.errors import InputError

    repo = tmp_path / "repo"
    repo.mkdir()
    assert "/" in lock.mount_points() or not Path("/proc/self/mountinfo").exists()
    with lock.locked_staging(repo):  # not a mount: staged, and nothing left in the repository
        pass
    assert not any(repo.iterdir())
    monkeypatch.setattr(lock, "mount_points", lambda: {str(repo.resolve())})
    with pytest.raises(InputError, match="is a mount of its own"), lock.locked_staging(repo):
        pytest.fail("staged")
    assert not staging_root(repo).exists() and not any(repo.iterdir())


def test_a_signal_between_two_handler_changes_leaves_none_of_the_deferring_ones(monkeypatch):
    """SIGTERM now raises (export unwinds on it): arriving between the deferring handlers'
    installation or restoration, it left SIGINT's recorder installed, and Ctrl-C ignored."""
    import export.lock as lock

    handlers = {s: signal.getsignal(s) for s in lock.DEFERRED_SIGNALS}
    real, calls = signal.signal, []

    def raising_once_installed(sig, handler):  # the second installation is interrupted
        calls.append(sig)
        previous = real(sig, handler)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return previous

    monkeypatch.setattr(signal, "signal", raising_once_installed)
    with pytest.raises(KeyboardInterrupt), lock._signals_deferred():
        pytest.fail("entered")
    assert {s: signal.getsignal(s) for s in lock.DEFERRED_SIGNALS} == handlers
    calls.clear()

    def raising_once_restored(sig, handler):  # the first restoration is interrupted
        calls.append(sig)
        previous = real(sig, handler)
        if len(calls) == len(lock.DEFERRED_SIGNALS) + 1:
            raise KeyboardInterrupt
        return previous

    monkeypatch.setattr(signal, "signal", raising_once_restored)
    with pytest.raises(KeyboardInterrupt), lock._signals_deferred():
        pass
    monkeypatch.undo()
    assert {s: signal.getsignal(s) for s in lock.DEFERRED_SIGNALS} == handlers
