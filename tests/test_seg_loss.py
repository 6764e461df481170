"""Eq. (12) losses against direct computations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ecaseg.seg_loss import SegmentationLoss, classification_loss, segmentation_loss


def test_balanced_loss_is_mean_of_background_and_foreground_halves() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, 0, :3] = 255
    pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    bg = [float(pixel[b, y, x]) for b in range(2) for y in range(5) for x in range(6) if target[b, y, x] == 0]
    fg = [
        float(pixel[b, y, x])
        for b in range(2)
        for y in range(5)
        for x in range(6)
        if target[b, y, x] not in (0, 255)
    ]
    expected = 0.5 * (sum(bg) / len(bg) + sum(fg) / len(fg))
    assert math.isclose(float(segmentation_loss(logits, target)), expected, rel_tol=1e-5)
    plain = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(segmentation_loss(logits, target, balanced=False), plain)
    assert torch.allclose(SegmentationLoss()(logits, target), segmentation_loss(logits, target))


def test_all_ignored_gives_zero_not_nan_and_logits_are_resized() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 8, 8), 255)
    loss = segmentation_loss(logits, target)
    assert float(loss) == 0.0
    target[0, :4] = 1
    loss = segmentation_loss(logits, target)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_classification_loss_matches_formula() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    sig = torch.sigmoid(logits)
    expected = -(labels * sig.log() + (1 - labels) * (1 - sig).log()).mean()
    assert torch.allclose(classification_loss(logits, labels), expected, atol=1e-6)
