"""The resumable sampler: data order restarts exactly, shards are disjoint, augmentation is seeded."""

from __future__ import annotations

from itertools import islice

import torch

from ecaseg.engine.sampler import ResumableSampler, SeededDataset


def take(sampler: ResumableSampler, n: int) -> list[tuple[int, int]]:
    return list(islice(iter(sampler), n))


def test_resume_continues_the_same_stream() -> None:
    full = take(ResumableSampler(7, seed=3), 30)
    for start in (0, 1, 6, 7, 13):
        assert take(ResumableSampler(7, seed=3, start=start), 30 - start) == full[start:]


def test_each_epoch_is_a_permutation_and_epochs_differ() -> None:
    stream = [i for i, _ in take(ResumableSampler(10, seed=0), 30)]
    epochs = [stream[i : i + 10] for i in range(0, 30, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]
    seeds = [s for _, s in take(ResumableSampler(10, seed=0), 30)]
    assert len(set(seeds)) == 30


def test_ranks_share_out_each_epoch() -> None:
    n, world = 10, 3
    per_rank = [
        [i for i, _ in take(ResumableSampler(n, seed=1, rank=r, world_size=world), 4)] for r in range(world)
    ]
    covered = {i for shard in per_rank for i in shard}
    assert covered == set(range(n))  # 12 slots for 10 samples: padded, every sample seen
    seeds = [
        s for r in range(world) for _, s in take(ResumableSampler(n, seed=1, rank=r, world_size=world), 4)
    ]
    assert len(set(seeds)) == len(seeds)


class _Noise(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": torch.rand(3) + index, "drop": torch.zeros(1)}


def test_seeded_dataset_is_a_pure_function_of_the_seed() -> None:
    data = SeededDataset(_Noise(), drop_keys=("drop",))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = data[(2, 123)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    torch.rand(5)
    b = data[(2, 123)]
    c = data[(2, 124)]
    assert torch.equal(a["x"], b["x"]) and not torch.equal(a["x"], c["x"])
    assert "drop" not in a
