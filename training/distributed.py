"""Data-parallel training under ``torchrun``: one process per GPU (NCCL) or several CPU
processes (gloo), all running the one training loop on the same config.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them everything here is a
no-op and training runs in one process as before. Rank 0 alone writes checkpoints, metrics,
configs and reports and shows progress; the other ranks wait for it where they read what it
wrote.

Inference over a whole split (training pseudo-masks, ``wsss evaluate``) is sharded instead:
each rank takes a contiguous share cut on batch boundaries (``batch_shard``), so its batches
are exactly those one process would make, writes its result as its own part file
(``exchange_parts``), and rank 0 merges the parts in rank order.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Subset

# The longest any rank may wait in a collective. The long waits are bounded by a share, not by
# the job: a rank that finished its share of a sharded pass waits for the slowest share (at
# most that share's own time), then for rank 0 to merge the parts. Generous, rather than
# torch's default 30 minutes, for a slow rank or a slow shared file system.
TIMEOUT = datetime.timedelta(hours=3)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (once), and return this rank's device:
    ``cuda:LOCAL_RANK`` when ``device`` is a GPU, else ``device``."""
    if world_size() <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block (writes files); the others skip it and wait until it is done.

    Yields whether this rank runs it. A failure on rank 0 is raised there; torchrun then
    stops the others.
    """
    try:
        yield is_main()
    finally:
        barrier()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over the ranks (the values themselves in one process)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process): small picklable
    things, such as each rank's random generators."""
    if not active():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def train_sampler(data: Dataset, seed: int) -> DistributedSampler | None:
    """Each rank a disjoint, reshuffled-per-epoch share of the training set (None in one
    process, where the loader shuffles)."""
    if not active():
        return None
    return DistributedSampler(data, shuffle=True, seed=seed, drop_last=False)


def shard(data: Dataset) -> Dataset:
    """Every ``world``-th item from this rank's offset: validation split without the
    padding ``DistributedSampler`` adds, so the summed loss counts each image once."""
    if not active():
        return data
    return Subset(data, range(rank(), len(data), dist.get_world_size()))


def batch_shard(n: int, batch_size: int, of_rank: int | None = None) -> range:
    """This rank's (or ``of_rank``'s) contiguous share of ``n`` items: whole batches of
    ``batch_size`` from the start (the last one short, as in one process), the batches dealt
    out evenly, earlier ranks first. One process: all of them. A rank may get none when
    batches are fewer than ranks."""
    world = dist.get_world_size() if active() else 1
    r = rank() if of_rank is None else of_rank
    batches = -(-n // batch_size)
    first, last = (batches * k // world for k in (r, r + 1))
    return range(min(first * batch_size, n), min(last * batch_size, n))


def all_gather_shares(mine: np.ndarray, n: int, batch_size: int) -> np.ndarray:
    """Every rank's ``batch_shard`` result (``mine``: this rank's rows), concatenated in
    rank order on every rank: the whole ``n`` rows, as one process computes them. For
    results every rank needs whole (the level set's seed masks: each rank's sampler draws
    from all of them), where writing parts for rank 0 alone would not do."""
    if not active():
        return mine
    world = dist.get_world_size()
    sizes = [len(batch_shard(n, batch_size, r)) for r in range(world)]
    # Collectives take equal shapes: each share padded to the largest, then cut back.
    padded = np.zeros((max(sizes),) + mine.shape[1:], mine.dtype)
    padded[: len(mine)] = mine
    tensor = torch.from_numpy(padded)
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor)
    return np.concatenate([g.numpy()[:size] for g, size in zip(gathered, sizes, strict=True)])


def part_path(folder: Path, stem: str, of_rank: int, world: int) -> Path:
    return Path(folder) / f"{stem}.part-{of_rank:05d}-of-{world:05d}.npz"


def exchange_parts(
    folder: Path, stem: str, arrays: dict[str, np.ndarray]
) -> list[dict[str, np.ndarray]] | None:
    """Write this rank's part of a sharded result, wait for every rank's, and hand rank 0
    all of them in rank order (None on the other ranks, which are done). In one process:
    ``[arrays]``, nothing written.

    Parts are ``<folder>/<stem>.part-RRRRR-of-WWWWW.npz`` (no pickles), on a file system
    every rank sees (as the run folder must be for training); rank 0 deletes them once
    read, and the folder once empty. A part left by an earlier launch is never read: every
    rank overwrites its own before the barrier, and the name holds the world size.
    """
    if not active():
        return [arrays]
    world = dist.get_world_size()
    path = part_path(folder, stem, rank(), world)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:  # a file object: numpy adds no suffix
        np.savez(f, **arrays)
    os.replace(tmp, path)  # rank 0 never sees half a part
    # Each rank enters the barrier only once its own share is written, so it waits for the
    # slowest shard to finish, never for the whole job: at most that shard's own time
    # (1/world of the job), in practice the spread between equal shares of the same work.
    barrier()
    if not is_main():
        return None
    paths = [part_path(folder, stem, r, world) for r in range(world)]
    parts = []
    for p in paths:
        with np.load(p) as saved:
            parts.append({k: saved[k] for k in saved.files})
        p.unlink()
    if not any(path.parent.iterdir()):
        path.parent.rmdir()
    return parts
