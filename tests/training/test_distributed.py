"""Data-parallel training under torchrun: two CPU processes (gloo), one training loop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from training.data.synth import SynthOptions, write_synth

pytestmark = pytest.mark.slow


def test_two_cpu_processes_share_the_data_and_write_one_checkpoint(tmp_path):
    root = write_synth(tmp_path / "pets", SynthOptions("pets", 48, 64, seed=3))
    runs = tmp_path / "runs"
    overrides = [
        f"data.root={root}",
        f"runs={runs}",
        "data.image_size=64",
        "train.epochs=4",
        "train.batch_size=8",
        "train.device=cpu",
        "segmenter.epochs=2",
        "segmenter.base_channels=4",
        "segmenter.depth=2",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "wsss", "train"] + [a for o in overrides for a in ("--set", o)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # The channels-last weights' grads are in the layout DDP's buckets expect.
    assert "Grad strides do not match" not in done.stderr

    records = [json.loads(line) for line in (runs / "classifier" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["train_loss"] < 0.8 * records[0]["train_loss"]
    # Each rank trained on its own share: one pass over the split, not one per process.
    from training.data.dataset import WSSSDataset
    from training.stages import _split

    n_train = len(_split(len(WSSSDataset(root, "pets", "train", 64)), 0.1, 0)[0])
    assert all(r["world_size"] == 2 for r in records)
    assert n_train - 2 * 8 < records[0]["train_images"] <= n_train + 1
    # Rank 0 alone wrote and reported: one checkpoint per stage, each epoch logged once.
    for stage in ("classifier", "segmenter"):
        files = sorted(p.name for p in (runs / stage).iterdir())
        assert files == ["best.pt", "config.yaml", "metrics.jsonl"], files
    assert (runs / "pseudo" / "train_masks.npz").exists()
    printed = done.stdout + done.stderr
    assert printed.count("classifier epoch 1:") == 1, printed[-2000:]

    from training.loop import load_checkpoint
    from training.pipeline import load_model

    model, meta = load_model(runs / "classifier" / "best.pt")
    assert meta["world_size"] == 2 and meta["class_names"]

    # Stopped in the segmenter's epochs, resumed: rank 0 decides from the file it wrote,
    # every rank loads it, and the log goes on from the epoch after the last finished.
    longer = cmd + ["--set", "segmenter.epochs=6", "--stages", "segmenter"]
    proc = subprocess.Popen(
        longer, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=env | {"PYTHONUNBUFFERED": "1"},  # each line as it is printed
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith("segmenter epoch 2:"):  # epoch 1 saved, at least
                break
    finally:
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on: the workers die mid-epoch
        proc.wait()
    point = load_checkpoint(runs / "segmenter" / "resume.pt")
    assert 1 <= point["epoch"] < 6
    # each rank's generators, to go back to each rank (rank 0's alone were kept: rank 1
    # replayed its augmentations from the stage's start, and drew rank 0's crops)
    numpy_keys = [rng["numpy"][1] for rng in point["rng"]]
    assert len(numpy_keys) == 2 and not numpy_keys[0].equal(numpy_keys[1])
    again = subprocess.run(longer + ["--resume"], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert said.count(f"segmenter: resuming after epoch {point['epoch']} of 6") == 1, said[-2000:]
    records = [json.loads(line) for line in (runs / "segmenter" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == list(range(1, 7))
    assert not (runs / "segmenter" / "resume.pt").exists()


def _wsss(args: list[str], processes: int) -> subprocess.CompletedProcess:
    """``wsss ARGS`` in one plain process, or under torchrun in ``processes`` CPU processes;
    one thread each either way, so each batch is computed alike."""
    cmd = [sys.executable, "-m", "wsss", *args]
    if processes > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_sharded_pseudo_masks_and_evaluation_equal_one_process(tmp_path):
    """GrabCut pseudo-masks and `wsss evaluate` over 2 ranks: the same bytes and numbers as
    one process. 24 training images in batches of 5 (shares of 10 and 14: uneven, the last
    batch short) and 8 test images (shares of 5 and 3)."""
    from tests.conftest import write_random_checkpoints
    from training import stages
    from training.data.dataset import WSSSDataset
    from training.data.layouts import read_class_names
    from wsss.config import load_config

    root = write_synth(tmp_path / "pets", SynthOptions("pets", 32, 64, seed=5))
    names = read_class_names(root, "pets")
    base = [f"data.root={root}", "data.image_size=64", "train.batch_size=5"]
    base += ["train.device=cpu", "refine.method=fixed", "refine.grabcut=true"]
    runs = {1: write_random_checkpoints(tmp_path / "runs1", class_names=names)}
    runs[2] = shutil.copytree(runs[1], tmp_path / "runs2")  # the same untrained weights
    for n, folder in runs.items():
        args = [a for o in [*base, f"runs={folder}"] for a in ("--set", o)]
        _wsss(["train", "--stages", "pseudo", *args], n)
        done = _wsss(["evaluate", *args], n)
        assert done.stdout.count("| output |") == 1, done.stdout  # rank 0 alone reports

    one, two = (np.load(runs[n] / "pseudo" / "train_masks.npz") for n in (1, 2))
    assert one["masks"].shape == (24, 64, 64) and one["masks"].dtype == two["masks"].dtype
    assert one["masks"].tobytes() == two["masks"].tobytes()
    assert one["names"].tolist() == two["names"].tolist()
    assert (one["masks"] == 1).any()  # GrabCut found some foreground: not a vacuous match
    for folder in (runs[2] / "pseudo" / "parts", runs[2] / "eval" / "parts"):
        assert not folder.exists(), "rank 0 deletes the parts it merged"

    rows = [json.loads((runs[n] / "eval" / "results.json").read_text())["rows"] for n in (1, 2)]
    for row in (r for rs in rows for r in rs):
        row.pop("refine_ms", None)  # a time: summed over the ranks, not equal
    assert rows[0] == rows[1]
    assert {"accuracy", "pseudo_iou", "pseudo_image_iou", "seg_iou"} <= set(rows[0][0] | rows[0][1])

    # Whole data already decoded (another stage read it): shares sliced from it, in one
    # process, concatenate to the whole.
    cfg = load_config(None, [*base, f"runs={runs[1]}"])
    data = WSSSDataset(root, "pets", "train", 64)
    shares = [range(0, 10), range(10, 24)]
    parts = [stages.make_pseudo_masks(cfg, data, s) for s in shares]
    whole = stages.make_pseudo_masks(cfg, data)
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_evaluations_of_consecutive_shares_merge_into_the_whole(tmp_path):
    """In one process, without torchrun: multi-label scores (mAP from the labels' multi-hot
    rows), class matrices and the figure's examples, which here span both shares."""
    from tests.conftest import write_random_checkpoints
    from training.data.dataset import WSSSDataset
    from training.data.layouts import read_class_names
    from training.evaluate import Evaluation, evaluate, figure_rows
    from training.pipeline import Pipeline, pipeline_from_config
    from wsss.config import load_config

    root = write_synth(tmp_path / "voc", SynthOptions("voc", 24, 48, seed=2))
    data = WSSSDataset(root, "voc", "test", 48)
    names = read_class_names(root, "voc")
    runs = write_random_checkpoints(
        tmp_path / "runs", class_names=names, seg_classes=len(names) + 1, task="voc"
    )
    pipe = pipeline_from_config(load_config(None, [f"runs={runs}", "data.task=voc"]))
    pipes = {"pseudo": Pipeline(pipe.classifier, None, pipe.refiner)}
    pipes["seg"] = Pipeline(None, pipe.segmenter, None)
    whole = evaluate(pipes, data, 2, examples=3)
    shares = [evaluate(pipes, data, 2, 3, share=s) for s in (range(0, 2), range(2, len(data)))]
    merged = {
        n: Evaluation.merged(r.binary, [s[n].arrays() for s in shares]) for n, r in whole.items()
    }
    for name, r in whole.items():
        scores = [{k: v for k, v in x.row().items() if k != "refine_ms"} for x in (r, merged[name])]
        assert scores[0] == scores[1]
        assert merged[name].examples.keys() == r.examples.keys()
        for kind, shown in r.examples.items():
            np.testing.assert_array_equal(np.array(merged[name].examples[kind]), np.array(shown))
    assert "map" in merged["pseudo"].row() and "seg_miou" in merged["seg"].row()
    assert len(figure_rows(data, merged, [("CAM", "pseudo", "cam")])) == 3
    # Each shown photo's CAM is its labelled classes' at their strongest, not the first's.
    assert pipe.class_names == data.class_names
    cams = pipe.classify(data.images[:3])[1].numpy()
    labelled = [list(s.labels) for s in data.samples[:3]]
    assert any(len(ls) > 1 for ls in labelled), "no photo of two classes shown"
    for k, ls in enumerate(labelled):
        np.testing.assert_allclose(whole["pseudo"].examples["cam"][k], cams[k, ls].max(0))


