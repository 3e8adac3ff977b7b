"""The one training loop, written once and used by every model in the project."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from training import distributed
from training.models.common import to_pixels
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
    resume: bool = False,
    run_key: str = "",
) -> Path:
    """Train with AdamW and a cosine schedule; keep the epoch with the lowest validation loss.

    Batches are ``(uint8 NHWC images, targets, ...)``. Writes ``best.pt`` (state dict + meta)
    and ``metrics.jsonl`` (one line per epoch) under ``out_dir``, in place of the last ones
    only once every epoch is done (``<name>.partial`` until then; with ``finish`` False
    they stay partial, for a caller with more to write into the checkpoint, which then
    calls ``finish_run``); loads the best weights back into ``model`` and returns the
    checkpoint path.

    After each epoch the run's state (weights, optimiser, schedule, random generators, its
    best epoch and log so far) is saved as ``resume.pt``, removed once the run is complete.
    With ``resume`` a run stopped part way continues after its last finished epoch, as if
    never stopped, where the saved state was made by the same settings (``run_key``: the
    caller's; the meta, epochs, learning rate, image counts), and starts over, saying so,
    where it was not.

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
    point_path = resume_point(out_dir)
    key = _run_key(run_key, meta, epochs, lr, weight_decay, train, val)
    first, records, best_state, best_record = 1, [], None, {}
    point = None
    if resume:  # rank 0 decides, from the file it alone writes; the others follow
        point = _resume_from(point_path, key, desc) if main else None
        if distributed.active():
            resuming = distributed.all_sum([float(point is not None)], device)[0] > 0
            if resuming and point is None:
                point = load_checkpoint(point_path)
    if point is not None:
        model.load_state_dict(point["state_dict"])
        opt.load_state_dict(point["optimizer"])
        sched.load_state_dict(point["scheduler"])
        _set_rng(point["rng"], train, device)
        first, records, best = point["epoch"] + 1, point["records"], point["best"]
        best_state, best_record = point["best_state"], point["best_record"]
        if main:
            tqdm.write(f"{desc}: resuming after epoch {point['epoch']} of {epochs} ({point_path})")
    elif main and not resume and (stopped := _stopped_epoch(point_path, key)) is not None:
        tqdm.write(  # kept until this run's first epoch takes its place
            f"{desc}: a stopped run of these settings is in {point_path} (epoch {stopped} of "
            f"{epochs}): this run starts over; stop it now and add --resume to continue that one"
        )
    log = _partial(log_path).open("w") if main else None
    if log is not None:
        log.writelines(json.dumps(r) + "\n" for r in records)
        log.flush()
        if best_state is not None:
            save_checkpoint({"state_dict": best_state, "meta": meta | best_record}, partial)
    try:
        for epoch in range(first, epochs + 1):
            if isinstance(train.sampler, DistributedSampler):
                train.sampler.set_epoch(epoch)
            start = time.perf_counter()
            bar = f"{desc} {epoch}/{epochs}" if main else None
            train_loss, seen, lr_used = _run_epoch(net, train, loss_fn, device, opt, sched, bar)
            val_loss, _, _ = _run_epoch(net, val, loss_fn, device, None, None, None)
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "lr": lr_used,  # the epoch's last step's (the schedule's next may be ~0)
                "seconds": round(time.perf_counter() - start, 2),
                "train_images": seen,  # over all ranks: each image once per epoch
                "world_size": distributed.world_size(),
            }
            if main:
                log.write(json.dumps(record) + "\n")
                log.flush()
                tqdm.write(f"{desc} epoch {epoch}: train {train_loss:.4f}  val {val_loss:.4f}")
            records.append(record)
            if val_loss < best:  # the same on every rank: the losses are global
                best, best_record = val_loss, record
                # kept in host memory (a GPU holds the weights, not a copy of them too)
                weights = model.state_dict().items()
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in weights}
                if main:
                    save_checkpoint({"state_dict": best_state, "meta": meta | record}, partial)
            rngs = distributed.all_gather_objects(_get_rng(train, device))  # every rank's
            if main:
                point = {
                    "key": key,
                    "epoch": epoch,
                    "state_dict": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": rngs,
                    "records": records,
                    "best": best,
                    "best_state": best_state,
                    "best_record": best_record,
                }
                save_checkpoint(point, point_path)
    except BaseException as exc:  # stopped or failed: the last complete run stays as it was
        if log is not None:
            log.close()
            discard_run(out_dir)
            if isinstance(exc, LossDiverged):  # resumed, it would diverge again
                point_path.unlink(missing_ok=True)
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
        resume_point(out_dir).unlink(missing_ok=True)
    distributed.barrier()


