"""The one training loop, written once and used by every model in the project."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from training import distributed
from training.models.common import to_pixels
from wsss.config import load_config
from wsss.errors import InputError, WsssError


def resolve_device(name: str) -> torch.device:
    """The device ``train.device`` names; under torchrun, this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # not a device torch knows
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"train.device {name!r}: auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"train.device {name!r}: this machine has no GPU torch can use")
    return distributed.setup(device)


def save_checkpoint(state: dict, path: Path) -> None:
    """Write then rename, so a crash mid-save never leaves a truncated checkpoint behind."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's tensors and metadata (``weights_only``: no code runs from the file).
    One that is not a checkpoint, cut short (a copy or a training killed mid-write) or holds
    objects beyond tensors is an error naming the file, not torch's traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WsssError(
            f"{path}: not a readable checkpoint ({why}); train that stage again"
        ) from exc


def trained_with(folder: str | Path, cfg, saved: str | Path | None = None) -> bool:
    """A checkpoint (``best.pt``) in ``folder`` trained with exactly ``cfg`` (a
    ``wsss.config.Config``), as the config saved beside it (or at ``saved``) says."""
    folder = Path(folder)
    saved = Path(saved) if saved is not None else folder / "config.yaml"
    if not ((folder / "best.pt").exists() and saved.exists()):
        return False
    return dataclasses.asdict(load_config(saved)) == dataclasses.asdict(cfg)


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
    finish: bool = True,
) -> Path:
    """Train with AdamW and a cosine schedule; keep the epoch with the lowest validation loss.

    Batches are ``(uint8 NHWC images, targets, ...)``. Writes ``best.pt`` (state dict + meta)
    and ``metrics.jsonl`` (one line per epoch) under ``out_dir``, in place of the last ones
    only once every epoch is done (``<name>.partial`` until then; with ``finish`` False
    they stay partial, for a caller with more to write into the checkpoint, which then
    calls ``finish_run``); loads the best weights back into ``model`` and returns the
    checkpoint path.

    Under torchrun the model is wrapped in DistributedDataParallel, ``train`` should draw
    from a ``DistributedSampler`` and ``val`` hold this rank's shard (``training.distributed``);
    losses are averaged over every rank's images, so all ranks keep the same epoch, and rank 0
    alone writes and reports.
    """
    if epochs < 1:
        raise InputError("epochs must be >= 1")
    main = distributed.is_main()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    net = model
    if distributed.active():
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * len(train), pct_start=0.15
    )
    # Written beside the stage's last complete run and moved over it when every epoch is
    # done: an interrupted training leaves that run whole (the checkpoint an export took
    # included), not a mix of this one's best epoch so far and the last one's logs.
    best, best_path = math.inf, out_dir / "best.pt"
    partial, log_path = _partial(best_path), out_dir / "metrics.jsonl"
    log = _partial(log_path).open("w") if main else None
    try:
        for epoch in range(1, epochs + 1):
            if isinstance(train.sampler, DistributedSampler):
                train.sampler.set_epoch(epoch)
            start = time.perf_counter()
            bar = f"{desc} {epoch}/{epochs}" if main else None
            train_loss, seen = _run_epoch(net, train, loss_fn, device, opt, sched, bar)
            val_loss, _ = _run_epoch(net, val, loss_fn, device, None, None, None)
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "lr": sched.get_last_lr()[0],
                "seconds": round(time.perf_counter() - start, 2),
                "train_images": seen,  # over all ranks: each image once per epoch
                "world_size": distributed.world_size(),
            }
            if main:
                log.write(json.dumps(record) + "\n")
                log.flush()
                tqdm.write(f"{desc} epoch {epoch}: train {train_loss:.4f}  val {val_loss:.4f}")
            if val_loss < best:  # the same on every rank: the losses are global
                best = val_loss
                if main:
                    state = {"state_dict": model.state_dict(), "meta": meta | record}
                    save_checkpoint(state, partial)
    except BaseException:  # stopped or failed: the last complete run stays as it was
        if log is not None:
            log.close()
            discard_run(out_dir)
        raise
    if log is not None:
        log.close()
    distributed.barrier()  # the best checkpoint is written before anyone reads it
    model.load_state_dict(load_checkpoint(partial)["state_dict"])
    distributed.barrier()  # every rank has read it before it moves
    if not finish:
        return partial
    finish_run(out_dir)
    return best_path


def partial_checkpoint(out_dir: Path) -> Path:
    """Where ``fit`` writes a stage's ``best.pt`` until its run is done."""
    return _partial(Path(out_dir) / "best.pt")


def finish_run(out_dir: Path) -> None:
    """The partial run in ``out_dir`` (``fit``'s, or a stage's own) takes the place of the
    last complete one: its checkpoint and, where it has one, its log (rank 0 moves them, the
    others wait)."""
    if distributed.is_main():
        for name in ("best.pt", "metrics.jsonl"):
            partial = _partial(Path(out_dir) / name)
            if partial.exists():
                os.replace(partial, Path(out_dir) / name)
    distributed.barrier()


def file_digest(path: Path) -> str:
    """The sha256 of a file: which run of a stage (its checkpoint) another was made from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def discard_run(out_dir: Path) -> None:
    """The partial run in ``out_dir`` removed (rank 0's files; a stopped or failed run)."""
    for name in ("best.pt", "metrics.jsonl"):
        _partial(Path(out_dir) / name).unlink(missing_ok=True)


def _partial(path: Path) -> Path:
    """Where ``fit`` writes ``path`` until the training is done."""
    return path.with_name(f"{path.name}.partial")


class LossDiverged(WsssError, FloatingPointError):
    """The loss stopped being a number: one line for the user (the best checkpoint so far
    stays where it was), not a traceback."""


def _run_epoch(model, loader, loss_fn, device, opt, sched, desc) -> tuple[float, int]:
    """The mean loss over every rank's images, and how many images that was."""
    training = opt is not None
    model.train(training)
    total, count = 0.0, 0
    with torch.set_grad_enabled(training):
        for images, targets, *_ in tqdm(loader, desc=desc, leave=False, disable=desc is None):
            # The weights are channels-last (models.registry.channels_last), so their grads
            # come back in the layout DDP's gradient buckets were made for, whatever the input's.
            x = to_pixels(images.to(device))
            loss = loss_fn(model(x), _to(targets, device))
            if not torch.isfinite(loss):
                raise LossDiverged(
                    f"loss became {loss.item()}: lower train.lr (segmenter.lr, levelset.lr "
                    "in their stages)"
                )
            if training:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            total += loss.item() * len(images)
            count += len(images)
    total, count = distributed.all_sum([total, count], device)
    return total / max(count, 1), int(count)


def _to(targets, device: torch.device):
    """Move a target tensor, or a tuple of them, to ``device``."""
    if isinstance(targets, (tuple, list)):
        return type(targets)(_to(t, device) for t in targets)
    return targets.to(device)
