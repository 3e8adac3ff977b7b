"""The one training loop: an interrupted training leaves the stage's last complete run as it
was, the checkpoint an export took from it included."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.loop import fit, load_checkpoint
from wsss.errors import InputError, WsssError


def _loader(n: int = 8) -> DataLoader:
    images = torch.randint(0, 255, (n, 8, 8, 3), dtype=torch.uint8)
    return DataLoader(TensorDataset(images, torch.randint(0, 2, (n,))), batch_size=4)


def _fit(model, out, epochs, loss=None):
    loss = loss or nn.CrossEntropyLoss()
    return fit(
        model, _loader(), _loader(), loss, epochs=epochs, lr=0.01, weight_decay=0.0,
        device=torch.device("cpu"), out_dir=out, meta={"run": epochs}, desc="t",
    )  # fmt: skip


def _model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 2))


def test_an_interrupted_training_leaves_the_last_complete_run_whole(tmp_path):
    torch.manual_seed(0)
    _fit(_model(), tmp_path, epochs=2)
    before = {f: (tmp_path / f).read_bytes() for f in ("best.pt", "metrics.jsonl")}
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    # two epochs of _fit's 2 train and 2 val batches, then Ctrl-C
    stopped_in_the_third_epoch = _stopped_after(2 * 4, nn.functional.cross_entropy)
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), tmp_path, epochs=5, loss=stopped_in_the_third_epoch)
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    # and the stopped run's state, for `wsss train --resume`
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "metrics.jsonl", "resume.pt"]
    assert load_checkpoint(tmp_path / "resume.pt")["epoch"] == 2
    assert load_checkpoint(tmp_path / "best.pt")["meta"]["run"] == 2
    # Done, the new run takes the place of the last.
    _fit(_model(), tmp_path, epochs=3)
    assert load_checkpoint(tmp_path / "best.pt")["meta"]["run"] == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "metrics.jsonl"]


def _shuffled_fit(out, epochs, loss, resume=False):
    """Shuffled batches (the loader's generator), dropout (torch's) and a loss drawing from
    numpy (as the augmentations do): every generator a next epoch reads."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (16, 8, 8, 3), dtype=torch.uint8, generator=g)
    data = TensorDataset(images, torch.randint(0, 2, (16,), generator=g))
    train = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator())
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 8 * 3, 2))
    return model, fit(
        model, train, DataLoader(data, batch_size=8), loss, epochs=epochs, lr=0.01,
        weight_decay=0.01, device=torch.device("cpu"), out_dir=out, meta={"run": "r"},
        desc="t", resume=resume,
    )  # fmt: skip


EPOCH_BATCHES = 4 + 2  # of _shuffled_fit's: 16 images in 4 to train on, 16 in 2 to validate


def _stopped_after(batches: int, loss=None):
    """A loss that stops the training (Ctrl-C) at its call after ``batches`` calls."""
    calls = []

    def stopped(logits, targets):
        calls.append(1)
        if len(calls) > batches:
            raise KeyboardInterrupt
        return (loss or _noisy)(logits, targets)

    return stopped


def _noisy(logits, targets):
    return nn.functional.cross_entropy(logits, targets) * (1 + 0.5 * np.random.rand())


def _records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def test_a_stopped_training_resumed_ends_as_if_never_stopped(tmp_path, capsys):
    torch.manual_seed(0), np.random.seed(0)
    whole, _ = _shuffled_fit(tmp_path / "whole", 4, _noisy)
    stopped_in_the_third_epoch = _stopped_after(2 * EPOCH_BATCHES)
    out = tmp_path / "stopped"
    torch.manual_seed(0), np.random.seed(0)
    with pytest.raises(KeyboardInterrupt):
        _shuffled_fit(out, 4, stopped_in_the_third_epoch)
    torch.manual_seed(1), np.random.seed(1)  # whatever the generators hold now
    resumed, path = _shuffled_fit(out, 4, _noisy, resume=True)
    assert "t: resuming after epoch 2 of 4" in capsys.readouterr().out
    assert _records(out) == _records(tmp_path / "whole")
    assert len(_records(out)) == 4 and len({r["train_loss"] for r in _records(out)}) == 4
    for a, b in zip(resumed.parameters(), whole.parameters(), strict=True):
        assert torch.equal(a, b)
    expected = load_checkpoint(tmp_path / "whole" / "best.pt")
    assert load_checkpoint(path)["meta"] | {"seconds": 0} == expected["meta"] | {"seconds": 0}
    for name, tensor in load_checkpoint(path)["state_dict"].items():
        assert torch.equal(tensor, expected["state_dict"][name])
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "metrics.jsonl"]  # done


