"""The one training loop: an interrupted training leaves the stage's last complete run as it
was, the checkpoint an export took from it included."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.loop import fit, load_checkpoint


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
    calls = []

    def stopped_in_the_third_epoch(logits, targets):
        calls.append(1)
        if len(calls) > 2 * 4:  # two epochs of 2 train + 2 val batches each
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(logits, targets)

    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), tmp_path, epochs=5, loss=stopped_in_the_third_epoch)
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "metrics.jsonl"]
    assert load_checkpoint(tmp_path / "best.pt")["meta"]["run"] == 2
    # Done, the new run takes the place of the last.
    _fit(_model(), tmp_path, epochs=3)
    assert load_checkpoint(tmp_path / "best.pt")["meta"]["run"] == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "metrics.jsonl"]


def test_a_classifier_stopped_while_choosing_thresholds_is_not_taken_for_trained(
    tmp_path, monkeypatch
):
    """Its checkpoint is written before the folds choose its thresholds: stopped there, the
    stage has no config.yaml, so no later run reuses a checkpoint without thresholds."""
    from training import stages
    from training.loop import trained_with
    from wsss.config import load_config, save_config

    cfg = load_config(None, [f"runs={tmp_path}", "classifier.threshold_folds=2"])
    (tmp_path / "classifier").mkdir()
    torch.save({"state_dict": {}, "meta": {}}, tmp_path / "classifier" / "best.pt")
    save_config(cfg, tmp_path / "classifier" / "config.yaml")

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "choose_thresholds", stopped)
    with pytest.raises(KeyboardInterrupt):
        stages._with_thresholds(cfg, None, None, {}, None)
    assert not trained_with(tmp_path / "classifier", cfg)
    monkeypatch.setattr(stages, "choose_thresholds", lambda *args: [0.5])
    stages._with_thresholds(cfg, None, None, {}, None)
    assert trained_with(tmp_path / "classifier", cfg)


def test_a_training_whose_loss_turns_nan_says_so_and_leaves_nothing(tmp_path):
    model = _model()

    def nan_in_validation(logits, targets):
        loss = nn.functional.cross_entropy(logits, targets)
        return loss if model.training else loss * float("nan")

    with pytest.raises(FloatingPointError, match="loss became nan: lower train.lr"):
        _fit(model, tmp_path, epochs=2, loss=nan_in_validation)
    assert list(tmp_path.iterdir()) == []
