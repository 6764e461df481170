"""Tests of ecaseg.cce_loss (Eq. 11) against loop-based references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ecaseg.cce_loss import CCELoss, cce_loss, js_divergence, local_view_labels, pairwise_js

LN2 = math.log(2.0)
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")


def _loop_js(p: list[float], q: list[float]) -> float:
    total = 0.0
    for a, b in zip(p, q):
        m = 0.5 * (a + b)
        if a > 0:
            total += 0.5 * a * math.log(a / m)
        if b > 0:
            total += 0.5 * b * math.log(b / m)
    return total


def _dist(raw: list[float]) -> list[float]:
    s = sum(raw)
    return [v / s for v in raw]


prob_vectors = st.integers(min_value=2, max_value=6).flatmap(
    lambda c: st.tuples(
        st.lists(
            st.floats(min_value=0.0, max_value=1.0, allow_subnormal=False), min_size=c, max_size=c
        ).filter(lambda v: sum(v) > 1e-3),
        st.lists(
            st.floats(min_value=0.0, max_value=1.0, allow_subnormal=False), min_size=c, max_size=c
        ).filter(lambda v: sum(v) > 1e-3),
    )
)


@settings(max_examples=25, deadline=None)
@given(prob_vectors)
def test_js_matches_loop_symmetric_and_bounded(pq: tuple[list[float], list[float]]) -> None:
    p, q = _dist(pq[0]), _dist(pq[1])
    tp = torch.tensor(p, dtype=torch.float64)
    tq = torch.tensor(q, dtype=torch.float64)
    d = float(js_divergence(tp, tq))
    assert d == pytest.approx(_loop_js(p, q), abs=1e-9)
    assert d == pytest.approx(float(js_divergence(tq, tp)), abs=1e-12)
    assert 0.0 <= d <= LN2 + 1e-12


def test_js_extremes_and_pairwise() -> None:
    assert float(js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(LN2)
    assert float(js_divergence(torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7]))) == pytest.approx(
        0.0, abs=1e-7
    )
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 5, 4, generator=g, dtype=torch.float64).softmax(-1)
    pw = pairwise_js(p)
    ref = js_divergence(p.unsqueeze(-2), p.unsqueeze(-3))
    torch.testing.assert_close(pw, ref)
    torch.testing.assert_close(pw, pw.transpose(-1, -2))


def _loop_local_labels(
    label: torch.Tensor, geo: list[float], h: int, w: int, ghw: tuple[int, int]
) -> list[int]:
    y0, x0, bh, bw, flip = geo
    hl, wl = label.shape
    out = []
    for r in range(h):
        for c in range(w):
            u = (c + 0.5) / w
            if flip > 0.5:
                u = 1.0 - u
            y = (y0 + (r + 0.5) / h * bh) * hl / ghw[0]
            x = (x0 + u * bw) * wl / ghw[1]
            iy, ix = math.floor(y), math.floor(x)
            out.append(int(label[iy, ix]) if 0 <= iy < hl and 0 <= ix < wl else 255)
    return out


def test_local_view_labels_geometry() -> None:
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 4, (2, 10, 12), generator=g)
    geo = torch.tensor(
        [
            [[0.0, 0.0, 20.0, 24.0, 1.0], [3.3, 5.1, 9.7, 13.3, 0.0]],
            [[10.2, 11.7, 14.1, 16.9, 1.0], [-4.3, 2.2, 12.5, 8.1, 0.0]],  # partly outside
        ]
    )
    got = local_view_labels(label, geo, (4, 5), global_hw=(20, 24))
    for b in range(2):
        for v in range(2):
            ref = _loop_local_labels(label[b], geo[b, v].tolist(), 4, 5, (20, 24))
            assert got[b, v].tolist() == ref
    assert (got[1, 1] == 255).any()  # the partly outside view has ignored patches
    # the whole image flipped: labels are the image mirrored
    full = local_view_labels(label, torch.tensor([[[0.0, 0.0, 10.0, 12.0, 1.0]]] * 2), (10, 12))
    assert torch.equal(full.view(2, 10, 12), label.flip(-1))


def _softmax(x: list[float]) -> list[float]:
    mx = max(x)
    e = [math.exp(v - mx) for v in x]
    return [v / sum(e) for v in e]


def _loop_cce(cams: torch.Tensor, local_labels: torch.Tensor, labels: torch.Tensor | None) -> float:
    """Eq. (11) with explicit loops: sum over views, mean over images."""
    b, v, c, h, w = cams.shape
    total = 0.0
    for i in range(b):
        for n in range(v):
            dists, labs = [], []
            for r in range(h):
                for col in range(w):
                    act = [
                        float(cams[i, n, k, r, col]) * (float(labels[i, k]) if labels is not None else 1.0)
                        for k in range(c)
                    ]
                    dists.append(_softmax(act))
                    labs.append(int(local_labels[i, n, r * w + col]))
            pos, neg = [], []
            for p in range(h * w):
                for q in range(p + 1, h * w):
                    if labs[p] == 255 or labs[q] == 255:
                        continue
                    d = _loop_js(dists[p], dists[q]) / LN2
                    (pos if labs[p] == labs[q] else neg).append(d)
            if pos:
                total += sum(1.0 - d for d in pos) / len(pos)
            if neg:
                total += sum(neg) / len(neg)
    return total / b


def _inputs(seed: int, b: int = 2, v: int = 2, c: int = 3, h: int = 3, w: int = 4):
    g = torch.Generator().manual_seed(seed)
    cams = (torch.rand(b, v, c, h, w, generator=g) * 4).requires_grad_(True)
    label = torch.randint(0, 3, (b, 16, 16), generator=g)
    label[torch.rand(b, 16, 16, generator=g) < 0.25] = 255
    geo = torch.stack(
        [
            torch.rand(b, v, generator=g) * 4,
            torch.rand(b, v, generator=g) * 4,
            8 + torch.rand(b, v, generator=g) * 4,
            8 + torch.rand(b, v, generator=g) * 4,
            (torch.rand(b, v, generator=g) < 0.5).float(),
        ],
        dim=-1,
    )
    return cams, geo, label


@pytest.mark.parametrize("with_labels", [False, True])
def test_cce_matches_loop_reference(with_labels: bool) -> None:
    cams, geo, label = _inputs(2)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]) if with_labels else None
    loss = cce_loss(cams, geo, label, labels=labels, max_patches=256)
    local = local_view_labels(label, geo, (3, 4))
    ref = _loop_cce(cams.detach(), local, labels)
    assert float(loss) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # the reference sees pairs of both kinds
    assert (local != 255).sum() > 4


def test_gradients_reach_local_cams_and_skip_ignored_patches() -> None:
    cams, geo, label = _inputs(3)
    loss = CCELoss(max_patches=64)(cams, geo, label)
    loss.backward()
    assert cams.grad is not None
    local = local_view_labels(label, geo, (3, 4)).view(2, 2, 1, 3, 4).expand_as(cams)
    grad = cams.grad
    assert float(grad[local != 255].abs().sum()) > 0
    assert float(grad[local == 255].abs().sum()) == 0.0
    # changing the activations of ignored patches does not change the loss
    cams2 = cams.detach().clone()
    cams2[local == 255] = 123.0
    assert float(cce_loss(cams2, geo, label)) == pytest.approx(float(loss), rel=1e-6)


def test_absent_classes_do_not_matter_with_labels() -> None:
    cams, geo, label = _inputs(4)
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    a = cce_loss(cams, geo, label, labels=labels)
    cams2 = cams.detach().clone()
    cams2[0, :, 2] += 5.0
    cams2[1, :, 1] -= 3.0
    assert float(cce_loss(cams2, geo, label, labels=labels)) == pytest.approx(float(a), rel=1e-6)
    assert float(cce_loss(cams2, geo, label)) != pytest.approx(float(a), rel=1e-3)


def test_views_without_pairs_of_one_kind_give_no_nan() -> None:
    cams = torch.rand(3, 1, 2, 2, 2, requires_grad=True)
    geo = torch.tensor([0.0, 0.0, 4.0, 4.0, 0.0]).repeat(3, 1, 1)
    label = torch.stack(
        [
            torch.ones(4, 4, dtype=torch.long),  # positives only
            torch.tensor(
                [[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 255, 255], [255, 255, 255, 255]]
            ),  # negatives only
            torch.full((4, 4), 255),  # nothing valid
        ]
    )
    loss = cce_loss(cams, geo, label)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(cams.grad).all()
    ref = _loop_cce(cams.detach(), local_view_labels(label, geo, (2, 2)), None)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    zero = cce_loss(cams, geo, torch.full((3, 4, 4), 255))
    assert float(zero) == 0.0


def test_flipped_view_equals_flipped_cams() -> None:
    cams, geo, label = _inputs(5)
    geo_f = geo.clone()
    geo_f[..., 4] = 1.0 - geo_f[..., 4]
    a = cce_loss(cams, geo, label)
    b = cce_loss(cams.flip(-1), geo_f, label)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_patch_sampling() -> None:
    cams, geo, label = _inputs(6, h=4, w=4)
    n_valid = int((local_view_labels(label, geo, (4, 4)) != 255).sum(-1).max())
    full = cce_loss(cams, geo, label, max_patches=256)
    # only valid patches are drawn: a budget equal to the largest valid count reproduces the full loss
    same = cce_loss(cams, geo, label, max_patches=n_valid)
    assert float(same) == pytest.approx(float(full), rel=1e-5)
    a = cce_loss(cams, geo, label, max_patches=3, generator=torch.Generator().manual_seed(7))
    b = cce_loss(cams, geo, label, max_patches=3, generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(a) and float(a) == float(b)
    a.backward()
    assert cams.grad is not None and float(cams.grad.abs().sum()) > 0


def test_bad_shapes() -> None:
    cams, geo, label = _inputs(8)
    with pytest.raises(ValueError, match="local_cams"):
        cce_loss(cams[0], geo, label)
    with pytest.raises(ValueError, match="geometry"):
        cce_loss(cams, geo[:, :1], label)
    with pytest.raises(ValueError, match="labels"):
        cce_loss(cams, geo, label, labels=torch.ones(2, 4))
    with pytest.raises(ValueError, match="global_label"):
        cce_loss(cams, geo, label[0])