def test_each_rank_takes_back_its_own_generators(monkeypatch):
    """A resume point holds every rank's generators in rank order; each rank takes its
    own (a rank past the saved ones keeps its own; an older point's one dict is rank 0's)."""
    from torch.utils.data import DataLoader

    from training import distributed, loop

    loader = DataLoader(list(range(4)), generator=torch.Generator())
    states = []
    for seed in (0, 1):
        np.random.seed(seed)
        torch.manual_seed(seed)
        loader.generator.manual_seed(seed)
        states.append(loop._get_rng(loader, torch.device("cpu")))
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        np.random.seed(99)
        torch.manual_seed(99)
        loop._set_rng(states, loader, torch.device("cpu"))
        assert np.random.rand() == np.random.RandomState(rank).rand()
        assert (
            torch.rand(1).item()
            == torch.rand(1, generator=torch.Generator().manual_seed(rank)).item()
        )
        assert loader.generator.get_state().equal(states[rank]["loader"])
    monkeypatch.setattr(distributed, "rank", lambda: 2)
    np.random.seed(99)
    loop._set_rng(states, loader, torch.device("cpu"))  # a third rank: its own, untouched
    assert np.random.rand() == np.random.RandomState(99).rand()
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    loop._set_rng(states[1], loader, torch.device("cpu"))  # an older point: rank 0's
    assert np.random.rand() == np.random.RandomState(1).rand()


def test_a_resume_with_other_settings_or_nothing_stopped_starts_over_and_says_so(tmp_path, capsys):
    stopped_in_the_second_epoch = _stopped_after(EPOCH_BATCHES)
    with pytest.raises(KeyboardInterrupt):
        _shuffled_fit(tmp_path, 4, stopped_in_the_second_epoch)
    assert load_checkpoint(tmp_path / "resume.pt")["epoch"] == 1
    _shuffled_fit(tmp_path, 3, _noisy, resume=True)  # 3 epochs, not 4: another schedule
    said = capsys.readouterr().out
    assert "had other settings or data: training from epoch 1" in said and "resuming" not in said
    assert [r["epoch"] for r in _records(tmp_path)] == [1, 2, 3]
    _shuffled_fit(tmp_path, 3, _noisy, resume=True)
    assert "t: no stopped run to resume" in capsys.readouterr().out
    assert not (tmp_path / "resume.pt").exists()


