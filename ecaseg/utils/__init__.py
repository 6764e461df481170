"""Small utilities shared by every layer: atomic file output and torch.distributed helpers."""

from ecaseg.utils.dist import (
    all_reduce_sum,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
)
from ecaseg.utils.io import atomic_save_torch, atomic_write, atomic_write_bytes, atomic_write_text

__all__ = [
    "all_reduce_sum",
    "atomic_save_torch",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
]
