"""Tests for ecaseg.prototypes against loop-based references of Eq. (8)-(10)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from ecaseg.prototypes import (
    MomentumPrototypes,
    calibrate_carm,
    prototype_momentum_update,
    prototype_similarity,
)


def _random_seeds(gen: torch.Generator, b: int, k: int, n: int, empty: tuple[int, ...] = ()) -> torch.Tensor:
    """Exclusive random seeds (each patch seeds at most one class); classes in ``empty`` get none."""
    owner = torch.randint(0, k + 1, (b, n), generator=gen)  # k means "no class"
    seeds = torch.arange(k).view(1, k, 1) == owner.unsqueeze(1)
    for c in empty:
        seeds[:, c] = False
    return seeds


def _ref_update(protos, init, tokens, seeds, tau):
    protos, init = protos.clone(), init.clone()
    for c in range(protos.shape[0]):
        picked = [
            tokens[b, i] for b in range(tokens.shape[0]) for i in range(tokens.shape[1]) if seeds[b, c, i]
        ]
        if not picked:
            continue
        mean = torch.stack(picked).mean(0)
        protos[c] = tau * protos[c] + (1 - tau) * mean if init[c] else mean
        init[c] = True
    return protos, init


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), tau=st.sampled_from([0.0, 0.5, 0.9, 0.99]))
def test_momentum_update_eq8_matches_loop(seed: int, tau: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    k, dim = 5, 4
    module = MomentumPrototypes(k, dim, momentum=tau)
    ref_p, ref_i = module.prototypes.clone(), module.initialized.clone()
    for step in range(3):
        tokens = torch.randn(2, 9, dim, generator=gen)
        seeds = _random_seeds(gen, 2, k, 9, empty=(3,) if step < 2 else ())
        before = module.prototypes.clone()
        module.update(tokens, seeds)
        ref_p, ref_i = _ref_update(ref_p, ref_i, tokens, seeds, tau)
        torch.testing.assert_close(module.prototypes, ref_p)
        assert torch.equal(module.initialized, ref_i)
        no_seed = ~seeds.any(dim=2).any(dim=0)
        assert torch.equal(module.prototypes[no_seed], before[no_seed])


def test_first_update_initialises_and_empty_class_untouched() -> None:
    module = MomentumPrototypes(3, 2, momentum=0.9)
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    seeds = torch.tensor([[[True, True, False], [False, False, True], [False, False, False]]])
    module.update(tokens, seeds)
    assert module.prototypes.tolist() == [[2.0, 3.0], [5.0, 6.0], [0.0, 0.0]]
    assert module.initialized.tolist() == [True, True, False]
    module.update(tokens, seeds)  # same mean again: fixed point
    torch.testing.assert_close(module.prototypes, torch.tensor([[2.0, 3.0], [5.0, 6.0], [0.0, 0.0]]))


def test_state_dict_round_trip() -> None:
    gen = torch.Generator().manual_seed(1)
    module = MomentumPrototypes(4, 3, momentum=0.7)
    module.update(torch.randn(2, 6, 3, generator=gen), _random_seeds(gen, 2, 4, 6, empty=(2,)))
    state = module.state_dict()
    assert set(state) == {"prototypes", "initialized"}
    other = MomentumPrototypes(4, 3, momentum=0.7)
    other.load_state_dict(state)
    assert torch.equal(other.prototypes, module.prototypes)
    assert torch.equal(other.initialized, module.initialized)
    carm, feats, labels = (
        torch.rand(2, 4, 6, generator=gen),
        torch.randn(2, 6, 3, generator=gen),
        torch.ones(2, 3),
    )
    torch.testing.assert_close(other.calibrate(carm, feats, labels), module.calibrate(carm, feats, labels))
    with pytest.raises(RuntimeError):
        MomentumPrototypes(5, 3).load_state_dict(state)


def _ref_calibrate(carm, feats, protos, init, labels):
    b_, k_, n_ = carm.shape
    out = torch.zeros_like(carm)
    for b in range(b_):
        for c in range(k_):
            if c > 0 and labels[b, c - 1] == 0:
                continue
            m = carm[b, c].clone()
            for i in range(n_):
                if init[c]:
                    p, f = protos[c], feats[b, i]
                    s = max(float(p @ f / (p.norm() * f.norm())), 0.0)
                else:
                    s = 1.0
                m[i] = m[i] * s**2
            lo, hi = float(m.min()), float(m.max())
            out[b, c] = (m - lo) / max(hi - lo, 1e-5)
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_calibrate_eq9_10_matches_loop(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    b, k, n, dim = 2, 5, 7, 4
    carm = torch.rand(b, k, n, generator=gen)
    feats = torch.randn(b, n, dim, generator=gen)
    protos = torch.randn(k, dim, generator=gen)
    init = torch.rand(k, generator=gen) < 0.7
    labels = (torch.rand(b, k - 1, generator=gen) < 0.5).float()
    out = calibrate_carm(carm, feats, protos, init, labels)
    torch.testing.assert_close(out, _ref_calibrate(carm, feats, protos, init, labels), rtol=1e-5, atol=1e-5)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.all(out[:, 1:][labels == 0] == 0)


def test_calibrate_uninitialised_prototype_leaves_map_and_background_always_present() -> None:
    gen = torch.Generator().manual_seed(4)
    carm = torch.rand(2, 3, 6, generator=gen)
    out = calibrate_carm(
        carm, torch.randn(2, 6, 4), torch.randn(3, 4), torch.zeros(3, dtype=torch.bool), torch.zeros(2, 2)
    )
    lo, hi = carm[:, 0].amin(-1, keepdim=True), carm[:, 0].amax(-1, keepdim=True)
    torch.testing.assert_close(out[:, 0], (carm[:, 0] - lo) / (hi - lo))
    assert torch.all(out[:, 1:] == 0)


def test_prototype_similarity_rectified() -> None:
    sim = prototype_similarity(
        torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]]), torch.tensor([[3.0, 0.0]])
    )
    assert sim.tolist() == [[[1.0, 0.0, 0.0]]]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="momentum"):
        MomentumPrototypes(3, 2, momentum=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        MomentumPrototypes(1, 2)
    module = MomentumPrototypes(3, 2)
    with pytest.raises(ValueError, match="seeds"):
        module.update(torch.zeros(1, 4, 2), torch.zeros(1, 2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        module.calibrate(torch.zeros(1, 3, 4), torch.zeros(1, 4, 2), torch.zeros(1, 3))


def test_update_all_reduces_stats_like_one_big_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two simulated ranks: each rank's all-reduce adds the other rank's (captured) sums and counts."""
    import ecaseg.prototypes as protos_mod

    gen = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(1, 6, 3, generator=gen), _random_seeds(gen, 1, 4, 6, empty=e)) for e in ((2,), ())
    ]
    single = MomentumPrototypes(4, 3, momentum=0.5)  # before patching: one process, both batches
    single.update(torch.cat([batches[0][0], batches[1][0]]), torch.cat([batches[0][1], batches[1][1]]))
    captured: list[torch.Tensor] = []

    def capture(t: torch.Tensor) -> torch.Tensor:
        captured.append(t.clone())
        return t

    monkeypatch.setattr(protos_mod, "all_reduce_sum", capture)
    for tokens, seeds in batches:
        MomentumPrototypes(4, 3, momentum=0.5).update(tokens, seeds)
    results = []
    for rank, (tokens, seeds) in enumerate(batches):
        other = captured[1 - rank]
        monkeypatch.setattr(protos_mod, "all_reduce_sum", lambda t, o=other: t.add_(o))
        module = MomentumPrototypes(4, 3, momentum=0.5)
        module.update(tokens, seeds)
        results.append(module)
    for module in results:
        torch.testing.assert_close(module.prototypes, single.prototypes)
        assert torch.equal(module.initialized, single.initialized)


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        gen = torch.Generator().manual_seed(100 + rank)
        module = MomentumPrototypes(4, 3, momentum=0.5)
        tokens = torch.randn(1, 6, 3, generator=gen)
        seeds = _random_seeds(gen, 1, 4, 6, empty=(2,) if rank == 0 else ())
        module.update(tokens, seeds)
        torch.save(
            {"tokens": tokens, "seeds": seeds, "state": module.state_dict()}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_update_is_synchronised_across_processes(tmp_path: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(
        _ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["state"]["prototypes"], r1["state"]["prototypes"])
    # identical to one process seeing both ranks' batches
    single = MomentumPrototypes(4, 3, momentum=0.5)
    single.update(torch.cat([r0["tokens"], r1["tokens"]]), torch.cat([r0["seeds"], r1["seeds"]]))
    torch.testing.assert_close(r0["state"]["prototypes"], single.prototypes)
    assert torch.equal(r0["state"]["initialized"], single.initialized)


def test_pure_update_without_sync_skips_all_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    import ecaseg.prototypes as protos_mod

    def fail(t: torch.Tensor) -> torch.Tensor:
        raise AssertionError("all_reduce_sum called with sync=False")

    monkeypatch.setattr(protos_mod, "all_reduce_sum", fail)
    seeds = torch.tensor([[[True, False], [False, True]]])
    new, init = prototype_momentum_update(
        torch.zeros(2, 1),
        torch.ones(2, dtype=torch.bool),
        torch.tensor([[[2.0], [4.0]]]),
        seeds,
        0.5,
        sync=False,
    )
    assert new.flatten().tolist() == [1.0, 2.0] and init.all()
