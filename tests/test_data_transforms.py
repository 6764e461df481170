"""Training/evaluation transforms and (de)normalisation of ecaseg.data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ecaseg.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    denormalize,
    normalize,
    normalize_crops,
    normalize_image,
    worker_init,
)


def coord_image(h: int, w: int) -> np.ndarray:
    """R = row, G = column, B = 7: every pixel identifies its source position (h, w <= 255)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(h)[:, None]
    img[..., 1] = np.arange(w)[None, :]
    img[..., 2] = 7
    return img


def reference_normalise(img: np.ndarray) -> np.ndarray:
    out = np.zeros((3, *img.shape[:2]), np.float64)
    for c in range(3):
        out[c] = (img[..., c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
    return out


def decode(image: torch.Tensor) -> np.ndarray:
    """Back to uint8 HWC (exact for unresized content)."""
    return np.rint(denormalize(image).permute(1, 2, 0).numpy() * 255).astype(np.int64)


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    crop=st.integers(4, 24),
    scale=st.floats(0.5, 2.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_train_transform_crop_padding_and_box(h: int, w: int, crop: int, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[..., 2] = 255  # never the mean colour, so content is never exactly 0 after normalisation
    mask = rng.integers(0, 21, (h, w), dtype=np.uint8)
    t = TrainTransform(crop_size=crop, resize_long=None, scale_range=(scale, scale))
    torch.manual_seed(seed)
    out = t(image, mask)
    assert out["image"].shape == (3, crop, crop) and out["image"].dtype == torch.float32
    assert out["mask"].shape == (crop, crop) and out["mask"].dtype == torch.long
    y0, y1, x0, x1 = out["crop_box"].tolist()
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    assert (y1 - y0, x1 - x0) == (min(sh, crop), min(sw, crop))
    assert 0 <= y0 <= y1 <= crop and 0 <= x0 <= x1 <= crop
    inside = torch.zeros(crop, crop, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert (out["mask"][~inside] == 255).all() and (out["mask"][inside] < 21).all()
    assert (out["image"][:, ~inside] == 0).all()
    assert (out["image"][2, inside] != 0).all()
    # nearest-neighbour mask resizing never invents values
    assert set(out["mask"][inside].unique().tolist()) <= set(np.unique(mask).tolist())


def test_train_transform_content_is_a_window_or_its_mirror() -> None:
    img = coord_image(30, 40)
    t = TrainTransform(crop_size=16, resize_long=None, scale_range=None, hflip=True)
    flips, starts = set(), set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = t(img, None)
        assert "mask" not in out and out["crop_box"].tolist() == [0, 16, 0, 16]
        px = decode(out["image"])
        rows, cols = px[..., 0], px[..., 1]
        assert (px[..., 2] == 7).all()
        r0 = rows[0, 0]
        np.testing.assert_array_equal(rows, r0 + np.arange(16)[:, None].repeat(16, 1))
        step = cols[0, 1] - cols[0, 0]
        assert step in (1, -1)
        flips.add(int(step))
        np.testing.assert_array_equal(cols, cols[0, 0] + step * np.arange(16)[None, :].repeat(16, 0))
        assert 0 <= cols.min() and cols.max() < 40 and 0 <= r0 and r0 + 15 < 30
        starts.add((int(r0), int(cols.min())))
    assert flips == {1, -1}  # both orientations occur
    assert len({r for r, _ in starts}) > 3 and len({c for _, c in starts}) > 3  # random windows


def test_train_transform_padding_places_whole_image() -> None:
    img = coord_image(5, 9)
    t = TrainTransform(crop_size=12, resize_long=None, scale_range=None, hflip=False)
    torch.manual_seed(3)
    out = t(img, np.full((5, 9), 4, np.uint8))
    y0, y1, x0, x1 = out["crop_box"].tolist()
    np.testing.assert_allclose(out["image"][:, y0:y1, x0:x1].numpy(), reference_normalise(img), atol=1e-5)
    assert (out["mask"][y0:y1, x0:x1] == 4).all() and (out["mask"] == 4).sum() == 45
    # the image is placed at a uniformly random offset inside the crop
    offsets = {tuple(t(img)["crop_box"][[0, 2]].tolist()) for _ in range(30)}
    assert len({o[0] for o in offsets}) > 3 and len({o[1] for o in offsets}) > 2
    assert all(0 <= y <= 7 and 0 <= x <= 3 for y, x in offsets)


def test_train_transform_resize_long_and_scale() -> None:
    img = np.full((20, 10, 3), 200, np.uint8)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = TrainTransform(crop_size=64, resize_long=(24, 30), scale_range=None)(img)
        y0, y1, x0, x1 = out["crop_box"].tolist()
        assert 24 <= y1 - y0 <= 30 and abs((x1 - x0) - (y1 - y0) / 2) <= 1
        seen.add(y1 - y0)
    assert len(seen) > 3
    out = TrainTransform(crop_size=64, resize_long=(30, 30), scale_range=(0.5, 0.5))(img)
    y0, y1, x0, x1 = out["crop_box"].tolist()
    assert (y1 - y0, x1 - x0) == (15, 8)


def test_train_transform_deterministic_under_seed_and_generator() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    mask = rng.integers(0, 21, (50, 70), dtype=np.uint8)
    t = TrainTransform(crop_size=32, resize_long=(40, 120))
    torch.manual_seed(11)
    a = t(img, mask)
    torch.manual_seed(11)
    b = t(img, mask)
    for key in ("image", "mask", "crop_box"):
        assert torch.equal(a[key], b[key])
    c = t(img, mask, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a["image"], c["image"])  # same stream as the global RNG seeded alike
    outs = [t(img, mask)["image"] for _ in range(3)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_train_transform_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        TrainTransform(crop_size=8)(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="mask shape"):
        TrainTransform(crop_size=8)(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError):
        TrainTransform(scale_range=(2.0, 1.0))


def test_eval_transform() -> None:
    img = coord_image(6, 9)
    mask = np.arange(54, dtype=np.uint8).reshape(6, 9) % 21
    out = EvalTransform()(img, mask)
    np.testing.assert_allclose(out["image"].numpy(), reference_normalise(img), atol=1e-5)
    assert torch.equal(out["mask"], torch.from_numpy(mask.astype(np.int64)))
    out = EvalTransform(resize_long=18)(img, mask)
    assert out["image"].shape == (3, 12, 18) and out["mask"].shape == (12, 18)
    assert out["orig_hw"].tolist() == [6, 9]
    assert set(out["mask"].unique().tolist()) <= set(np.unique(mask).tolist())
    assert "mask" not in EvalTransform()(img)


def test_normalize_denormalize() -> None:
    x = torch.rand(2, 3, 5, 4, dtype=torch.float64)
    y = normalize(x)
    assert y.dtype == torch.float64
    ref = (x - torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD, dtype=torch.float64
    ).view(3, 1, 1)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(denormalize(y), x)
    assert denormalize(torch.full((1, 3, 1, 1), 100.0)).max() == 1.0  # clamped
    assert denormalize(y.bfloat16()).dtype == torch.bfloat16
    img = np.random.default_rng(1).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    np.testing.assert_allclose(normalize_image(img).numpy(), reference_normalise(img), atol=1e-5)
    with pytest.raises(ValueError):
        denormalize(torch.zeros(2, 4, 3, 3))


@pytest.mark.parametrize("size", [(37, 50), (80, 120), (300, 20)])
def test_uint8_crops_normalised_on_the_device_equal_the_float_path(size: tuple[int, int]) -> None:
    """TrainTransform(uint8=True) + normalize_crops gives bitwise the float path's batch (padding too)."""
    h, w = size
    rng = np.random.default_rng(h)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(3)]
    common = {"crop_size": 64, "resize_long": (40, 90), "scale_range": (0.5, 1.5)}
    floats, crops, boxes = [], [], []
    for i, image in enumerate(images):
        a = TrainTransform(**common)(image, generator=torch.Generator().manual_seed(i))
        b = TrainTransform(**common, uint8=True)(image, generator=torch.Generator().manual_seed(i))
        assert b["image"].dtype == torch.uint8 and torch.equal(a["crop_box"], b["crop_box"])
        floats.append(a["image"])
        crops.append(b["image"])
        boxes.append(b["crop_box"])
    got = normalize_crops(torch.stack(crops), torch.stack(boxes))
    expected = torch.stack(floats)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert not torch.signbit(got[expected == 0]).any()  # the padding is +0, as in the float path
    with pytest.raises(ValueError, match="uint8"):
        normalize_crops(expected)


def test_worker_init_makes_opencv_single_threaded() -> None:
    import cv2

    before = cv2.getNumThreads()
    try:
        worker_init(0)
        assert cv2.getNumThreads() <= 1
    finally:
        cv2.setNumThreads(before)
