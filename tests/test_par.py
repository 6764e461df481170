"""Tests of ecaseg.par against a pixel-loop reference of PAR."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ecaseg.par import PAR, par_refine

RING = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _softmax(x: list[float]) -> list[float]:
    mx = max(x)
    e = [math.exp(v - mx) for v in x]
    s = sum(e)
    return [v / s for v in e]


def _std(x: list[float]) -> float:  # unbiased
    mean = sum(x) / len(x)
    return math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1))


def _slow_par(img: np.ndarray, mask: np.ndarray, dilations, num_iter, w1, w2) -> np.ndarray:
    """img [3, H, W], mask [K, H, W], one image, plain loops; borders = clamped coordinates."""
    _, h, w = img.shape
    offs = [(dy * d, dx * d) for d in dilations for dy, dx in RING]
    dists = [math.hypot(dy, dx) for dy, dx in offs]
    sd = _std(dists)
    pos = _softmax([-((v / (sd + 1e-8) / w1) ** 2) for v in dists])

    def nb(y: int, x: int, dy: int, dx: int) -> tuple[int, int]:
        return min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)

    kernel = np.zeros((h, w, len(offs)))
    for y in range(h):
        for x in range(w):
            logits = [0.0] * len(offs)
            for c in range(3):
                vals = [img[(c, *nb(y, x, dy, dx))] for dy, dx in offs]
                s = _std(vals)
                for p, v in enumerate(vals):
                    logits[p] += -((abs(v - img[c, y, x]) / (s + 1e-8) / w1) ** 2) / 3.0
            rgb = _softmax(logits)
            for p in range(len(offs)):
                kernel[y, x, p] = (rgb[p] + w2 * pos[p]) / (1.0 + w2)
    m = mask.astype(np.float64)
    for _ in range(num_iter):
        new = np.zeros_like(m)
        for y in range(h):
            for x in range(w):
                for p, (dy, dx) in enumerate(offs):
                    ny, nx = nb(y, x, dy, dx)
                    new[:, y, x] += kernel[y, x, p] * m[:, ny, nx]
        m = new
    return m


def test_par_matches_loop_reference() -> None:
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, 6, 7, generator=g)
    masks = torch.rand(2, 3, 6, 7, generator=g)
    out = par_refine(imgs, masks, dilations=(1, 2), num_iter=2, w1=0.3, w2=0.01)
    for b in range(2):
        ref = _slow_par(imgs[b].double().numpy(), masks[b].numpy(), (1, 2), 2, 0.3, 0.01)
        np.testing.assert_allclose(out[b].numpy(), ref, rtol=1e-4, atol=1e-5)


def test_par_other_weights_match_reference() -> None:
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(1, 3, 5, 6, generator=g)
    masks = torch.rand(1, 2, 5, 6, generator=g)
    out = par_refine(imgs, masks, dilations=(3,), num_iter=1, w1=0.5, w2=0.2)
    ref = _slow_par(imgs[0].double().numpy(), masks[0].numpy(), (3,), 1, 0.5, 0.2)
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=1e-4, atol=1e-5)


def test_constant_map_stays_constant() -> None:
    imgs = torch.rand(2, 3, 20, 24)
    masks = torch.full((2, 4, 20, 24), 0.37)
    out = par_refine(imgs, masks)  # default dilations up to 24 > image size
    torch.testing.assert_close(out, masks, rtol=1e-5, atol=1e-6)


def test_convex_hull_preserved() -> None:
    g = torch.Generator().manual_seed(2)
    imgs = torch.rand(2, 3, 16, 16, generator=g)
    masks = torch.rand(2, 3, 16, 16, generator=g) * 4 - 1
    out = par_refine(imgs, masks)
    lo = masks.amin(dim=(2, 3), keepdim=True)
    hi = masks.amax(dim=(2, 3), keepdim=True)
    assert bool((out >= lo - 1e-5).all()) and bool((out <= hi + 1e-5).all())
    # and it actually changed something (smoothing shrinks the range)
    assert float((out - masks).abs().max()) > 1e-2


def test_refinement_follows_image_edges() -> None:
    # two colour halves; a noisy score map gets cleaned up along the colour edge
    imgs = torch.zeros(1, 3, 12, 12)
    imgs[..., 6:] = 1.0
    truth = torch.zeros(12, 12)
    truth[:, 6:] = 1.0
    g = torch.Generator().manual_seed(3)
    noisy = truth + 0.8 * (torch.rand(12, 12, generator=g) - 0.5)
    masks = torch.stack([1 - noisy, noisy])[None]
    out = par_refine(imgs, masks, dilations=(1, 2), num_iter=10)
    before = float(((masks[0, 1] - truth).abs()).mean())
    after = float(((out[0, 1] - truth).abs()).mean())
    assert after < 0.5 * before


def test_invariant_to_per_channel_affine_colour_map() -> None:
    g = torch.Generator().manual_seed(4)
    imgs = torch.rand(1, 3, 9, 9, generator=g)
    masks = torch.rand(1, 2, 9, 9, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    a = par_refine(imgs, masks, dilations=(1, 2), num_iter=3)
    b = par_refine((imgs - mean) / std, masks, dilations=(1, 2), num_iter=3)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_resizes_masks_and_keeps_dtype() -> None:
    imgs = torch.rand(1, 3, 8, 10)
    masks = torch.rand(1, 2, 4, 5).to(torch.bfloat16)
    out = PAR(dilations=(1,), num_iter=1)(imgs, masks)
    assert out.shape == (1, 2, 8, 10) and out.dtype == torch.bfloat16


def test_module_matches_function_and_bad_shapes() -> None:
    imgs = torch.rand(2, 3, 7, 7)
    masks = torch.rand(2, 3, 7, 7)
    mod = PAR(dilations=(1, 3), num_iter=2, w1=0.4, w2=0.05)
    torch.testing.assert_close(mod(imgs, masks), par_refine(imgs, masks, (1, 3), 2, 0.4, 0.05))
    assert "dilations=(1, 3)" in repr(mod)
    with pytest.raises(ValueError, match="images"):
        par_refine(torch.rand(2, 1, 7, 7), masks)
    with pytest.raises(ValueError, match="masks"):
        par_refine(imgs, torch.rand(3, 3, 7, 7))
    with pytest.raises(ValueError, match="dilations"):
        par_refine(imgs, masks, dilations=(0,))


def _par_stacked_0_1(images: torch.Tensor, masks: torch.Tensor, dilations, num_iter, w1, w2) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """ecaseg 0.1's propagation: 8 shifted copies per dilation stacked, multiplied and summed."""
    import torch.nn.functional as F

    from ecaseg.par import _RING, _par_kernel, _shifted

    maps = masks.float()
    h, w = images.shape[-2:]
    kernel = _par_kernel(images.float(), dilations, w1, w2)
    pad = max(dilations)
    for _ in range(num_iter):
        padded = F.pad(maps, [pad] * 4, mode="replicate")
        new = torch.zeros_like(maps)
        for i, d in enumerate(dilations):
            neigh = _shifted(padded, pad, [(dy * d, dx * d) for dy, dx in _RING], h, w)
            new = new + (neigh * kernel[:, None, 8 * i : 8 * (i + 1)]).sum(dim=2)
        maps = new
    return maps


def test_in_place_accumulation_equals_the_stacked_propagation() -> None:
    from ecaseg.par import par_refine

    gen = torch.Generator().manual_seed(12)
    images = torch.rand(2, 3, 40, 52, generator=gen)
    masks = torch.rand(2, 21, 40, 52, generator=gen)
    ours = par_refine(images, masks, dilations=(1, 2, 4, 8, 12, 24), num_iter=10)
    ref = _par_stacked_0_1(images, masks, (1, 2, 4, 8, 12, 24), 10, 0.3, 0.01)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