def test_train_resume_keeps_the_stages_trained_with_these_settings(trained, tmp_path, capsys):
    """`wsss train --resume`, the same command again: what finished is kept as it is; a
    stage whose run did not finish (no config beside its checkpoint) trains again."""
    import shutil

    from training import stages
    from wsss.config import save_config, with_overrides

    runs = tmp_path / "runs"
    cfg = with_overrides(trained, [f"runs={runs}"])
    for stage in ("classifier", "pseudo", "segmenter"):
        shutil.copytree(Path(trained.runs) / stage, runs / stage)
    for stage in ("classifier", "segmenter"):  # as if trained here
        save_config(cfg, runs / stage / "config.yaml")
    files = [p for p in runs.rglob("*") if p.is_file()]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    stages.run(cfg, resume=True)
    said = capsys.readouterr().out
    for stage in ("classifier", "pseudo", "segmenter"):
        assert f"{stage}: kept" in said
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    (runs / "segmenter" / "config.yaml").unlink()  # stopped before it finished
    stages.run(cfg, resume=True)
    said = capsys.readouterr().out
    assert "classifier: kept" in said and "segmenter: kept" not in said
    assert "segmenter: no stopped run to resume" in said
    assert (runs / "segmenter" / "best.pt").stat().st_mtime_ns > before[
        runs / "segmenter" / "best.pt"
    ][1]
    assert (runs / "classifier" / "best.pt").read_bytes() == before[
        runs / "classifier" / "best.pt"
    ][0]
    assert (runs / "segmenter" / "config.yaml").exists()
    # Same settings, other photos or other pseudo-masks (a folder changed in place): trained
    # again. The digest is of the photos' names and size and the masks learnt from.
    data = stages.load_train_set(cfg)
    view = stages._View(data, np.arange(4), False, np.zeros((4, 2, 2), np.uint8))
    digest = stages._data_digest(view)
    assert digest != stages._data_digest(stages._View(data, np.arange(1, 5), False, view.masks))
    assert digest != stages._data_digest(stages._View(data, np.arange(4), False, view.masks + 1))
    # ... nor photos replaced or relabelled under the same names (the names alone kept them)
    data.images[0] = 255 - data.images[0]
    assert digest != (pixels := stages._data_digest(view))
    data.images[0] = 255 - data.images[0]
    assert digest == stages._data_digest(view)
    first = data.samples[0]
    data.samples[0] = dataclasses.replace(first, labels=(first.labels[0] + 1,))
    assert digest != stages._data_digest(view) != pixels
    data.samples[0] = first
    ckpt = load_checkpoint(runs / "segmenter" / "best.pt")
    digest_then = ckpt["meta"]["data_digest"]
    ckpt["meta"]["data_digest"] = "another folder"
    torch.save(ckpt, runs / "segmenter" / "best.pt")
    capsys.readouterr()
    stages.run(cfg, ("segmenter",), resume=True)
    assert "segmenter: kept" not in capsys.readouterr().out
    assert load_checkpoint(runs / "segmenter" / "best.pt")["meta"]["data_digest"] == digest_then


def test_a_classifier_stopped_while_choosing_thresholds_leaves_the_last_complete_run(
    tmp_path, monkeypatch
):
    """The new classifier stays partial while the folds choose its thresholds: stopped
    there, the last complete run (checkpoint with its thresholds, log, config) is as it was,
    and no checkpoint without thresholds is left for export or a later run to take."""
    from training import stages
    from training.loop import partial_checkpoint
    from wsss.config import load_config, save_config

    cfg = load_config(None, [f"runs={tmp_path}", "classifier.threshold_folds=2"])
    out = tmp_path / "classifier"
    out.mkdir()
    torch.save({"state_dict": {}, "meta": {"run": "A", "score_thresholds": [0.4]}}, out / "best.pt")
    (out / "metrics.jsonl").write_text("A\n")
    save_config(cfg, out / "config.yaml")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def new_run() -> None:  # what fit(finish=False) leaves
        torch.save({"state_dict": {}, "meta": {"run": "B"}}, partial_checkpoint(out))
        (out / "metrics.jsonl.partial").write_text("B\n")

    def stopped(*args):
        raise KeyboardInterrupt

    new_run()
    monkeypatch.setattr(stages, "choose_thresholds", stopped)
    with pytest.raises(KeyboardInterrupt):
        stages._with_thresholds(cfg, None, None, {}, None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert stages.reusable(cfg, "classifier", out) is not None

    def chosen(cfg, data, model, meta, kwargs, path, resume):
        ckpt = load_checkpoint(path)
        ckpt["meta"]["score_thresholds"] = [0.6]
        torch.save(ckpt, path)

    new_run()
    monkeypatch.setattr(stages, "choose_thresholds", chosen)
    stages._with_thresholds(cfg, None, None, {}, None)
    assert load_checkpoint(out / "best.pt")["meta"] == {"run": "B", "score_thresholds": [0.6]}
    assert (out / "metrics.jsonl").read_text() == "B\n"
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "metrics.jsonl"]
    assert stages.reusable(cfg, "classifier", out) is not None


