"""Multi-process training with ``torchrun`` (``torch.distributed``).

``torchrun --nproc_per_node=N -m lego.train ...`` starts ``N`` processes and sets
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in their environment; ``setup`` joins
them into one process group (NCCL on GPUs, Gloo on the CPU). Without those
variables everything runs in one process and no process group is made.

Every rank holds the whole corpus and draws the same shuffled order of the
training windows; each global batch is split into ``world_size`` contiguous
shards (``shard``), one per rank. Ranks evaluate the whole validation and test
splits with identical weights, so their metrics are identical without any
communication. Rank 0 alone prints progress and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` in ``[0, world_size)`` and its device."""

    rank: int
    world_size: int
    device: str

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one that prints and writes files."""
        return self.rank == 0


def setup(device: str) -> DistInfo:
    """Join the ``torchrun`` process group if this process was started by it.

    ``device``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Under ``torchrun`` with CUDA,
    each rank takes the GPU ``cuda:LOCAL_RANK``; the backend is NCCL on CUDA, Gloo on
    the CPU. Without ``torchrun`` (no ``WORLD_SIZE`` above 1): rank 0 of 1 on ``device``.
    ``ValueError`` when this machine has fewer GPUs than processes.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(rank=0, world_size=1, device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"--device cuda: local rank {local_rank} has no GPU (this machine has "
                f"{torch.cuda.device_count()}); set --nproc_per_node to at most that"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank=rank, world_size=world_size, device=device)


def teardown() -> None:
    """Leave the process group, if one was made."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(index: Tensor) -> Tensor:
    """This rank's contiguous part of a global batch's ``index`` (int64 ``[n]``); the
    parts of the ranks differ in size by at most one (a part may be empty)."""
    rank, world_size = world()
    return index.tensor_split(world_size)[rank]


def all_reduce_sum(value: Tensor) -> Tensor:
    """The sum of ``value`` over the ranks (in place; a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
