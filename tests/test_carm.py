"""Tests for ecaseg.carm against loop-based references of Eq. (3)-(7) and the SAE pipeline."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ecaseg.cam import minmax_normalize, with_background
from ecaseg.carm import (
    CARMGenerator,
    CARMOutput,
    affinity_graph,
    contrast_cue,
    foreground_cue,
    region_maps,
    select_seeds,
)
from ecaseg.dino_features import DINOFeatures
from ecaseg.prototypes import calibrate_carm, prototype_momentum_update


def _labels(gen: torch.Generator, b: int, c: int) -> torch.Tensor:
    labels = torch.zeros(b, c)
    for i in range(b):
        n = int(torch.randint(1, min(3, c) + 1, (1,), generator=gen))
        labels[i, torch.randperm(c, generator=gen)[:n]] = 1.0
    return labels


def _cams_with_bg(gen: torch.Generator, b: int, c: int, n: int, zero_frac: float = 0.3) -> torch.Tensor:
    """Ties-free random foreground CAMs (some exact zeros) with the Eq. (2) background in front."""
    fg = torch.rand(b, c, n, generator=gen)
    fg = torch.where(torch.rand(b, c, n, generator=gen) < zero_frac, torch.zeros_like(fg), fg)
    return with_background(fg)


def _ref_select_seeds(cams: torch.Tensor, labels: torch.Tensor, k: float) -> torch.Tensor:
    b_, k_, n_ = cams.shape
    out = torch.zeros(b_, k_, n_, dtype=torch.bool)
    for b in range(b_):
        present = [0] + [c + 1 for c in range(k_ - 1) if labels[b, c] > 0]
        winner = []
        for i in range(n_):
            best = max(present, key=lambda c: (float(cams[b, c, i]), -c))
            winner.append(best)
        for c in present:
            vals = [
                (float(cams[b, c, i]), i) for i in range(n_) if winner[i] == c and float(cams[b, c, i]) != 0.0
            ]
            m = math.ceil(Fraction(str(k)) * len(vals))
            for _, i in sorted(vals, key=lambda t: (-t[0], t[1]))[:m]:
                out[b, c, i] = True
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.7, 1.0]))
def test_select_seeds_eq3_matches_loop(seed: int, k: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    cams = _cams_with_bg(gen, 3, 5, 24)
    labels = _labels(gen, 3, 5)
    seeds = select_seeds(cams, labels, k)
    assert seeds.dtype == torch.bool and seeds.shape == cams.shape
    assert torch.equal(seeds, _ref_select_seeds(cams, labels, k))
    # properties: exclusive seeds, no seeds for unlabelled classes
    assert int(seeds.sum(dim=1).max()) <= 1
    present = torch.cat([torch.ones(3, 1), labels], dim=1) > 0
    assert not seeds[~present].any()


def test_select_seeds_ceil_is_exact() -> None:
    # 10 positive positions of one class: ceil(0.3 * 10) = 3 (0.3 * 10 = 3.0000000000000004 in floating point)
    fg = torch.tensor([[[0.0] * 2 + [0.9 + 0.001 * i for i in range(10)]]])
    cams = with_background(fg)
    seeds = select_seeds(cams, torch.ones(1, 1), k=0.3)
    assert int(seeds[0, 1].sum()) == 3
    assert seeds[0, 1].nonzero().flatten().tolist() == [9, 10, 11]
    # background: 2 positions where M0 = 1 win, ceil(0.3 * 2) = 1
    assert int(seeds[0, 0].sum()) == 1


def test_select_seeds_class_without_nonzero_gets_none() -> None:
    fg = torch.tensor([[[0.9, 0.8, 0.7, 0.6], [0.0, 0.0, 0.0, 0.0]]])
    seeds = select_seeds(with_background(fg), torch.ones(1, 2), k=1.0)
    assert not seeds[0, 2].any()
    assert seeds[0, 1].all()


def test_select_seeds_bad_k_and_labels() -> None:
    cams = torch.rand(1, 3, 4)
    with pytest.raises(ValueError, match="k must"):
        select_seeds(cams, torch.ones(1, 2), 0.0)
    with pytest.raises(ValueError, match="labels"):
        select_seeds(cams, torch.ones(1, 3), 0.3)


def test_affinity_graph_and_foreground_cue_match_loop() -> None:
    gen = torch.Generator().manual_seed(7)
    keys = torch.randn(2, 6, 5, generator=gen)
    q = torch.randn(2, 5, generator=gen)
    graph = affinity_graph(keys)
    cue = foreground_cue(q, keys)
    for b in range(2):
        for i in range(6):
            ki = keys[b, i]
            assert float(cue[b, i]) == pytest.approx(float(q[b] @ ki / (q[b].norm() * ki.norm())), abs=1e-5)
            for j in range(6):
                kj = keys[b, j]
                assert float(graph[b, i, j]) == pytest.approx(
                    float(ki @ kj / (ki.norm() * kj.norm())), abs=1e-5
                )
    with pytest.raises(ValueError, match="cls_query"):
        foreground_cue(torch.randn(2, 4), keys)


def _ref_region_maps(seeds, graph, cue, gamma, clamp=True):
    b_, k_, n_ = seeds.shape
    out = torch.zeros(b_, k_, n_)
    for b in range(b_):
        for c in range(k_):
            m = torch.zeros(n_)
            for i in range(n_):
                if seeds[b, c, i]:
                    m += (graph[b, i] > gamma).float()
            if c > 0:
                m = m * (cue[b].clamp_min(0) if clamp else cue[b])
            lo, hi = float(m.min()), float(m.max())
            out[b, c] = (m - lo) / max(hi - lo, 1e-5)
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), gamma=st.sampled_from([0.0, 0.15, 0.4]), clamp=st.booleans())
def test_region_maps_eq6_7_match_loop(seed: int, gamma: float, clamp: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    b, c, n = 2, 4, 16
    cams = _cams_with_bg(gen, b, c, n)
    labels = _labels(gen, b, c)
    seeds = select_seeds(cams, labels, 0.3)
    keys = torch.randn(b, n, 8, generator=gen)
    graph = affinity_graph(keys)
    cue = foreground_cue(torch.randn(b, 8, generator=gen), keys)
    maps = region_maps(seeds, graph, cue, gamma, clamp_fg_cue=clamp)
    torch.testing.assert_close(maps, _ref_region_maps(seeds, graph, cue, gamma, clamp), rtol=1e-5, atol=1e-6)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    no_seed = ~seeds.any(dim=-1)
    assert torch.all(maps[no_seed] == 0)


def test_region_maps_without_fg_cue_is_the_seed_degree() -> None:
    gen = torch.Generator().manual_seed(21)
    b, c, n = 2, 4, 16
    cams = _cams_with_bg(gen, b, c, n)
    seeds = select_seeds(cams, _labels(gen, b, c), 0.3)
    graph = affinity_graph(torch.randn(b, n, 8, generator=gen))
    maps = region_maps(seeds, graph, None, 0.2)
    # the loop reference with a cue of ones is Eq. (7) without I_fg
    torch.testing.assert_close(maps, _ref_region_maps(seeds, graph, torch.ones(b, n), 0.2, True))
    # and it differs from a run with a real cue on some foreground map
    cue = foreground_cue(torch.randn(b, 8, generator=gen), torch.randn(b, n, 8, generator=gen))
    assert not torch.allclose(maps[:, 1:], region_maps(seeds, graph, cue, 0.2)[:, 1:])


def test_region_maps_bf16_autocast_counts_exact() -> None:
    gen = torch.Generator().manual_seed(8)
    n = 300  # degrees above 256 are not representable exactly in bfloat16
    seeds = torch.zeros(1, 2, n, dtype=torch.bool)
    seeds[0, 0, :280] = True
    seeds[0, 1, 280:] = True
    graph = torch.rand(1, n, n, generator=gen)
    cue = torch.rand(1, n, generator=gen)
    ref = region_maps(seeds, graph, cue, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = region_maps(seeds, graph, cue, 0.1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def _dino(keys: torch.Tensor, query: torch.Tensor, grid: tuple[int, int]) -> DINOFeatures:
    return DINOFeatures(keys=keys, cls_query=query, grid=grid)


def _inputs(gen: torch.Generator, b: int, c: int, cam_hw, dino_hw, feat_hw, df: int = 6, d: int = 8):
    cams = minmax_normalize(torch.rand(b, c, *cam_hw, generator=gen))  # the contract: peak 1 per map
    labels = _labels(gen, b, c)
    cams = cams * labels[:, :, None, None]
    keys = torch.randn(b, dino_hw[0] * dino_hw[1], d, generator=gen)
    query = torch.randn(b, d, generator=gen)
    feats = torch.randn(b, df, *feat_hw, generator=gen)
    return cams, labels, keys, query, feats


@pytest.mark.parametrize(
    ("cam_hw", "dino_hw", "feat_hw"),
    [((4, 4), (8, 8), (4, 4)), ((4, 5), (6, 7), (4, 5)), ((4, 4), (3, 3), (4, 4)), ((4, 4), (4, 4), (2, 2))],
)
def test_carm_generator_shapes_and_properties(cam_hw, dino_hw, feat_hw) -> None:
    gen = torch.Generator().manual_seed(9)
    b, c = 3, 4
    cams, labels, keys, query, feats = _inputs(gen, b, c, cam_hw, dino_hw, feat_hw)
    cams.requires_grad_(True)
    feats.requires_grad_(True)
    module = CARMGenerator(num_classes=c + 1, feature_dim=6)
    out = module(cams, labels, _dino(keys, query, dino_hw), feats)
    assert isinstance(out, CARMOutput)
    assert out.carm.shape == (b, c + 1, *cam_hw) and out.carm_raw.shape == (b, c + 1, *cam_hw)
    assert out.seeds.shape == (b, c + 1, dino_hw[0] * dino_hw[1]) and out.seeds.dtype == torch.bool
    assert not out.carm.requires_grad and not out.carm_raw.requires_grad
    for t in (out.carm, out.carm_raw):
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
        assert torch.all(t[:, 1:][labels == 0] == 0)
    assert int(out.seeds.sum(dim=1).max()) <= 1
    assert bool(module.prototypes.initialized[0])
    assert "prototypes.prototypes" in module.state_dict()


def test_carm_generator_equals_composed_functions_on_one_grid() -> None:
    gen = torch.Generator().manual_seed(10)
    b, c, hw = 2, 3, (4, 4)
    cams, labels, keys, query, feats = _inputs(gen, b, c, hw, hw, hw)
    module = CARMGenerator(num_classes=c + 1, feature_dim=6, k=0.5, gamma=0.1, momentum=0.8)
    before = module.prototypes.prototypes.clone()
    init_before = module.prototypes.initialized.clone()
    out = module(cams, labels, _dino(keys, query, hw), feats)

    scores = with_background(cams.flatten(2))
    seeds = select_seeds(scores, labels, 0.5)
    assert torch.equal(out.seeds, seeds)
    raw = region_maps(seeds, affinity_graph(keys), foreground_cue(query, keys), 0.1)
    torch.testing.assert_close(out.carm_raw.flatten(2), raw)
    tokens = feats.flatten(2).transpose(1, 2)
    protos, init = prototype_momentum_update(before, init_before, tokens, seeds, 0.8)
    torch.testing.assert_close(module.prototypes.prototypes, protos)
    assert torch.equal(module.prototypes.initialized, init)
    torch.testing.assert_close(out.carm.flatten(2), calibrate_carm(raw, tokens, protos, init, labels))


def test_carm_generator_switches() -> None:
    gen = torch.Generator().manual_seed(11)
    cams, labels, keys, query, feats = _inputs(gen, 2, 3, (4, 4), (8, 8), (4, 4))
    module = CARMGenerator(num_classes=4, feature_dim=6, calibrate=False)
    out = module(cams, labels, _dino(keys, query, (8, 8)), feats, update_prototypes=False)
    assert torch.equal(out.carm, out.carm_raw)
    assert not module.prototypes.initialized.any()
    module.calibrate = True
    module(cams, labels, _dino(keys, query, (8, 8)), feats, update_prototypes=True)
    state = module.prototypes.prototypes.clone()
    module(cams, labels, _dino(keys, query, (8, 8)), feats, update_prototypes=False)
    assert torch.equal(module.prototypes.prototypes, state)


@pytest.mark.parametrize("cue", ["none", "contrast"])
def test_carm_generator_without_class_cue_ignores_the_class_token(cue: str) -> None:
    gen = torch.Generator().manual_seed(13)
    cams, labels, keys, query, feats = _inputs(gen, 2, 3, (4, 4), (8, 8), (4, 4))
    module = CARMGenerator(num_classes=4, feature_dim=6, calibrate=False, fg_cue=cue)
    out = module(cams, labels, _dino(keys, query, (8, 8)), feats, update_prototypes=False)
    other = module(cams, labels, _dino(keys, torch.randn_like(query), (8, 8)), feats, update_prototypes=False)
    torch.testing.assert_close(out.carm_raw, other.carm_raw)
    with_cue = CARMGenerator(num_classes=4, feature_dim=6, calibrate=False)
    ref = with_cue(cams, labels, _dino(keys, query, (8, 8)), feats, update_prototypes=False)
    assert not torch.allclose(out.carm_raw[:, 1:], ref.carm_raw[:, 1:])
    assert f"fg_cue={cue!r}" in repr(module)


def _ref_contrast_cue(keys: torch.Tensor) -> torch.Tensor:
    """Loop reference: 1 - cos(k_i, mean of unit keys), then (x - min) / (max - min) per image."""
    out = torch.zeros(keys.shape[:2], dtype=torch.float64)
    for b in range(keys.shape[0]):
        units = [k.double() / k.double().norm() for k in keys[b]]
        mean = sum(units) / len(units)
        mean = mean / mean.norm()
        vals = [1.0 - float(u @ mean) for u in units]
        lo, hi = min(vals), max(vals)
        out[b] = torch.tensor([(v - lo) / max(hi - lo, 1e-6) for v in vals])
    return out


def test_contrast_cue_matches_loop_reference() -> None:
    gen = torch.Generator().manual_seed(21)
    keys = torch.randn(3, 20, 7, generator=gen)
    cue = contrast_cue(keys)
    assert cue.dtype == torch.float32 and cue.shape == (3, 20)
    torch.testing.assert_close(cue.double(), _ref_contrast_cue(keys), rtol=1e-5, atol=1e-5)
    # invariant to the scale of each key; the patch farthest from the mean gets 1, the nearest 0
    torch.testing.assert_close(contrast_cue(keys * torch.rand(3, 20, 1, generator=gen) + 0.0), cue)
    assert torch.allclose(cue.amax(1), torch.ones(3)) and torch.allclose(cue.amin(1), torch.zeros(3))
    assert torch.equal(contrast_cue(torch.ones(1, 5, 4)), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="keys must be"):
        contrast_cue(torch.ones(5, 4))


def test_contrast_cue_marks_the_minority_cluster() -> None:
    gen = torch.Generator().manual_seed(22)
    background, obj = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    keys = torch.stack([background] * 12 + [obj] * 4) + 0.05 * torch.randn(16, 8, generator=gen)
    cue = contrast_cue(keys[None])[0]
    assert cue[12:].min() > cue[:12].max()


def test_carm_generator_contrast_cue_matches_region_maps() -> None:
    gen = torch.Generator().manual_seed(23)
    cams, labels, keys, query, feats = _inputs(gen, 2, 3, (4, 4), (4, 4), (4, 4))
    module = CARMGenerator(num_classes=4, feature_dim=6, calibrate=False, gamma=0.1, fg_cue="contrast")
    out = module(cams, labels, _dino(keys, query, (4, 4)), feats, update_prototypes=False)
    seeds = out.seeds
    ref = region_maps(seeds, affinity_graph(keys), contrast_cue(keys), 0.1).view(2, 4, 4, 4)
    torch.testing.assert_close(out.carm_raw, ref)
    with pytest.raises(ValueError, match="fg_cue must be one of"):
        CARMGenerator(num_classes=4, feature_dim=6, fg_cue="salient")


def test_carm_generator_bad_shapes() -> None:
    gen = torch.Generator().manual_seed(12)
    cams, labels, keys, query, feats = _inputs(gen, 1, 3, (4, 4), (8, 8), (4, 4))
    module = CARMGenerator(num_classes=4, feature_dim=6)
    with pytest.raises(ValueError, match="grid"):
        module(cams, labels, _dino(keys, query, (7, 8)), feats)
    with pytest.raises(ValueError, match="features"):
        module(cams, labels, _dino(keys, query, (8, 8)), feats[:, :5])
    with pytest.raises(ValueError, match="cams"):
        module(cams[:, :2], labels, _dino(keys, query, (8, 8)), feats)


@pytest.mark.parametrize(("n_side", "k", "classes"), [(8, 0.3, 5), (12, 0.15, 21), (6, 1.0, 3)])
def test_seed_rows_equal_the_dense_graph(n_side: int, k: float, classes: int) -> None:
    """CARMGenerator builds only the seed rows of the graph; the degrees equal the dense product."""
    from ecaseg.carm import seed_degree

    gen = torch.Generator().manual_seed(n_side + classes)
    b, n = 3, n_side * n_side
    cams = minmax_normalize(torch.rand(b, classes - 1, n, generator=gen))
    labels = (torch.rand(b, classes - 1, generator=gen) < 0.5).float()
    labels[:, 0] = 1.0
    seeds = select_seeds(with_background(cams * labels[:, :, None]), labels, k)
    keys = torch.randn(b, n, 16, generator=gen)
    graph = affinity_graph(keys)
    gamma = 0.15
    near = ((graph - gamma).abs() < 1e-5).any()  # a cosine at the threshold could round either way
    assert not near
    dense = seeds.float() @ (graph > gamma).float()
    torch.testing.assert_close(seed_degree(seeds, keys, gamma, k), dense, rtol=0, atol=0)
    torch.testing.assert_close(seed_degree(seeds, keys, gamma), dense, rtol=0, atol=0)  # rows from the data
    assert int(seeds.any(dim=1).sum(dim=1).max()) <= math.ceil(k * n) + classes  # the bound on the rows
