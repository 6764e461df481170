"""Tests for ecaseg.cam against loop-based references of Eq. (1)-(2) and the pseudo-label rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ecaseg.cam import (
    CAM,
    MultiScaleCAM,
    background_cam,
    cam_from_features,
    cam_to_label,
    crop_box_mask,
    minmax_normalize,
    multiscale_cam,
    with_background,
)


def _labels(gen: torch.Generator, b: int, c: int) -> torch.Tensor:
    """Random multi-hot labels with 1..min(3, c) positives per image."""
    labels = torch.zeros(b, c)
    for i in range(b):
        n = int(torch.randint(1, min(3, c) + 1, (1,), generator=gen))
        labels[i, torch.randperm(c, generator=gen)[:n]] = 1.0
    return labels


def _ref_minmax(m: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / max(hi - lo, eps)


def test_minmax_normalize_matches_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=gen)
    out = minmax_normalize(x)
    for b in range(2):
        for c in range(3):
            torch.testing.assert_close(out[b, c], _ref_minmax(x[b, c]))
    assert out.shape == x.shape


def test_minmax_constant_map_is_zero() -> None:
    x = torch.full((1, 2, 3), 0.7)
    assert torch.equal(minmax_normalize(x), torch.zeros_like(x))


def test_minmax_rejects_no_spatial_dims() -> None:
    with pytest.raises(ValueError, match="spatial"):
        minmax_normalize(torch.zeros(2, 3))


def test_cam_from_features_eq1_matches_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 6, 3, 4, generator=gen)
    weight = torch.randn(5, 6, generator=gen)
    out = cam_from_features(feats, weight)
    for b in range(2):
        for c in range(5):
            raw = torch.zeros(3, 4)
            for d in range(6):
                raw += weight[c, d] * feats[b, d]
            torch.testing.assert_close(out[b, c], _ref_minmax(torch.relu(raw)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cam_from_features(feats, weight.view(5, 6, 1, 1)), out)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_cam_from_features_bad_weight() -> None:
    with pytest.raises(ValueError, match="weight"):
        cam_from_features(torch.zeros(1, 4, 2, 2), torch.zeros(3, 5))


def test_background_cam_eq2_matches_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    cams = torch.rand(2, 4, 3, 3, generator=gen)
    bg = background_cam(cams)
    assert bg.shape == (2, 1, 3, 3)
    for b in range(2):
        for y in range(3):
            for x in range(3):
                assert bg[b, 0, y, x] == pytest.approx(1.0 - max(float(cams[b, c, y, x]) for c in range(4)))
    full = with_background(cams)
    assert full.shape == (2, 5, 3, 3)
    torch.testing.assert_close(full[:, 1:], cams)
    torch.testing.assert_close(full[:, :1], bg)


class _FakeNet(torch.nn.Module):
    """forward_cam = ReLU(1x1 conv) of a stride-4 average pool: a tiny deterministic 'network'."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.weight = torch.nn.Parameter(torch.randn(num_classes, 3, generator=gen))

    def forward_cam(self, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        pooled = F.avg_pool2d(x, 4, ceil_mode=True)
        raw = torch.einsum("bdhw,cd->bchw", pooled, self.weight)
        return torch.relu(raw) if relu else raw


def _ref_multiscale(
    net: _FakeNet, images: torch.Tensor, labels: torch.Tensor, scales: tuple[float, ...], flip: bool, out_size
) -> torch.Tensor:
    total = None
    h, w = images.shape[-2:]
    with torch.no_grad():
        for s in scales:
            x = F.interpolate(images, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)
            cams = [net.forward_cam(x)]
            if flip:
                cams.append(net.forward_cam(x.flip(-1)).flip(-1))
            for cam in cams:
                if out_size is None:
                    out_size = cam.shape[-2:]
                cam = F.interpolate(cam, size=tuple(out_size), mode="bilinear", align_corners=False)
                total = cam if total is None else total + cam
    assert total is not None
    out = torch.zeros_like(total)
    for b in range(total.shape[0]):
        for c in range(total.shape[1]):
            if labels[b, c] > 0:
                out[b, c] = _ref_minmax(total[b, c])
    return out


@pytest.mark.parametrize(
    ("scales", "flip", "out_size"),
    [
        ((1.0, 0.5, 1.5), True, None),
        ((1.0,), False, None),
        ((0.5, 1.0), True, (5, 6)),
        ((1.5, 0.75), False, None),
    ],
)
def test_multiscale_cam_matches_loop(scales: tuple[float, ...], flip: bool, out_size) -> None:
    gen = torch.Generator().manual_seed(4)
    net = _FakeNet()
    images = torch.randn(2, 3, 16, 20, generator=gen)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = multiscale_cam(net, images, labels, scales=scales, flip=flip, out_size=out_size)
    # with 1.0 absent the first scale sets the output size
    ref = _ref_multiscale(net, images, labels, scales, flip, out_size)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not out.requires_grad
    assert torch.all(out[0, 1] == 0) and torch.all(out[1, 0] == 0)
    module_out = MultiScaleCAM(scales, flip, out_size)(net, images, labels)
    torch.testing.assert_close(module_out, out)


def test_multiscale_default_size_is_scale_one() -> None:
    net = _FakeNet()
    out = multiscale_cam(net, torch.randn(1, 3, 16, 16), torch.ones(1, 3), scales=(0.5, 1.0))
    assert out.shape == (1, 3, 4, 4)


def test_cam_module_zeroes_absent_classes() -> None:
    gen = torch.Generator().manual_seed(5)
    feats, weight = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(3, 4, generator=gen)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = CAM()(feats, weight, labels)
    torch.testing.assert_close(out, cam_from_features(feats, weight) * labels[:, :, None, None])


def _ref_cam_to_label(cams, labels, alpha, band, crop_box, ignore_index=255):
    b_, c_, h_, w_ = cams.shape
    out = torch.zeros(b_, h_, w_, dtype=torch.long)
    for b in range(b_):
        for y in range(h_):
            for x in range(w_):
                best, best_c = -1.0, 0
                for c in range(c_):
                    if labels[b, c] > 0 and float(cams[b, c, y, x]) > best:
                        best, best_c = float(cams[b, c, y, x]), c + 1
                if band is None:
                    lab = 0 if best <= alpha else best_c
                else:
                    lab = 0 if best <= band[0] else (ignore_index if best <= band[1] else best_c)
                if crop_box is not None:
                    y0, y1, x0, x1 = (int(v) for v in crop_box[b])
                    if not (y0 <= y < y1 and x0 <= x < x1):
                        lab = ignore_index
                out[b, y, x] = lab
    return out


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    alpha=st.sampled_from([0.3, 0.5, 0.7]),
    use_band=st.booleans(),
    use_box=st.booleans(),
)
def test_cam_to_label_matches_loop(seed: int, alpha: float, use_band: bool, use_box: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    cams = torch.rand(2, 4, 5, 6, generator=gen)
    labels = _labels(gen, 2, 4)
    band = (0.35, 0.55) if use_band else None
    box = torch.tensor([[1, 4, 0, 5], [0, 5, 2, 6]]) if use_box else None
    out = cam_to_label(cams, labels, alpha=alpha, band=band, crop_box=box)
    assert out.dtype == torch.long
    assert torch.equal(out, _ref_cam_to_label(cams, labels, alpha, band, box))
    # absent classes are never chosen
    for b in range(2):
        chosen = set(out[b].unique().tolist()) - {0, 255}
        assert all(labels[b, c - 1] > 0 for c in chosen)


def test_cam_to_label_threshold_is_inclusive_for_background() -> None:
    cams = torch.tensor([[[[0.5, 0.51]]]])
    assert cam_to_label(cams, torch.ones(1, 1), alpha=0.5).tolist() == [[[0, 1]]]
    assert cam_to_label(cams, torch.ones(1, 1), band=(0.5, 0.505)).tolist() == [[[0, 1]]]
    assert cam_to_label(cams, torch.ones(1, 1), band=(0.4, 0.6)).tolist() == [[[255, 255]]]


def test_cam_to_label_bad_inputs() -> None:
    with pytest.raises(ValueError, match="labels"):
        cam_to_label(torch.rand(1, 3, 2, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="band"):
        cam_to_label(torch.rand(1, 3, 2, 2), torch.ones(1, 3), band=(0.6, 0.4))


def test_crop_box_mask() -> None:
    mask = crop_box_mask(torch.tensor([[1, 3, 0, 2], [0, 0, 0, 4]]), (4, 4))
    assert mask[0].nonzero().tolist() == [[1, 0], [1, 1], [2, 0], [2, 1]]
    assert not mask[1].any()


def _afa_multi_scale_cam(net: _FakeNet, inputs: torch.Tensor, scales: list[float]) -> torch.Tensor:
    """AFA's ``multi_scale_cam`` (utils/camutils.py) as it computes, step by step, on the same inputs."""
    b, _, h, w = inputs.shape
    cam_list = []
    with torch.no_grad():
        for s in [1.0] + [v for v in scales if v != 1.0]:
            x = inputs if s == 1.0 else F.interpolate(inputs, size=(int(s * h), int(s * w)), mode="bilinear",
                                                      align_corners=False)  # fmt: skip
            cam = net.forward_cam(torch.cat([x, x.flip(-1)], dim=0), relu=False)  # conv2d, no ReLU
            cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
            cam = torch.max(cam[:b, ...], cam[b:, ...].flip(-1))
            cam_list.append(F.relu(cam))
        cam = torch.sum(torch.stack(cam_list, dim=0), dim=0)
        cam = cam + F.adaptive_max_pool2d(-cam, (1, 1))
        cam /= F.adaptive_max_pool2d(cam, (1, 1)) + 1e-5
    return cam


@pytest.mark.parametrize("hw", [(32, 32), (45, 61)])
def test_afa_rule_equals_afa_multi_scale_cam_on_identical_inputs(hw: tuple[int, int]) -> None:
    net = _FakeNet(3)
    gen = torch.Generator().manual_seed(11)
    images = torch.randn(2, 3, *hw, generator=gen)
    labels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    ours = multiscale_cam(net, images, labels, scales=(1.0, 0.5, 1.5), flip=True, rule="afa")
    ref = _afa_multi_scale_cam(net, images, [1.0, 0.5, 1.5]) * labels[:, :, None, None]
    assert ours.shape == (2, 3, *hw)  # at the image size, as AFA's
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    old = multiscale_cam(net, images, labels, scales=(1.0, 0.5, 1.5), flip=True, out_size=hw)  # 0.1's rule
    assert not torch.allclose(old, ours, atol=1e-3)


def test_afa_rule_needs_the_response_before_relu() -> None:
    class OnlyRelu:
        def forward_cam(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :2, ::4, ::4].relu()

    with pytest.raises(TypeError, match="forward_cam does not take relu"):
        multiscale_cam(OnlyRelu(), torch.randn(1, 3, 16, 16), torch.ones(1, 2), rule="afa")


class _CountingNet(_FakeNet):
    def __init__(self) -> None:
        super().__init__(3)
        self.images_seen = 0

    def forward_cam(self, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        self.images_seen += x.shape[0]
        return super().forward_cam(x, relu)


@pytest.mark.parametrize("rule", ["sum", "afa"])
@pytest.mark.parametrize("flip", [True, False])
def test_reused_scale_one_cam_changes_nothing_and_saves_its_forward(rule: str, flip: bool) -> None:
    gen = torch.Generator().manual_seed(12)
    images = torch.randn(2, 3, 16, 20, generator=gen)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    net = _CountingNet()
    plain = multiscale_cam(net, images, labels, scales=(1.0, 0.5), flip=flip, rule=rule)  # type: ignore[arg-type]
    seen_plain = net.images_seen
    net.images_seen = 0
    raw = net.forward_cam(images, relu=rule != "afa")
    net.images_seen = 0
    reused = multiscale_cam(
        net,
        images,
        labels,
        scales=(1.0, 0.5),
        flip=flip,
        rule=rule,
        raw_at_one=raw,  # type: ignore[arg-type]
    )
    torch.testing.assert_close(reused, plain, rtol=0, atol=0)
    assert net.images_seen == seen_plain - 2  # the unflipped scale-1.0 batch was not run again


def test_reused_scale_one_cam_is_checked() -> None:
    images, labels = torch.randn(2, 3, 16, 16), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"1\.0 is not among scales"):
        multiscale_cam(_FakeNet(), images, labels, scales=(0.5,), raw_at_one=torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="raw_at_one must be"):
        multiscale_cam(_FakeNet(), images, labels, raw_at_one=torch.zeros(1, 3, 4, 4))
