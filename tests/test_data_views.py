"""CCE local views: view_sampling_grid geometry, LocalViewSampler crops/flips/jitter."""

from __future__ import annotations

import colorsys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ecaseg.data import LocalViews, LocalViewSampler, adjust_hue, denormalize, normalize, view_sampling_grid


def loop_cell_centres(geometry: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Independent reference: global pixel coordinates (y, x) of each view cell's centre, [B, V, h, w, 2].

    Cell (i, j) of the view spans rows [y0 + i * bh / h, y0 + (i + 1) * bh / h); in a flipped view, column j
    shows the box's column w - 1 - j. The centre is the midpoint of the spanned interval.
    """
    b, v = geometry.shape[:2]
    h, w = out_hw
    out = torch.zeros(b, v, h, w, 2, dtype=torch.float64)
    for bi in range(b):
        for vi in range(v):
            y0, x0, bh, bw, flipped = geometry[bi, vi].tolist()
            for i in range(h):
                for j in range(w):
                    col = (w - 1 - j) if flipped else j
                    top, bottom = y0 + i * bh / h, y0 + (i + 1) * bh / h
                    left, right = x0 + col * bw / w, x0 + (col + 1) * bw / w
                    out[bi, vi, i, j] = torch.tensor([(top + bottom) / 2, (left + right) / 2])
    return out


@settings(max_examples=25, deadline=None)
@given(
    big_h=st.integers(4, 30),
    big_w=st.integers(4, 30),
    out_h=st.integers(1, 5),
    out_w=st.integers(1, 5),
    data=st.data(),
)
def test_view_sampling_grid_matches_loop(big_h: int, big_w: int, out_h: int, out_w: int, data) -> None:
    rows = []
    for _ in range(3):
        bh = data.draw(st.floats(1.0, float(big_h)))
        bw = data.draw(st.floats(1.0, float(big_w)))
        y0 = data.draw(st.floats(0.0, big_h - bh))
        x0 = data.draw(st.floats(0.0, big_w - bw))
        rows.append([y0, x0, bh, bw, float(data.draw(st.booleans()))])
    geometry = torch.tensor(rows, dtype=torch.float64).view(1, 3, 5)
    grid = view_sampling_grid(geometry, (out_h, out_w), (big_h, big_w))
    assert grid.shape == (1, 3, out_h, out_w, 2)
    ref = loop_cell_centres(geometry, (out_h, out_w))
    # align_corners=False: normalised = 2 * pixel_coordinate / size - 1
    torch.testing.assert_close(grid[..., 0], 2 * ref[..., 1] / big_w - 1)
    torch.testing.assert_close(grid[..., 1], 2 * ref[..., 0] / big_h - 1)


@pytest.mark.parametrize("flipped", [0.0, 1.0])
def test_grid_samples_global_coordinate_map_back_to_cell_centres(flipped: float) -> None:
    big_h, big_w = 20, 24
    ys, xs = torch.meshgrid(torch.arange(big_h) + 0.5, torch.arange(big_w) + 0.5, indexing="ij")
    coord_map = torch.stack([ys, xs]).double()[None]  # [1, 2, H, W]: centre of each pixel
    geometry = torch.tensor(
        [[[2.0, 3.0, 12.0, 8.0, flipped], [0.0, 16.0, 20.0, 8.0, flipped]]], dtype=torch.float64
    )
    out_hw = (4, 2)  # cells of 3x4 and 5x4 global pixels: centres stay >= 0.5 px from the image border
    grid = view_sampling_grid(geometry, out_hw, (big_h, big_w))
    sampled = F.grid_sample(coord_map, grid.reshape(1, 8, 2, 2), mode="bilinear", align_corners=False)
    sampled = sampled.view(2, 2, 4, 2).permute(1, 2, 3, 0)  # [V, h, w, (y, x)]
    torch.testing.assert_close(sampled, loop_cell_centres(geometry, out_hw)[0])
    if flipped:
        assert sampled[0, 0, 0, 1] > sampled[0, 0, 1, 1]  # x decreases along a flipped view's row


def test_view_sampling_grid_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="geometry"):
        view_sampling_grid(torch.zeros(2, 4), (2, 2), (4, 4))
    assert (
        view_sampling_grid(torch.zeros(1, 1, 5, dtype=torch.bfloat16), (1, 1), (4, 4)).dtype == torch.float32
    )


def test_sampler_views_equal_crops_without_jitter() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 20, 17, generator=gen)
    labels = torch.randint(0, 21, (3, 1, 20, 17), generator=gen).float()
    sampler = LocalViewSampler(num_views=4, size=8, jitter_p=0.0)
    views = sampler(images, generator=torch.Generator().manual_seed(1))
    assert isinstance(views, LocalViews) and views.num_views == 4
    assert views.images.shape == (3, 4, 3, 8, 8) and views.geometry.shape == (3, 4, 5)
    geo = views.geometry
    assert geo.dtype == torch.float32
    assert torch.equal(geo, geo.round()) and (geo[..., 2:4] == 8).all()
    assert ((geo[..., 0] >= 0) & (geo[..., 0] <= 12) & (geo[..., 1] >= 0) & (geo[..., 1] <= 9)).all()
    assert set(geo[..., 4].unique().tolist()) == {0.0, 1.0}
    grid = view_sampling_grid(geo, (8, 8), (20, 17))
    for b in range(3):
        for v in range(4):
            y0, x0, _, _, flipped = (int(t) for t in geo[b, v].tolist())
            crop = images[b, :, y0 : y0 + 8, x0 : x0 + 8]
            label_crop = labels[b, :, y0 : y0 + 8, x0 : x0 + 8]
            if flipped:
                crop, label_crop = crop.flip(-1), label_crop.flip(-1)
            torch.testing.assert_close(views.images[b, v], crop, atol=1e-5, rtol=0)
            # the same grid maps the global pseudo-label onto the view (nearest)
            lab = F.grid_sample(labels[b : b + 1], grid[b, v][None], mode="nearest", align_corners=False)
            assert torch.equal(lab[0], label_crop)


def test_sampler_scale_valid_box_and_determinism() -> None:
    images = torch.randn(4, 3, 32, 40)
    sampler = LocalViewSampler(num_views=3, size=8, scale=(0.5, 2.0))
    a = sampler(images, generator=torch.Generator().manual_seed(5))
    b = sampler(images, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.images, b.images) and torch.equal(a.geometry, b.geometry)
    side = a.geometry[..., 2]
    assert ((side >= 4) & (side <= 16)).all() and torch.equal(a.geometry[..., 2], a.geometry[..., 3])
    assert ((a.geometry[..., 0] + side <= 32) & (a.geometry[..., 1] + side <= 40)).all()
    valid = torch.tensor([[0, 32, 0, 40], [10, 30, 5, 25], [0, 12, 20, 40], [3, 9, 3, 9]])
    sampler = LocalViewSampler(num_views=5, size=8)
    for seed in range(4):
        geo = sampler(images, generator=torch.Generator().manual_seed(seed), valid_box=valid).geometry
        y0, x0 = geo[..., 0], geo[..., 1]
        inside = (
            (y0 >= valid[:, :1])
            & (y0 + 8 <= valid[:, 1:2])
            & (x0 >= valid[:, 2:3])
            & (x0 + 8 <= valid[:, 3:4])
        )
        assert inside[:3].all()
        # a valid box smaller than the view: the view covers it
        cover = (y0 <= 3) & (y0 + 8 >= 9) & (x0 <= 3) & (x0 + 8 >= 9)
        assert cover[3].all()


def test_sampler_small_image_clamps_box() -> None:
    views = LocalViewSampler(num_views=2, size=8, jitter_p=0.0)(torch.randn(1, 3, 5, 12))
    assert (views.geometry[..., 2] == 5).all() and (views.geometry[..., 3] == 8).all()
    assert views.images.shape == (1, 2, 3, 8, 8)


def test_sampler_brightness_jitter_is_per_view_scaling() -> None:
    gen = torch.Generator().manual_seed(2)
    images = normalize(0.2 + 0.5 * torch.rand(2, 3, 16, 16, generator=gen))  # unclamped after x1.4
    plain = LocalViewSampler(num_views=3, size=8, jitter_p=0.0)
    bright = LocalViewSampler(
        num_views=3, size=8, brightness=0.4, contrast=0, saturation=0, hue=0, jitter_p=1.0
    )
    ref = denormalize(plain(images, generator=torch.Generator().manual_seed(9)).images)
    out = denormalize(bright(images, generator=torch.Generator().manual_seed(9)).images)
    ratio = out / ref
    per_view = ratio.flatten(2)
    torch.testing.assert_close(per_view, per_view[..., :1].expand_as(per_view), atol=1e-4, rtol=1e-4)
    assert ((per_view >= 0.6 - 1e-4) & (per_view <= 1.4 + 1e-4)).all()
    assert per_view[..., 0].std() > 0.01  # factors differ between views
    full = LocalViewSampler(num_views=3, size=8)(images.bfloat16())
    assert full.images.dtype == torch.bfloat16 and torch.isfinite(full.images.float()).all()


def test_adjust_hue_matches_colorsys() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(6, 3, 2, 3, generator=gen, dtype=torch.float64)
    x[0, :, 0, 0] = 0.5  # gray pixel: hue undefined, must stay gray
    shift = torch.rand(6, 1, 1, 1, generator=gen, dtype=torch.float64) - 0.5
    out = adjust_hue(x, shift)
    for n in range(6):
        for i in range(2):
            for j in range(3):
                h, s, v = colorsys.rgb_to_hsv(*x[n, :, i, j].tolist())
                expected = colorsys.hsv_to_rgb((h + shift[n].item()) % 1.0, s, v)
                torch.testing.assert_close(out[n, :, i, j], torch.tensor(expected, dtype=torch.float64))


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        LocalViewSampler(hue=0.7)
    with pytest.raises(ValueError, match="images"):
        LocalViewSampler()(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="valid_box"):
        LocalViewSampler(size=4)(torch.zeros(2, 3, 8, 8), valid_box=torch.zeros(3, 4))
    assert list(LocalViewSampler().parameters()) == []
