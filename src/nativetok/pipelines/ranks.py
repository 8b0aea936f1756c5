"""The processes a pipeline runs in: each finds its rank and device from torchrun's or SLURM's variables, and
ranks that must wait for each other join a gloo group for barriers (no tensors move between them)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional, Tuple

import torch
import torch.distributed as dist

# How long ranks wait for each other at a barrier: ranks differ by at most one batch, but a last barrier
# may wait for rank 0 to read back and pack everything the ranks wrote.
BARRIER_TIMEOUT = timedelta(hours=2)


def process_rank() -> Tuple[int, int]:
    """(rank, world size) of this process: torch.distributed, torchrun's or SLURM's variables, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in os.environ and world_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[world_key])
    return 0, 1


def rank_device(device: Optional[str]) -> str:
    """This rank's device: its own GPU (LOCAL_RANK under torchrun, SLURM_LOCALID under srun) for `cuda` or by
    default when there is one, else the CPU."""
    if device not in (None, "cuda") or not torch.cuda.is_available():
        return device or "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', os.environ.get('SLURM_LOCALID', 0)))}"


def join_ranks(rank: int, world: int) -> bool:
    """Join the other ranks in a gloo process group for the barriers (no tensors move, so any device will
    do) unless alone or already in one; True when this call made the group. Under srun without MASTER_ADDR,
    the address and port come from SLURM's node list and job id, as Lightning's training derives them."""
    if world == 1 or dist.is_initialized():
        return False
    if "MASTER_ADDR" not in os.environ and "SLURM_NODELIST" in os.environ:
        from pytorch_lightning.plugins.environments import SLURMEnvironment

        os.environ["MASTER_ADDR"] = SLURMEnvironment.resolve_root_node_address(os.environ["SLURM_NODELIST"])
        if "MASTER_PORT" not in os.environ:  # Lightning's rule: 15000 + the job id's last 4 digits
            os.environ["MASTER_PORT"] = str(15000 + int(os.environ["SLURM_JOB_ID"][-4:]))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)
    return True


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
