"""Tests for ecaseg.pseudo_label: thresholds, band logic, explicit background and refinement, vs loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ecaseg.cam import cam_to_label
from ecaseg.pseudo_label import PseudoLabeler, refine_pseudo_label


def _smooth_par(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """A local fake refiner: two rounds of 3x3 averaging of the maps (images only checked for shape)."""
    assert images.shape[0] == maps.shape[0] and images.shape[-2:] == maps.shape[-2:]
    for _ in range(2):
        maps = F.avg_pool2d(F.pad(maps, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return maps


def _labels(gen: torch.Generator, b: int, c: int) -> torch.Tensor:
    labels = torch.zeros(b, c)
    for i in range(b):
        n = int(torch.randint(1, min(3, c) + 1, (1,), generator=gen))
        labels[i, torch.randperm(c, generator=gen)[:n]] = 1.0
    return labels


def _argmax_present(vec: list[float], present: list[bool]) -> int:
    best, arg = float("-inf"), 0
    for c, (v, p) in enumerate(zip(vec, present)):
        if p and v > best:
            best, arg = v, c
    return arg


def _ref(par, images, scores, labels, alpha, band, box, bg_scores, ignore_index=255):
    b_, c_ = scores.shape[:2]
    h_, w_ = images.shape[-2:]
    up = F.interpolate(scores, size=(h_, w_), mode="bilinear", align_corners=False)
    bgs = None
    if bg_scores is not None:
        bgs = F.interpolate(bg_scores, size=(h_, w_), mode="bilinear", align_corners=False)

    def build(bg_value: float | None) -> torch.Tensor:
        maps = torch.zeros(b_, c_ + 1, h_, w_)
        for b in range(b_):
            for y in range(h_):
                for x in range(w_):
                    if bg_value is None:
                        assert bgs is not None
                        maps[b, 0, y, x] = bgs[b, 0, y, x]
                    else:
                        maps[b, 0, y, x] = bg_value
                    for c in range(c_):
                        maps[b, c + 1, y, x] = up[b, c, y, x] if labels[b, c] > 0 else 0.0
        return maps if par is None else par(images, maps)

    out = torch.zeros(b_, h_, w_, dtype=torch.long)
    if band is None:
        refined = [build(None if bg_scores is not None else alpha)]
    else:
        refined = [build(band[1]), build(band[0])]
    for b in range(b_):
        present = [True] + [bool(labels[b, c] > 0) for c in range(c_)]
        for y in range(h_):
            for x in range(w_):
                labs = [_argmax_present(r[b, :, y, x].tolist(), present) for r in refined]
                if band is None:
                    lab = labs[0]
                else:
                    lab = labs[0] if labs[0] > 0 else (0 if labs[1] == 0 else ignore_index)
                if box is not None:
                    y0, y1, x0, x1 = (int(v) for v in box[b])
                    if not (y0 <= y < y1 and x0 <= x < x1):
                        lab = ignore_index
                out[b, y, x] = lab
    return out


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(["alpha", "band", "bg"]),
    use_par=st.booleans(),
    use_box=st.booleans(),
)
def test_refine_pseudo_label_matches_loop(seed: int, mode: str, use_par: bool, use_box: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    b, c = 2, 4
    images = torch.rand(b, 3, 8, 10, generator=gen)
    scores = torch.rand(b, c, 4, 5, generator=gen)
    labels = _labels(gen, b, c)
    band = (0.35, 0.55) if mode == "band" else None
    bg = torch.rand(b, 1, 4, 5, generator=gen) if mode == "bg" else None
    box = torch.tensor([[1, 7, 0, 9], [0, 8, 3, 10]]) if use_box else None
    par = _smooth_par if use_par else None
    out = refine_pseudo_label(par, images, scores, labels, alpha=0.45, band=band, crop_box=box, bg_scores=bg)
    assert out.shape == (b, 8, 10) and out.dtype == torch.long
    assert torch.equal(out, _ref(par, images, scores, labels, 0.45, band, box, bg))


@pytest.mark.parametrize("band", [None, (0.35, 0.55)])
def test_without_refiner_equals_cam_to_label(band) -> None:
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 8, 8, generator=gen)
    scores = torch.rand(2, 3, 8, 8, generator=gen)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    box = torch.tensor([[0, 6, 1, 8], [2, 8, 0, 5]])
    out = refine_pseudo_label(None, images, scores, labels, alpha=0.5, band=band, crop_box=box)
    assert torch.equal(out, cam_to_label(scores, labels, alpha=0.5, band=band, crop_box=box))


def test_absent_classes_never_chosen_even_if_refiner_boosts_them() -> None:
    def boost_absent(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        return maps + torch.tensor([0.0, 0.0, 10.0]).view(1, 3, 1, 1)

    scores = torch.full((1, 2, 2, 2), 0.9)
    out = refine_pseudo_label(boost_absent, torch.zeros(1, 3, 2, 2), scores, torch.tensor([[1.0, 0.0]]))
    assert torch.all(out == 1)


def test_explicit_background_map_and_2d_form() -> None:
    scores = torch.tensor([[[[0.6, 0.6]]]])
    bg = torch.tensor([[[0.7, 0.2]]])
    out = refine_pseudo_label(None, torch.zeros(1, 3, 1, 2), scores, torch.ones(1, 1), bg_scores=bg)
    assert out.tolist() == [[[0, 1]]]
    out4 = refine_pseudo_label(None, torch.zeros(1, 3, 1, 2), scores, torch.ones(1, 1), bg_scores=bg[:, None])
    assert torch.equal(out, out4)


def test_bad_arguments() -> None:
    images, scores, labels = torch.zeros(1, 3, 4, 4), torch.rand(1, 2, 2, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match="either band or bg_scores"):
        refine_pseudo_label(None, images, scores, labels, band=(0.3, 0.5), bg_scores=torch.rand(1, 1, 2, 2))
    with pytest.raises(ValueError, match="labels"):
        refine_pseudo_label(None, images, scores, torch.ones(1, 3))
    with pytest.raises(ValueError, match="bg_scores"):
        refine_pseudo_label(None, images, scores, labels, bg_scores=torch.rand(1, 2, 2, 2))


def test_module_matches_function() -> None:
    gen = torch.Generator().manual_seed(2)
    images, scores = torch.rand(2, 3, 6, 6, generator=gen), torch.rand(2, 3, 3, 3, generator=gen)
    labels = _labels(gen, 2, 3)
    labeler = PseudoLabeler(_smooth_par, alpha=0.4, band=(0.3, 0.5))
    expected = refine_pseudo_label(_smooth_par, images, scores, labels, alpha=0.4, band=(0.3, 0.5))
    assert torch.equal(labeler(images, scores, labels), expected)
    bg = torch.rand(2, 1, 3, 3, generator=gen)
    expected_bg = refine_pseudo_label(_smooth_par, images, scores, labels, bg_scores=bg)
    assert torch.equal(PseudoLabeler(_smooth_par)(images, scores, labels, bg_scores=bg), expected_bg)
    # one rule for both forms: band and bg_scores exclude each other (0.1 let bg_scores win silently)
    with pytest.raises(ValueError, match="either band or bg_scores"):
        labeler(images, scores, labels, bg_scores=bg)


# --- AFA's refine_cams_with_bkg_v2 (utils/camutils.py): softmax over [background, labelled CAMs] first ------


def _afa_refine_cams_with_bkg_v2(par, images, cams, cls_labels, high, low, img_box, ignore=255):  # type: ignore[no-untyped-def]
    """What AFA's function computes, written out per image as it does (same PAR module on both sides)."""
    b, _, h, w = images.shape
    small_images = F.interpolate(images, size=[h // 2, w // 2], mode="bilinear", align_corners=False)
    with_bg = torch.cat([torch.ones(b, 1), cls_labels], dim=1)
    per_threshold = []
    for t in (high, low):
        cams_bkg = torch.cat([torch.full((b, 1, h, w), t), cams], dim=1)
        small = F.interpolate(cams_bkg, size=[h // 2, w // 2], mode="bilinear", align_corners=False)
        label = torch.full((b, h, w), float(ignore))
        for idx, (y0, y1, x0, x1) in enumerate(img_box.tolist()):
            valid_key = torch.nonzero(with_bg[idx])[:, 0]
            valid = small[idx, valid_key].unsqueeze(0).softmax(dim=1)
            refined = F.interpolate(
                par(small_images[[idx]], valid), size=(h, w), mode="bilinear", align_corners=False
            )
            full = valid_key[refined.argmax(dim=1)]
            label[idx, y0:y1, x0:x1] = full[0, y0:y1, x0:x1].float()
        per_threshold.append(label)
    label_h, label_l = per_threshold
    out = label_h.clone()
    out[label_h == 0] = ignore
    out[(label_h + label_l) == 0] = 0
    return out.long()


def test_softmax_refinement_equals_afa_refine_cams_with_bkg_v2() -> None:
    from ecaseg.par import PAR

    gen = torch.Generator().manual_seed(8)
    b, c, h, w = 3, 4, 24, 32
    images = torch.rand(b, 3, h, w, generator=gen)
    cams = torch.rand(b, c, h, w, generator=gen)
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    cams = cams * labels[:, :, None, None]
    box = torch.tensor([[0, 24, 0, 32], [2, 20, 4, 30], [0, 16, 0, 32]])
    par = PAR(dilations=(1, 2), num_iter=3)
    small = F.interpolate(images, size=(h // 2, w // 2), mode="bilinear", align_corners=False)
    ours = refine_pseudo_label(
        par, small, cams, labels, band=(0.35, 0.55), crop_box=box, softmax=True, out_size=(h, w)
    )
    ref = _afa_refine_cams_with_bkg_v2(par, images, cams, labels, 0.55, 0.35, box)
    assert torch.equal(ours, ref)
    scores_only = refine_pseudo_label(
        par, small, cams, labels, band=(0.35, 0.55), crop_box=box, out_size=(h, w)
    )
    assert not torch.equal(scores_only, ref)  # 0.1's path (no softmax) differs