@pytest.mark.parametrize("n, batch, world", [(24, 5, 2), (10, 4, 3), (3, 4, 2), (0, 4, 2)])
def test_batch_shards_cover_the_items_in_whole_batches(monkeypatch, n, batch, world):
    from training import distributed

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: world)
    shares = []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.batch_shard(n, batch))
    assert [i for s in shares for i in s] == list(range(n))  # in order, each once
    assert all(s.start % batch == 0 for s in shares if len(s))
    sizes = [-(-len(s) // batch) for s in shares]  # batches per rank: within one of each other
    assert max(sizes) - min(sizes) <= 1


SEEDS = """
import sys

import numpy as np
import torch

from training import distributed, stages
from training.data.dataset import WSSSDataset
from training.pipeline import load_model
from wsss.config import load_config

root, runs, out = sys.argv[1:4]
made = []  # how many seeds this process computed itself
compute = stages._masks
stages._masks = lambda *a, **k: made.append(len(m := compute(*a, **k))) or m
distributed.setup(torch.device("cpu"))
cfg = load_config(None, [f"data.root={root}", "data.image_size=64", "train.batch_size=5"])
net, meta = load_model(f"{runs}/classifier/best.pt")
data = WSSSDataset(root, "pets", "train", 64)
np.save(f"{out}-{distributed.rank()}.npy", stages.seed_masks(cfg, net, data, meta["class_names"]))
np.save(f"{out}-{distributed.rank()}-made.npy", np.array(made))
distributed.teardown()
"""


def test_level_set_seeds_made_in_shares_reach_every_rank_whole(tmp_path):
    """The level set's seed masks under torchrun: each rank makes its share (10 and 14 of
    24 images, batches of 5) and every rank ends with all 24, the bytes one process makes."""
    from tests.conftest import write_random_checkpoints
    from training.data.layouts import read_class_names

    root = write_synth(tmp_path / "pets", SynthOptions("pets", 32, 64, seed=5))
    runs = write_random_checkpoints(tmp_path / "runs", class_names=read_class_names(root, "pets"))
    script = tmp_path / "seeds.py"
    script.write_text(SEEDS)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    for name, launcher in (
        ("one", [sys.executable]),
        ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node=2"]),
    ):  # fmt: skip
        cmd = [*launcher, str(script), str(root), str(runs), str(tmp_path / name)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one = np.load(tmp_path / "one-0.npy")
    assert one.shape == (24, 64, 64) and 0 in one and (one > 0).any()  # not vacuous
    assert np.load(tmp_path / "one-0-made.npy").tolist() == [24]
    for rank, share in ((0, 10), (1, 14)):
        assert np.load(tmp_path / f"two-{rank}.npy").tobytes() == one.tobytes()
        assert np.load(tmp_path / f"two-{rank}-made.npy").tolist() == [share]