def resume_point(out_dir: Path) -> Path:
    """Where ``fit`` keeps the state a stopped run resumes from (``wsss train --resume``)."""
    return Path(out_dir) / "resume.pt"


def _run_key(run_key: str, meta: dict, epochs, lr, weight_decay, train, val) -> str:
    """What a saved run state must have been made by for a run to resume from it."""
    made_by = {
        "caller": run_key,
        "meta": meta,
        "epochs": epochs,
        "lr": lr,
        "weight_decay": weight_decay,
        "images": [len(train.dataset), len(val.dataset)],
        "batches": len(train),
        "world_size": distributed.world_size(),
    }
    text = json.dumps(made_by, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _stopped_epoch(path: Path, key: str) -> int | None:
    """The last finished epoch of the stopped run of these settings at ``path``, if any."""
    try:
        point = load_checkpoint(path) if path.is_file() else {}
    except WsssError:
        return None
    return point.get("epoch") if point.get("key") == key else None


def _resume_from(path: Path, key: str, desc: str) -> dict | None:
    """The saved state of a stopped run with these settings, or None (said) to start over;
    one of other settings stays until this run's first epoch takes its place."""
    if not path.exists():
        if distributed.is_main():
            tqdm.write(f"{desc}: no stopped run to resume ({path}): training from epoch 1")
        return None
    try:
        point = load_checkpoint(path)
    except WsssError as exc:  # cut short by a crash mid-write on a filesystem without rename
        if distributed.is_main():
            tqdm.write(f"{desc}: {exc}: training from epoch 1")
        return None
    if point.get("key") != key:
        if distributed.is_main():
            tqdm.write(
                f"{desc}: the stopped run in {path} (epoch {point.get('epoch')}) had other "
                "settings or data: training from epoch 1 (its state is replaced after this "
                "run's first epoch: stop now to keep it)"
            )
        return None
    return point


def _get_rng(train: DataLoader, device: torch.device) -> dict:
    """Every generator a next epoch draws from: the loader's order, torch's (the GPU's too:
    dropout there draws from it), numpy's (the augmentations) and Python's, as tensors and
    lists ``weights_only`` loads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "loader": train.generator.get_state() if train.generator is not None else None,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def _set_rng(states: list[dict] | dict, train: DataLoader, device: torch.device) -> None:
    """Each rank's saved generators back, as ``_get_rng`` gave them at the epoch's end, in
    rank order. A run resumed on more ranks than it had: the new ones keep their own; a
    point saved before every rank's was kept holds rank 0's alone (one dict), which rank 0
    takes."""
    if isinstance(states, dict):
        states = [states]
    if distributed.rank() >= len(states):
        return
    state = states[distributed.rank()]
    if state["loader"] is not None and train.generator is not None:
        train.generator.set_state(state["loader"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    random.setstate(state["python"])


def file_digest(path: Path) -> str:
    """The sha256 of a file: which run of a stage (its checkpoint) another was made from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def discard_run(out_dir: Path) -> None:
    """The partial run in ``out_dir`` removed (rank 0's files; a stopped or failed run). Its
    resume point stays, for ``wsss train --resume``."""
    for name in ("best.pt", "metrics.jsonl"):
        _partial(Path(out_dir) / name).unlink(missing_ok=True)


def _partial(path: Path) -> Path:
    """Where ``fit`` writes ``path`` until the training is done."""
    return path.with_name(f"{path.name}.partial")


class LossDiverged(WsssError, FloatingPointError):
    """The loss stopped being a number: one line for the user (the best checkpoint so far
    stays where it was), not a traceback."""


def _run_epoch(model, loader, loss_fn, device, opt, sched, desc) -> tuple[float, int, float | None]:
    """The mean loss over every rank's images, how many images that was, and the learning
    rate of the epoch's last step (None without one)."""
    training = opt is not None
    model.train(training)
    total, count, lr = 0.0, 0, None
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
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
            total += loss.item() * len(images)
            count += len(images)
    total, count = distributed.all_sum([total, count], device)
    return total / max(count, 1), int(count), lr


def _to(targets, device: torch.device):
    """Move a target tensor, or a tuple of them, to ``device``."""
    if isinstance(targets, (tuple, list)):
        return type(targets)(_to(t, device) for t in targets)
    return targets.to(device)
