"""Tests of ecaseg.affinity against loop-based references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ecaseg.affinity import AffinityLabels, AffinityLoss, affinity_labels, affinity_loss, downsample_label


def _loop_labels(label: torch.Tensor, radius: int, ignore: int = 255) -> tuple[set, set, set]:
    b, h, w = label.shape
    bg, fg, neg = set(), set(), set()
    for n in range(b):
        for i in range(h * w):
            for j in range(h * w):
                yi, xi, yj, xj = i // w, i % w, j // w, j % w
                if abs(yi - yj) > radius or abs(xi - xj) > radius:
                    continue
                li, lj = int(label[n, yi, xi]), int(label[n, yj, xj])
                if li == ignore or lj == ignore:
                    continue
                if li != lj:
                    neg.add((n, i, j))
                elif li == 0:
                    bg.add((n, i, j))
                else:
                    fg.add((n, i, j))
    return bg, fg, neg


def _as_set(mask: torch.Tensor) -> set:
    return {tuple(t) for t in mask.nonzero().tolist()}


@pytest.mark.parametrize("radius", [1, 2, 8])
def test_affinity_labels_match_loops(radius: int) -> None:
    g = torch.Generator().manual_seed(radius)
    label = torch.randint(0, 3, (2, 5, 6), generator=g)
    label[torch.rand(2, 5, 6, generator=g) < 0.2] = 255
    out = affinity_labels(label, radius=radius)
    bg, fg, neg = _loop_labels(label, radius)
    assert _as_set(out.bg_pos) == bg
    assert _as_set(out.fg_pos) == fg
    assert _as_set(out.neg) == neg
    assert len(bg) > 0 and len(fg) > 0 and len(neg) > 0
    for m in (out.bg_pos, out.fg_pos, out.neg):
        assert m.dtype == torch.bool and m.shape == (2, 30, 30)
        assert torch.equal(m, m.transpose(1, 2))
    assert not (out.bg_pos & out.fg_pos).any() and not (out.neg & (out.bg_pos | out.fg_pos)).any()


def _loop_loss(pred: torch.Tensor, bg: set, fg: set, neg: set, split: bool) -> float:
    def mean(pairs: set, f) -> float:
        return sum(f(float(pred[p])) for p in pairs) / max(len(pairs), 1)

    neg_term = mean(neg, lambda a: a)
    if split:
        return 0.25 * mean(bg, lambda a: 1 - a) + 0.25 * mean(fg, lambda a: 1 - a) + 0.5 * neg_term
    return 0.5 * mean(bg | fg, lambda a: 1 - a) + 0.5 * neg_term


@pytest.mark.parametrize("split", [False, True])
def test_affinity_loss_matches_loop(split: bool) -> None:
    g = torch.Generator().manual_seed(10)
    label = torch.randint(0, 3, (2, 4, 5), generator=g)
    label[0, 0, :] = 255
    pred = torch.rand(2, 20, 20, generator=g, requires_grad=True)
    labs = affinity_labels(label, radius=2)
    loss = affinity_loss(pred, labs, split_positives=split)
    ref = _loop_loss(pred.detach(), *_loop_labels(label, 2), split=split)
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-6)
    loss.backward()
    assert pred.grad is not None
    touched = labs.bg_pos | labs.fg_pos | labs.neg
    assert float(pred.grad[~touched].abs().sum()) == 0.0 and float(pred.grad[touched].abs().sum()) > 0


def test_empty_sets_are_zero_not_nan() -> None:
    pred = torch.rand(1, 4, 4)
    labs = affinity_labels(torch.full((1, 2, 2), 255), radius=8)
    assert float(affinity_loss(pred, labs)) == 0.0
    only_bg = affinity_labels(torch.zeros(1, 2, 2, dtype=torch.long), radius=8)
    out = affinity_loss(torch.ones(1, 4, 4), only_bg, split_positives=True)
    assert float(out) == 0.0 and torch.isfinite(out)


def test_downsample_label_nearest() -> None:
    label = torch.arange(16).view(1, 4, 4)
    assert downsample_label(label, (2, 2)).tolist() == [[[0, 2], [8, 10]]]
    big = torch.tensor([[[0, 0, 1, 1], [0, 255, 1, 1]]])
    assert downsample_label(big, (1, 2)).dtype == torch.long
    with pytest.raises(ValueError):
        downsample_label(torch.zeros(4, 4), (2, 2))


def test_module_downsamples_and_checks_shapes() -> None:
    g = torch.Generator().manual_seed(11)
    label = torch.randint(0, 3, (2, 32, 48), generator=g)
    pred = torch.rand(2, 6, 6, generator=g)  # 2 x 3 grid
    crit = AffinityLoss(radius=1)
    small = downsample_label(label, (2, 3))
    expected = affinity_loss(pred, affinity_labels(small, radius=1))
    torch.testing.assert_close(crit(pred, label), expected)
    with pytest.raises(ValueError):
        affinity_loss(torch.rand(2, 5, 5), affinity_labels(small, radius=1))
    with pytest.raises(ValueError):
        crit(torch.rand(2, 7, 7), label)
    assert isinstance(affinity_labels(small), AffinityLabels)


# --- AFA's propagte_aff_cam_with_bkg (utils/camutils.py), re-derived per image on identical inputs --------


def _afa_mask_by_radius(h: int, w: int, radius: int) -> torch.Tensor:
    mask = torch.zeros(h * w, h * w)
    for i in range(h * w):
        y, x = divmod(i, w)
        for y2 in range(max(0, y - radius), min(h, y + radius + 1)):
            for x2 in range(max(0, x - radius), min(w, x + radius + 1)):
                mask[i, y2 * w + x2] = 1
                mask[y2 * w + x2, i] = 1
    return mask


def _afa_propagate(cams, aff, mask, cls_labels, bkg_score):  # type: ignore[no-untyped-def]
    b, _, h, w = cams.shape
    cams_with_bkg = torch.cat((torch.ones(b, 1, h, w) * bkg_score, cams), dim=1)
    cls_labels = torch.cat((torch.ones(b, 1), cls_labels), dim=1)
    cams_rw = torch.zeros_like(cams_with_bkg)
    c = cams_with_bkg.shape[1]
    aff = aff.clone()
    for i in range(b):
        aff[i, mask == 0] = 0
    aff = aff**2
    aff = aff / (torch.sum(aff, dim=1, keepdim=True) + 1e-1)
    for i in range(b):
        _cams = cams_with_bkg[i].reshape(c, -1)
        valid_key = torch.nonzero(cls_labels[i, ...])[:, 0]
        _cams = F.softmax(_cams[valid_key, ...], dim=0)
        cams_rw[i, valid_key, :] = torch.matmul(_cams, aff[i]).reshape(-1, h, w)
    return cams_rw


@pytest.mark.parametrize(("h", "w", "radius"), [(6, 6, 2), (5, 7, 8), (4, 4, 1)])
def test_propagation_equals_afa_propagte_aff_cam_with_bkg(h: int, w: int, radius: int) -> None:
    from ecaseg.affinity import propagate_with_background

    gen = torch.Generator().manual_seed(h * w + radius)
    b, c = 3, 4
    cams = torch.rand(b, c, h, w, generator=gen)
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    cams = cams * labels[:, :, None, None]
    raw = torch.rand(b, h * w, h * w, generator=gen)
    aff = torch.sigmoid(raw + raw.transpose(1, 2))  # AFA's prediction is symmetric
    mask = _afa_mask_by_radius(h, w, radius)
    for bkg in (0.35, 0.55):
        ours = propagate_with_background(cams, aff, labels, bg_score=bkg, radius=radius)
        ref = _afa_propagate(cams, aff, mask, labels, bkg)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
