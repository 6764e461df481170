"""Tests of ecaseg.crf on tiny synthetic images: both backends, the lattice against the exact Gaussian filter,
the torch backend against pydensecrf."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ecaseg.crf as crf_module
from ecaseg.crf import (
    CRFParams,
    DenseCRF,
    crf_batch,
    dense_crf,
    dense_crf_torch,
    permutohedral_filter,
    pydensecrf_available,
    resolve_crf_backend,
)
from ecaseg.errors import ConfigError, MissingDependencyError

needs_pydensecrf = pytest.mark.skipif(not pydensecrf_available(), reason="pydensecrf is not installed")


def _scene(seed: int, size: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left half red, right half blue; class probabilities with 30% of the pixels wrong."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.uint8)
    img[:, : size // 2] = (220, 30, 30)
    img[:, size // 2 :] = (30, 30, 220)
    truth = np.zeros((size, size), np.int64)
    truth[:, size // 2 :] = 1
    p1 = np.where(truth == 1, 0.65, 0.35)
    flip = rng.random((size, size)) < 0.3
    p1 = np.where(flip, 1.0 - p1, p1)
    probs = np.stack([1.0 - p1, p1]).astype(np.float32)
    return img, probs, truth


@pytest.mark.parametrize("backend", ["torch", pytest.param("pydensecrf", marks=needs_pydensecrf)])
def test_crf_follows_colour_regions(backend: str) -> None:
    img, probs, truth = _scene(0)
    before = (probs.argmax(0) == truth).mean()
    out = dense_crf(img, probs, CRFParams(), backend=backend)  # type: ignore[arg-type]
    after = (out == truth).mean()
    assert out.shape == truth.shape and out.dtype == np.int64
    assert before < 0.8
    assert after > before + 0.1


def test_batch_equals_per_image_in_process_and_in_workers() -> None:
    scenes = [_scene(s) for s in range(3)]
    imgs = np.stack([s[0] for s in scenes])
    probs = torch.from_numpy(np.stack([s[1] for s in scenes]))
    single = [dense_crf(s[0], s[1]) for s in scenes]
    seq = crf_batch(imgs, probs, num_workers=0)
    par = crf_batch(torch.from_numpy(imgs), probs, num_workers=2)
    assert seq.dtype == torch.long and seq.shape == (3, 24, 24)
    for i in range(3):
        assert np.array_equal(seq[i].numpy(), single[i])
    assert torch.equal(seq, par)
    assert torch.equal(DenseCRF(num_workers=0)(imgs, probs), seq)


@pytest.mark.parametrize("backend", ["torch", pytest.param("pydensecrf", marks=needs_pydensecrf)])
def test_params_change_the_result(backend: str) -> None:
    img, probs, _ = _scene(1)
    weak = CRFParams(iterations=1, gaussian_compat=0.0, bilateral_compat=0.0)
    assert np.array_equal(dense_crf(img, probs, weak, backend=backend), probs.argmax(0))  # type: ignore[arg-type]
    full = dense_crf(img, probs, CRFParams(), backend=backend)  # type: ignore[arg-type]
    assert not np.array_equal(full, probs.argmax(0))


def test_invalid_shapes_raise() -> None:
    img, probs, _ = _scene(2)
    with pytest.raises(ValueError, match="image"):
        dense_crf(img[..., :2], probs)
    with pytest.raises(ValueError, match="probs"):
        dense_crf(img, probs[:, :-1])
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(img.astype(np.float32), probs)
    with pytest.raises(ValueError, match="images"):
        crf_batch(img, probs[None])
    with pytest.raises(ValueError, match="probs"):
        crf_batch(img[None], probs)
    with pytest.raises(ValueError, match="probs"):
        crf_batch(np.stack([img, img]), probs[None])


# --- the permutohedral lattice against the exact Gaussian filter ----------------------------------------


def _grid(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def _smooth_values(h: int, w: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, c, 4, 4, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bilinear")[0].permute(1, 2, 0).reshape(-1, c)


def _blocky_image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.kron(rng.random((3, 4, 3)) * 255, np.ones((h // 3, w // 4, 1)))
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def _symmetric_errors(features: torch.Tensor, values: torch.Tensor) -> tuple[float, float]:
    """Relative (max, mean) error of the lattice's ``D^-1/2 K D^-1/2 v`` (what the CRF applies) against the
    brute-force sum over all pairs, ``K_ij = exp(-|f_i - f_j|^2 / 2)``."""
    f = features.double()
    kernel = torch.exp(-(torch.cdist(f, f) ** 2) / 2)
    inv = kernel.sum(1, keepdim=True).rsqrt()
    exact = inv * (kernel @ (values.double() * inv))
    lat_inv = permutohedral_filter(features, torch.ones(len(f), 1)).double().rsqrt()
    approx = lat_inv * permutohedral_filter(features, (values.double() * lat_inv).float()).double()
    err = (approx - exact).abs()
    return float(err.max() / exact.abs().max()), float(err.mean() / exact.abs().mean())


@pytest.mark.parametrize(
    ("kind", "max_bound", "mean_bound"),
    # measured with these seeds: gaussian max 0.037, mean 0.0086; bilateral max 0.072, mean 0.020
    [("gaussian", 0.05, 0.012), ("bilateral", 0.08, 0.024)],
)
def test_lattice_approximates_the_exact_gaussian_filter(
    kind: str, max_bound: float, mean_bound: float
) -> None:
    """The lattice's error against the brute-force filter, relative to the filtered values' scale."""
    h, w = 24, 32
    xy = _grid(h, w)
    if kind == "gaussian":  # the smoothness kernel: d = 2, sxy = 3
        features = xy / 3.0
    else:  # an appearance kernel on a blocky image: d = 5 (sxy = 8, srgb = 10, so that it is not flat here)
        rgb = torch.from_numpy(_blocky_image(h, w, 0)).reshape(-1, 3).float()
        features = torch.cat([xy / 8.0, rgb / 10.0], dim=1)
    values = _smooth_values(h, w, 3, seed=1)
    worst, mean = _symmetric_errors(features, values)
    assert worst < max_bound and mean < mean_bound, (worst, mean)
    # the bound tells kernels apart: the exact filter with the std off by a factor sqrt(2) (the classic
    # exp(-d^2) / exp(-d^2 / 2) slip) is outside it
    f = features.double()

    def exact(std: float) -> torch.Tensor:
        kernel = torch.exp(-(torch.cdist(f, f) ** 2) / (2 * std**2))
        inv = kernel.sum(1, keepdim=True).rsqrt()
        return inv * (kernel @ (values.double() * inv))

    for std in (2**0.5, 2**-0.5):
        assert float((exact(std) - exact(1.0)).abs().mean() / exact(1.0).abs().mean()) > mean_bound


def test_lattice_raw_filter_is_a_scaled_gaussian_sum() -> None:
    """Unnormalised, the lattice is the Gaussian sum times a constant (measured 0.87 for d = 2)."""
    xy = _grid(20, 20) / 2.0
    ones = torch.ones(len(xy), 1)
    exact = torch.exp(-(torch.cdist(xy.double(), xy.double()) ** 2) / 2).sum(1, keepdim=True)
    ratio = permutohedral_filter(xy, ones).double() / exact
    assert 0.8 < float(ratio.mean()) < 0.95
    assert float(ratio.std() / ratio.mean()) < 0.05


def test_lattice_groups_never_interact_and_both_key_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.rand(300, 5, generator=g) * 6
    values = torch.rand(300, 4, generator=g)
    groups = torch.randint(0, 3, (300,), generator=g)
    batched = permutohedral_filter(features, values, groups)
    for k in range(3):
        sel = groups == k
        torch.testing.assert_close(batched[sel], permutohedral_filter(features[sel], values[sel]))
    monkeypatch.setattr(crf_module, "_PACK_LIMIT", 1)  # keys that do not fit one int64: unique rows
    torch.testing.assert_close(permutohedral_filter(features, values, groups), batched)


def test_lattice_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"features must be \[N, d\]"):
        permutohedral_filter(torch.rand(5, 2), torch.rand(4, 1))
    with pytest.raises(ValueError, match="groups"):
        permutohedral_filter(torch.rand(5, 2), torch.rand(5, 1), torch.zeros(4))


# --- the torch backend against pydensecrf ---------------------------------------------------------------


def _smooth_unaries(h: int, w: int, k: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    logits = F.interpolate(
        torch.randn(1, k, h // 8 + 1, w // 8 + 1, generator=g) * 3, size=(h, w), mode="bilinear"
    )
    logits = logits + 0.5 * torch.randn(1, k, h, w, generator=g)
    return logits[0].softmax(0).numpy()


@needs_pydensecrf
@pytest.mark.parametrize("iterations", [0, 1, 5])
def test_torch_marginals_equal_pydensecrfs(iterations: int) -> None:
    """Same lattice, normalisation and update order: the marginals agree to float rounding (measured
    max |dQ| = 2e-6 at 500 x 375, 21 classes, 10 iterations)."""
    img = _blocky_image(48, 64, 3)
    probs = _smooth_unaries(48, 64, 5, seed=4)
    params = CRFParams(iterations=iterations)
    expected = crf_module._crf_probs(img, probs, params)
    got = dense_crf_torch(img[None], torch.from_numpy(probs)[None], params)[0].numpy()
    assert np.abs(got - expected).max() < 1e-4


@needs_pydensecrf
def test_torch_labels_agree_with_pydensecrf_on_random_smooth_unaries() -> None:
    probs = np.stack([_smooth_unaries(48, 56, 6, seed=s) for s in range(3)])
    imgs = np.stack([_blocky_image(48, 56, s) for s in range(3)])
    ref = crf_batch(imgs, probs, num_workers=1, backend="pydensecrf")
    got = crf_batch(imgs, torch.from_numpy(probs), backend="torch")
    assert (got == ref).float().mean() >= 0.99
    assert (ref != torch.from_numpy(probs).argmax(1)).float().mean() > 0.02  # the CRF did change labels


@needs_pydensecrf
def test_torch_labels_agree_with_pydensecrf_on_synthetic_benchmark_images() -> None:
    from ecaseg.data.synthetic import SyntheticConfig, generate_sample

    config = SyntheticConfig(image_size=64, num_fg_classes=3)
    agree = []
    for index in range(3):
        image, mask = generate_sample(config, "val", index)
        rng = np.random.default_rng(index)
        onehot = np.eye(4, dtype=np.float32)[mask.astype(np.int64)].transpose(2, 0, 1)
        noisy = torch.from_numpy(onehot * 3 + rng.normal(0, 1.5, onehot.shape).astype(np.float32))
        probs = F.avg_pool2d(noisy[None], 5, 1, 2)[0].softmax(0).numpy()
        ref = dense_crf(image, probs, backend="pydensecrf")
        agree.append((dense_crf(image, probs, backend="torch") == ref).mean())
    assert min(agree) >= 0.99, agree


# --- backend choice --------------------------------------------------------------------------------------


def _hide_pydensecrf(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


def test_auto_uses_torch_without_pydensecrf(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_pydensecrf(monkeypatch)
    assert not pydensecrf_available()
    assert resolve_crf_backend("auto", "cpu") == "torch"
    img, probs, truth = _scene(0)
    out = dense_crf(img, probs)
    assert np.array_equal(out, dense_crf(img, probs, backend="torch"))
    assert (out == truth).mean() > 0.9
    assert torch.equal(DenseCRF()(img[None], torch.from_numpy(probs)[None])[0], torch.from_numpy(out))
    for call in (
        lambda: resolve_crf_backend("pydensecrf", "cpu"),
        lambda: dense_crf(img, probs, backend="pydensecrf"),
        lambda: crf_batch(img[None], probs[None], backend="pydensecrf"),
    ):
        with pytest.raises(MissingDependencyError) as info:
            call()
        message = str(info.value)
        assert "pip install ecaseg[pydensecrf]" in message and "\n" not in message


def test_backend_resolution() -> None:
    assert resolve_crf_backend("torch", "cpu") == "torch"
    assert resolve_crf_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_crf_backend("auto", "cpu") == ("pydensecrf" if pydensecrf_available() else "torch")
    with pytest.raises(ConfigError, match="torch, pydensecrf, auto"):
        resolve_crf_backend("cuda", "cpu")
    with pytest.raises(ConfigError, match="'gpu'"):
        DenseCRF(backend="gpu")  # type: ignore[arg-type]


def test_config_key_crf_backend() -> None:
    from ecaseg.engine.config import load_config

    assert load_config("synthetic").eval.crf_backend == "auto"
    assert load_config("synthetic", ["eval.crf_backend=torch"]).eval.crf_backend == "torch"
    with pytest.raises(ConfigError, match=r"eval\.crf_backend"):
        load_config("synthetic", ["eval.crf_backend=cuda"])


# --- the inference pipeline with each backend ----------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", pytest.param("pydensecrf", marks=needs_pydensecrf)])
def test_inference_pipeline_with_each_backend(backend: str) -> None:
    """predict_batched / predict_labels / evaluate_segmentation run the chosen backend: its labels are
    dense_crf's on the same probabilities (and the two backends agree on >= 99 % of the pixels)."""
    from ecaseg.data import EvalTransform
    from ecaseg.data.synthetic import SyntheticConfig, SyntheticWSSSDataset
    from ecaseg.engine.evaluation import evaluate_segmentation
    from ecaseg.engine.inference import _rgb_uint8, predict_batched, predict_labels, predict_probs
    from ecaseg.models import ECANet

    torch.manual_seed(0)
    net = ECANet("mit_nano", num_classes=4).eval()
    data = SyntheticWSSSDataset(
        "val", SyntheticConfig(image_size=48, num_fg_classes=3, num_val=3), EvalTransform()
    )
    images = [data[i]["image"] for i in range(3)]
    params = CRFParams(iterations=3)
    cpu = torch.device("cpu")
    got = dict(
        predict_batched(net, enumerate(images), device=cpu, batch_size=2, crf=params, crf_workers=1,
                        crf_backend=backend)  # type: ignore[arg-type]
    )  # fmt: skip
    for i, x in enumerate(images):
        probs = predict_probs(net, x[None])[0].numpy()
        rgb = _rgb_uint8(x[None])
        expected = dense_crf(rgb[0], probs, params, backend=backend)  # type: ignore[arg-type]
        assert np.array_equal(got[i].numpy(), expected)
        other = dense_crf(rgb[0], probs, params, backend="torch" if backend != "torch" else "auto")
        assert (other == expected).mean() >= 0.99
        single = predict_labels(net, x[None], rgb, crf=params, crf_workers=1, crf_backend=backend)  # type: ignore[arg-type]
        assert np.array_equal(single[0].numpy(), expected)
    result = evaluate_segmentation(net, data, device=cpu, crf=params, crf_workers=1, crf_backend=backend,  # type: ignore[arg-type]
                                   progress=False)  # fmt: skip
    assert np.asarray(result["confusion"]).sum() == 3 * 48 * 48


def test_lattice_edge_cases() -> None:
    assert permutohedral_filter(torch.zeros(0, 3), torch.zeros(0, 2)).shape == (0, 2)
    with pytest.raises(ValueError, match="d >= 1"):
        permutohedral_filter(torch.zeros(4, 0), torch.zeros(4, 2))
    # one point: the lattice gives back the value times its own weight (the same constant for any value)
    one = permutohedral_filter(torch.tensor([[0.3, -1.2]]), torch.tensor([[1.0, 2.0]]))
    assert torch.allclose(one[0, 1], 2 * one[0, 0]) and bool(one[0, 0] > 0)
    # empty images: nothing to do
    empty = dense_crf_torch(torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, 2, 4, 4))
    assert empty.shape == (0, 2, 4, 4)
