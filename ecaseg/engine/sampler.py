"""A resumable, distributed, infinite sampler with per-sample augmentation seeds.

Training runs for a number of iterations, not epochs. :class:`ResumableSampler` yields an endless stream of
``(index, seed)`` pairs: epoch ``e`` is a permutation drawn from ``seed + e``, split across processes like
:class:`torch.utils.data.DistributedSampler`, and every sample carries its own augmentation seed. Wrapping
the dataset in :class:`SeededDataset` makes each sample's random crop, scale and flip a pure function of that
seed, so the data a run sees depends only on the config seed and the position in the stream: a run resumed at
iteration ``j`` sees exactly the batches that an uninterrupted run sees from ``j`` on, whatever the number of
DataLoader workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["ResumableSampler", "SeededDataset"]

_SEED_MOD = 2**62


class ResumableSampler(Sampler[tuple[int, int]]):
    """Endless ``(index, augmentation_seed)`` stream, sharded by rank, restartable at any position.

    Args:
        num_samples: dataset length.
        seed: base seed (the config's ``train.seed``).
        rank: this process's rank.
        world_size: number of processes.
        start: how many samples this rank has already consumed (``iteration * batch_size`` on resume).

    Example:
        >>> it = iter(ResumableSampler(5, seed=0)); a = [next(it) for _ in range(7)]
        >>> it = iter(ResumableSampler(5, seed=0, start=3)); b = [next(it) for _ in range(4)]
        >>> a[3:] == b
        True
    """

    def __init__(
        self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> None:
        if num_samples <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.per_rank = math.ceil(num_samples / world_size)

    def _epoch_indices(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_samples, generator=generator)
        total = self.per_rank * self.world_size
        if total > self.num_samples:  # pad so that every rank gets the same count
            perm = torch.cat([perm, perm[: total - self.num_samples]])
        return perm[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        while True:
            epoch, offset = divmod(position, self.per_rank)
            indices = self._epoch_indices(epoch).tolist()
            for local in range(offset, self.per_rank):
                global_position = (epoch * self.per_rank + local) * self.world_size + self.rank
                sample_seed = (self.seed * 7_919 + global_position * 104_729 + 1) % _SEED_MOD
                yield indices[local], sample_seed
            position = (epoch + 1) * self.per_rank


class SeededDataset(Dataset[dict[str, Any]]):
    """Runs ``dataset[index]`` with torch's CPU RNG seeded from the sampler's per-sample seed.

    The global RNG is forked, so the caller's random state is untouched.
    """

    def __init__(self, dataset: Dataset[dict[str, Any]], drop_keys: tuple[str, ...] = ()) -> None:
        self.dataset = dataset
        self.drop_keys = drop_keys

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sample = self.dataset[index]
        for name in self.drop_keys:
            sample.pop(name, None)
        return sample