def test_each_rank_draws_its_own_augmentations_with_loader_workers(monkeypatch):
    """With data.num_workers the loader's processes seed numpy (the crops and flips) from a
    base seed its generator draws, and every rank seeded that generator alike: each rank
    drew rank 0's augmentations. Read from the generator, not from forked workers (a
    worker forked from the suite's threaded process once died of a segfault in CI)."""
    from torch.utils.data import TensorDataset

    from training import stages
    from wsss.config import load_config

    cfg = load_config(None, ["data.num_workers=2", "train.seed=7"])
    data = TensorDataset(torch.zeros(4), torch.zeros(4))

    def base_seed(rank: int) -> int:  # what DataLoader hands its workers
        monkeypatch.setenv("RANK", str(rank))
        train, _ = stages._loaders(cfg, data, data)
        return int(torch.empty((), dtype=torch.int64).random_(generator=train.generator))

    assert base_seed(0) == base_seed(0)  # seeded: the same run draws the same
    assert base_seed(0) != base_seed(1) != base_seed(2)
    monkeypatch.setenv("RANK", "0")
    assert stages._loaders(cfg, data, data)[0].generator.initial_seed() == 7  # one process's


def test_the_photos_digest_sees_a_relabelled_or_replaced_photo(tmp_path):
    """Saved pseudo-masks are reused only for the photos and labels they were made for: a
    label edited or a photo replaced under the same name made no difference before."""
    import os

    from training import stages
    from training.data.base import Sample

    photos = [tmp_path / f"{n}.jpg" for n in "ab"]
    for p in photos:
        p.write_bytes(b"photo " + p.name.encode())
    samples = [Sample(p.stem, p, None, (0,)) for p in photos]
    digest = stages.photos_digest(samples)
    assert stages.photos_digest(samples) == digest
    relabelled = [samples[0], dataclasses.replace(samples[1], labels=(1,))]
    assert stages.photos_digest(relabelled) != digest
    photos[1].write_bytes(b"another photo, same name")
    assert stages.photos_digest(samples) != digest
    photos[1].write_bytes(b"photo b.jpg")  # the same bytes again (a copy on another node)
    os.utime(photos[1], ns=(0, 0))
    assert stages.photos_digest(samples) == digest
    photos[1].unlink()  # a missing photo is data.skip_unreadable's or the decoder's to say
    assert stages.photos_digest(samples) != digest


def test_the_photos_are_read_once_a_process_while_they_stay_as_they_were(tmp_path, monkeypatch):
    """A run asks for the digest twice (the saved masks' check, then their record): the
    second reads no photo that is still the file it was; a rewritten one is read again."""
    from training import stages
    from training.data.base import Sample

    photos = [tmp_path / f"{n}.jpg" for n in "ab"]
    for p in photos:
        p.write_bytes(b"photo " + p.name.encode())
    samples = [Sample(p.stem, p, None, (0,)) for p in photos]
    read = []
    real = stages.file_digest
    monkeypatch.setattr(stages, "file_digest", lambda path: read.append(path) or real(path))
    digest = stages.photos_digest(samples)
    assert stages.photos_digest(samples) == digest and read == photos
    photos[0].write_bytes(b"a longer photo, written again")
    assert stages.photos_digest(samples) != digest and read == [*photos, photos[0]]


def test_thresholds_for_a_task_they_do_not_fit_are_refused_before_training(tmp_path):
    from training import stages
    from wsss.config import load_config

    cfg = load_config(None, [f"runs={tmp_path}", "classifier.threshold_folds=3"])
    assert not cfg.data.kind.multi_label  # the default task, pets: one class a photo
    with pytest.raises(InputError, match="per-class thresholds are for multi-label tasks"):
        stages.train_classifier(cfg, None)
    assert not (tmp_path / "classifier").exists()


