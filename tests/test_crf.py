"""Tests of ecaseg.crf on tiny synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ecaseg.crf import CRFParams, DenseCRF, crf_batch, dense_crf


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


def test_crf_follows_colour_regions() -> None:
    img, probs, truth = _scene(0)
    before = (probs.argmax(0) == truth).mean()
    out = dense_crf(img, probs, CRFParams())
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


def test_params_change_the_result() -> None:
    img, probs, _ = _scene(1)
    weak = CRFParams(iterations=1, gaussian_compat=0.0, bilateral_compat=0.0)
    assert np.array_equal(dense_crf(img, probs, weak), probs.argmax(0))
    assert not np.array_equal(dense_crf(img, probs, CRFParams()), probs.argmax(0))


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
