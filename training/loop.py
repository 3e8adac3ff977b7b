"""The one training loop, written once and used by every model in the project."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.models.common import to_pixels


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def save_checkpoint(state: dict, path: Path) -> None:
    """Write then rename, so a crash mid-save never leaves a truncated checkpoint behind."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def fit(
    model: nn.Module,
    train: DataLoader,
    val: DataLoader,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    device: torch.device,
    out_dir: Path,
    meta: dict,
    desc: str,
) -> Path:
    """Train with AdamW and a cosine schedule; keep the epoch with the lowest validation loss.

    Batches are ``(uint8 NHWC images, targets, ...)``. Writes ``best.pt`` (state dict + meta)
    and ``metrics.jsonl`` (one line per epoch) under ``out_dir``; loads the best weights back
    into ``model`` and returns the checkpoint path.
    """
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * len(train), pct_start=0.15
    )
    best, best_path = math.inf, out_dir / "best.pt"
    log = (out_dir / "metrics.jsonl").open("w")
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        train_loss = _run_epoch(
            model, train, loss_fn, device, opt, sched, f"{desc} {epoch}/{epochs}"
        )
        val_loss = _run_epoch(model, val, loss_fn, device, None, None, None)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "lr": sched.get_last_lr()[0],
            "seconds": round(time.perf_counter() - start, 2),
        }
        log.write(json.dumps(record) + "\n")
        log.flush()
        tqdm.write(f"{desc} epoch {epoch}: train {train_loss:.4f}  val {val_loss:.4f}")
        if val_loss < best:
            best = val_loss
            save_checkpoint({"state_dict": model.state_dict(), "meta": meta | record}, best_path)
    log.close()
    model.load_state_dict(load_checkpoint(best_path)["state_dict"])
    return best_path


def _run_epoch(model, loader, loss_fn, device, opt, sched, desc) -> float:
    training = opt is not None
    model.train(training)
    total, count = 0.0, 0
    with torch.set_grad_enabled(training):
        for images, targets, *_ in tqdm(loader, desc=desc, leave=False, disable=desc is None):
            x = to_pixels(images.to(device))
            loss = loss_fn(model(x), _to(targets, device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()}: lower train.lr")
            if training:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            total += loss.item() * len(images)
            count += len(images)
    return total / max(count, 1)


def _to(targets, device: torch.device):
    """Move a target tensor, or a tuple of them, to ``device``."""
    if isinstance(targets, (tuple, list)):
        return type(targets)(_to(t, device) for t in targets)
    return targets.to(device)