def test_a_training_whose_loss_turns_nan_says_so_and_leaves_nothing(tmp_path):
    model = _model()

    def nan_in_validation(logits, targets):
        loss = nn.functional.cross_entropy(logits, targets)
        return loss if model.training else loss * float("nan")

    with pytest.raises(FloatingPointError, match="loss became nan: lower train.lr") as info:
        _fit(model, tmp_path, epochs=2, loss=nan_in_validation)
    assert list(tmp_path.iterdir()) == []
    assert isinstance(info.value, WsssError)  # the CLI says it in one line, no traceback


def test_a_new_classifier_run_makes_its_own_pseudo_masks_and_export_names_a_mix(
    trained, tmp_path, capsys, monkeypatch
):
    """Pseudo-masks carry the classifier run and settings that made them: a segmenter
    trained after the classifier changed learns new ones (saved ones were reused for the
    same images alone), and an export of a segmenter made from another classifier run (a
    training stopped between stages) says so."""
    import shutil

    import numpy as np

    from export.repository import export_repository
    from training import stages
    from training.loop import file_digest, save_checkpoint
    from training.pipeline import stale_segmenter
    from wsss.config import with_overrides

    runs = tmp_path / "runs"
    for stage in ("classifier", "pseudo", "segmenter"):
        shutil.copytree(Path(trained.runs) / stage, runs / stage)
    cfg = with_overrides(trained, [f"runs={runs}", f"export.repository={tmp_path / 'repo'}"])
    data = stages.load_train_set(cfg)
    pseudo = runs / "pseudo" / "train_masks.npz"
    assert stages._fits(pseudo, data, cfg)
    for changed in ("refine.threshold=0.9", "classifier.cam_method=gradcam"):
        assert not stages._fits(pseudo, data, with_overrides(cfg, [changed]))
    assert stages.pseudo_source(with_overrides(cfg, [f"runs={tmp_path}"]))["classifier"] == "none"

    def another_classifier_run() -> str:
        ckpt = load_checkpoint(runs / "classifier" / "best.pt")
        ckpt["meta"]["epoch"] = ckpt["meta"].get("epoch", 0) + 1
        save_checkpoint(ckpt, runs / "classifier" / "best.pt")
        return file_digest(runs / "classifier" / "best.pt")

    new = another_classifier_run()
    assert not stages._fits(pseudo, data, cfg)
    stages.run(cfg, ("segmenter",))
    assert str(np.load(pseudo)["classifier"]) == new  # made again, by the new run
    assert load_checkpoint(runs / "segmenter" / "best.pt")["meta"]["classifier_digest"] == new
    capsys.readouterr()
    export_repository(cfg)
    assert "another classifier run" not in capsys.readouterr().err
    assert stale_segmenter(runs) is None
    another_classifier_run()  # as a training stopped after its classifier stage leaves it
    export_repository(cfg)
    assert "the segmenter learned the pseudo-masks of another classifier run" in (
        capsys.readouterr().err
    )
    # `wsss evaluate` says it too: its scores would mix the two runs in silence.
    import cli.main as cli
    import experiments.studies

    monkeypatch.setattr(experiments.studies, "evaluate_profile", lambda cfg: None)
    cli.main(["evaluate", "--set", f"runs={runs}", "--set", f"data.root={cfg.data.root}"])
    assert "wsss evaluate: the segmenter learned the pseudo-masks of another" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("task, names", [("pets", ["dog"]), ("voc", [])])
def test_a_classifier_of_too_few_classes_is_refused_before_it_trains(task, names):
    """One softmax class trained to a loss of 0 from the start (nothing learned, no
    error); no class at all ended in a NaN loss that blamed train.lr."""
    from types import SimpleNamespace

    from training.stages import train_classifier
    from wsss.config import load_config

    cfg = load_config(None, [f"data.task={task}", "classifier.arch=mobilenet_v2"])
    fewest = 2 if task == "pets" else 1
    with pytest.raises(InputError, match=f"classifier: {len(names)} classes .* at least {fewest}"):
        train_classifier(cfg, SimpleNamespace(class_names=names))


