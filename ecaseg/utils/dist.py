"""Thin helpers over :mod:`torch.distributed` that are no-ops in a single process."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_objects",
    "all_reduce_sum",
    "collective_device",
    "finish_distributed",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
]


def is_distributed() -> bool:
    """True when a default process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0: the only process that writes files."""
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all processes (no-op in a single process) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def collective_device() -> torch.device:
    """The device a tensor must be on for a collective of the default group (CUDA for NCCL, else CPU).

    A rank that saw no data still holds CPU tensors; it moves them here before taking part.
    """
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def finish_distributed(ok: bool = True) -> None:
    """End a ``torchrun`` job: wait for every rank (``ok``: all of them reached the end) and destroy the
    default process group (no-op without one).

    After an error the barrier is skipped (the ranks agreed to stop, or one of them is gone), so that no
    rank waits for a peer that will never come.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if ok and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def init_distributed() -> bool:
    """Initialise the default process group from ``torchrun``'s environment (``WORLD_SIZE`` > 1).

    NCCL on CUDA, gloo on the CPU; the environment variable ``ECASEG_DIST_BACKEND`` names another (gloo
    for two processes on one GPU, which NCCL refuses). Returns whether a multi-process group is active.
    """
    if not dist.is_available() or dist.is_initialized():
        return is_distributed()
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = os.environ.get("ECASEG_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True
