"""Data-parallel training under ``torchrun``: one process per GPU (NCCL) or several CPU
processes (gloo), all running the one training loop on the same config.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them everything here is a
no-op and training runs in one process as before. Rank 0 alone writes checkpoints, metrics,
configs and pseudo-masks and shows progress; the other ranks wait for it where they read
what it wrote.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Subset

# Rank 0 makes the pseudo-masks of the whole training set while the others wait: allow more
# than torch's default 30 minutes for it.
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