def test_a_checkpoint_cut_short_or_holding_code_is_an_error_naming_it(tmp_path):
    """A truncated best.pt (a copy, or training killed mid-write) was torch's traceback
    ("PytorchStreamReader failed reading zip archive") that named no file."""
    import pickle

    import pytest
    import torch

    from wsss.errors import WsssError

    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(64)}, "meta": {}}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code = tmp_path / "code.pt"
    code.write_bytes(pickle.dumps(print))  # weights_only refuses anything but tensors
    for path in (cut, code):
        with pytest.raises(WsssError, match=f"{path}: not a readable checkpoint"):
            load_checkpoint(path)
    with pytest.raises(FileNotFoundError):  # said as a path error by the CLI, as before
        load_checkpoint(tmp_path / "missing.pt")


def test_train_resume_reads_the_settings_each_stage_trains_with(trained, tmp_path, capsys):
    """The ports a server starts on (from the environment, too) or an export's settings
    are no stage's: every stage is kept; a segmenter setting trains the segmenter alone; a
    key of another version of wsss is left out (it changes nothing this one trains); a
    config that does not read is said, not a crash."""
    import shutil

    from training import stages
    from wsss.config import save_config, with_overrides

    runs = tmp_path / "runs"
    cfg = with_overrides(trained, [f"runs={runs}"])
    for stage in ("classifier", "pseudo", "segmenter"):
        shutil.copytree(Path(trained.runs) / stage, runs / stage)
    for stage in ("classifier", "segmenter"):
        save_config(cfg, runs / stage / "config.yaml")
    elsewhere = with_overrides(cfg, ["serve.http_port=18999", "export.keep_versions=3"])
    stages.run(elsewhere, resume=True)
    said = capsys.readouterr().out
    assert all(f"{s}: kept" in said for s in ("classifier", "pseudo", "segmenter")), said
    stages.run(cfg, ("pseudo",), resume=True)  # alone, nothing decoded: the layout's list
    assert "pseudo: kept" in capsys.readouterr().out
    classifier = (runs / "classifier" / "best.pt").read_bytes()
    stages.run(with_overrides(cfg, ["segmenter.lr=0.002"]), resume=True)
    said = capsys.readouterr().out
    assert "classifier: kept" in said and "pseudo: kept" in said
    assert "segmenter: the complete run in" in said and "other segmenter.lr" in said
    assert (runs / "classifier" / "best.pt").read_bytes() == classifier
    saved = runs / "classifier" / "config.yaml"
    # a key of another version of wsss: left out, as it cannot change what this one trains
    saved.write_text(saved.read_text().replace("classifier:\n", "classifier:\n  old_key: 1\n", 1))
    stages.run(cfg, ("classifier",), resume=True)
    assert "classifier: kept" in capsys.readouterr().out
    saved.write_text("classifier: [unclosed")
    stages.run(cfg, ("classifier",), resume=True)
    assert "classifier: the complete run in" in capsys.readouterr().out


def test_a_stopped_run_is_not_lost_to_a_run_started_without_resume(tmp_path, capsys):
    stopped_in_the_second_epoch = _stopped_after(EPOCH_BATCHES)
    with pytest.raises(KeyboardInterrupt):
        _shuffled_fit(tmp_path, 4, stopped_in_the_second_epoch)
    stopped = (tmp_path / "resume.pt").read_bytes()

    stopped_at_once = _stopped_after(0)
    with pytest.raises(KeyboardInterrupt):  # the same command again, --resume forgotten
        _shuffled_fit(tmp_path, 4, stopped_at_once)
    assert "a stopped run of these settings is in" in capsys.readouterr().out
    assert (tmp_path / "resume.pt").read_bytes() == stopped  # still there to resume
    with pytest.raises(KeyboardInterrupt):  # --resume with a typo: other settings
        _shuffled_fit(tmp_path, 3, stopped_at_once, resume=True)
    assert "stop now to keep it" in capsys.readouterr().out
    assert (tmp_path / "resume.pt").read_bytes() == stopped
    _shuffled_fit(tmp_path, 4, _noisy, resume=True)
    assert "t: resuming after epoch 1 of 4" in capsys.readouterr().out
