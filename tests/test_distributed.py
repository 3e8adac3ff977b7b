"""Data-parallel training under torchrun: two CPU processes (gloo), one training loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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

    from training.pipeline import load_model

    model, meta = load_model(runs / "classifier" / "best.pt")
    assert meta["world_size"] == 2 and meta["class_names"]
