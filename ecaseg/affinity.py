"""Affinity labels and the affinity-from-attention loss (AFA's L_aff, used by ECA's Eq. (12)).

The refined pseudo-label is downsampled (nearest) to the stage-4 grid ``h x w`` (1/16). Two patches ``i``
and ``j`` within the square window ``|y_i - y_j| <= r`` and ``|x_i - x_j| <= r`` (radius ``r = 8``, the
pair ``i = j`` included) and both not ignored form a

* background-positive pair when both are background (label 0),
* foreground-positive pair when both carry the same foreground class,
* negative pair when their labels differ.

The predicted affinity ``A = sigmoid(...)`` of shape ``[B, N, N]`` is trained with

    L_aff = 1/2 * mean_{R+} (1 - A_ij) + 1/2 * mean_{R-} A_ij

with ``R+ = bg_pos | fg_pos`` pooled over the batch (AFA's released loss). ``split_positives=True``
averages the background and foreground positives separately
(``1/4 mean_bg (1 - A) + 1/4 mean_fg (1 - A) + 1/2 mean_neg A``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AffinityLabels",
    "AffinityLoss",
    "affinity_labels",
    "affinity_loss",
    "cosine_affinity",
    "downsample_label",
    "propagate_with_background",
    "radius_mask",
    "random_walk",
]


@dataclass
class AffinityLabels:
    """Boolean pair masks ``[B, N, N]`` (N = h * w, row-major patches)."""

    bg_pos: torch.Tensor
    fg_pos: torch.Tensor
    neg: torch.Tensor


def downsample_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour downsampling of a label map ``[B, H, W]`` to ``size`` -> long ``[B, h, w]``.

    Example:
        >>> downsample_label(torch.tensor([[[1, 1, 2, 2], [1, 1, 2, 2]]]), (1, 2))
        tensor([[[1, 2]]])
    """
    if label.dim() != 3:
        raise ValueError(f"label must be [B, H, W], got {tuple(label.shape)}")
    out = F.interpolate(label[:, None].float(), size=tuple(size), mode="nearest")
    return out[:, 0].long()


def radius_mask(h: int, w: int, radius: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool ``[N, N]``: patches within ``radius`` of each other in both directions (square window).

    Example:
        >>> radius_mask(1, 3, 1).int()
        tensor([[1, 1, 0],
                [1, 1, 1],
                [0, 1, 1]], dtype=torch.int32)
    """
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    return ((ys[:, None] - ys[None, :]).abs() <= radius) & ((xs[:, None] - xs[None, :]).abs() <= radius)


def affinity_labels(label: torch.Tensor, radius: int = 8, ignore_index: int = 255) -> AffinityLabels:
    """Pairwise affinity targets from a pseudo-label on the affinity grid.

    Args:
        label: ``[B, h, w]`` integer pseudo-label at the grid of the affinity prediction (1/16).
        radius: pairs further apart than this (in either direction) are left out.
        ignore_index: label of uncertain patches; every pair touching one is left out.

    Returns:
        :class:`AffinityLabels` with disjoint ``bg_pos``, ``fg_pos`` and ``neg`` masks ``[B, N, N]``.

    Example:
        >>> a = affinity_labels(torch.tensor([[[0, 1, 255]]]), radius=1)
        >>> a.bg_pos.int()[0, 0].tolist(), a.fg_pos.int()[0, 1].tolist(), a.neg.int()[0, 0].tolist()
        ([1, 0, 0], [0, 1, 0], [0, 1, 0])
    """
    if label.dim() != 3:
        raise ValueError(f"label must be [B, h, w], got {tuple(label.shape)}")
    b, h, w = label.shape
    flat = label.reshape(b, h * w).long()
    ok = flat != ignore_index
    pair_ok = ok[:, :, None] & ok[:, None, :] & radius_mask(h, w, radius, label.device)[None]
    same = flat[:, :, None] == flat[:, None, :]
    is_bg = (flat == 0)[:, :, None]
    return AffinityLabels(
        bg_pos=pair_ok & same & is_bg,
        fg_pos=pair_ok & same & ~is_bg,
        neg=pair_ok & ~same,
    )


def affinity_loss(
    aff_pred: torch.Tensor, labels: AffinityLabels, split_positives: bool = False
) -> torch.Tensor:
    """Affinity loss of AFA: pull positive pairs' affinity to 1 and negative pairs' to 0.

    Means are over all pairs of the batch; an empty set contributes 0 (its count is clamped to 1).

    Args:
        aff_pred: ``[B, N, N]`` predicted affinities in ``[0, 1]`` (sigmoid outputs).
        labels: the pair masks from :func:`affinity_labels`.
        split_positives: average background and foreground positives separately (each weighted 1/4)
            instead of pooling them (AFA's released code, the default).

    Returns:
        scalar float32 loss.

    Example:
        >>> lab = affinity_labels(torch.tensor([[[0, 1]]]), radius=1)
        >>> affinity_loss(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), lab)
        tensor(0.)
    """
    if aff_pred.shape != labels.neg.shape:
        raise ValueError(f"aff_pred shape {tuple(aff_pred.shape)} != label shape {tuple(labels.neg.shape)}")
    a = aff_pred.float()
    neg = labels.neg.float()
    neg_term = (neg * a).sum() / neg.sum().clamp_min(1.0)
    if split_positives:
        bg = labels.bg_pos.float()
        fg = labels.fg_pos.float()
        bg_term = (bg * (1.0 - a)).sum() / bg.sum().clamp_min(1.0)
        fg_term = (fg * (1.0 - a)).sum() / fg.sum().clamp_min(1.0)
        return 0.25 * bg_term + 0.25 * fg_term + 0.5 * neg_term
    pos = (labels.bg_pos | labels.fg_pos).float()
    pos_term = (pos * (1.0 - a)).sum() / pos.sum().clamp_min(1.0)
    return 0.5 * pos_term + 0.5 * neg_term


def propagate_with_background(
    cams: torch.Tensor,
    aff: torch.Tensor,
    labels: torch.Tensor,
    bg_score: float,
    radius: int = 8,
    power: float = 2.0,
    eps: float = 0.1,
    validate: bool = True,
) -> torch.Tensor:
    """Random-walk propagation of CAMs with a constant background on the predicted affinity (AFA's baseline).

    What AFA's released ``propagte_aff_cam_with_bkg`` computes, batched: the affinity ``A [B, N, N]`` is
    cut to the square window of ``radius``, raised to ``power`` and normalised per column,
    ``T = A^p / (sum_i A^p_ij + eps)``; the scores ``[bg_score, CAM_1..C]`` of the background and the
    labelled classes go through a softmax over classes (unlabelled classes get 0); the result is ``P T``
    (each patch takes the affinity-weighted scores of its neighbours).

    Args:
        cams: ``[B, C, h, w]`` normalised foreground CAMs on the affinity grid (``N = h * w``).
        aff: ``[B, N, N]`` predicted affinities (e.g. ``ECANet``'s ``aff_pred``).
        labels: ``[B, C]`` multi-hot foreground labels.
        bg_score: The constant background score (AFA: the band's low and high thresholds).
        radius: Window radius of the affinity (AFA: 8).
        power: Exponent of the affinity (AFA: 2).
        eps: Added to the column sums (AFA: 0.1).
        validate: Refuse negative or non-finite affinities (a sigmoid output passes; a cosine graph such as
            DINO's must be clamped at 0 first, :func:`cosine_affinity`); reads a value back to the host.

    Returns:
        ``[B, C + 1, h, w]`` propagated scores, background at index 0, unlabelled classes zero.

    Example:
        >>> cams = torch.tensor([[[[1.0, 0.0]]]])  # one class, two patches
        >>> out = propagate_with_background(cams, torch.ones(1, 2, 2), torch.ones(1, 1), bg_score=0.5)
        >>> out.shape
        torch.Size([1, 2, 1, 2])
    """
    if cams.dim() != 4 or labels.shape != cams.shape[:2]:
        raise ValueError(
            f"cams must be [B, C, h, w] and labels [B, C], got {tuple(cams.shape)}, {tuple(labels.shape)}"
        )
    batch, num_fg, h, w = cams.shape
    n = h * w
    if aff.shape != (batch, n, n):
        raise ValueError(
            f"aff must be [B, N, N] = [{batch}, {n}, {n}] for the {h}x{w} grid, got {tuple(aff.shape)}"
        )
    if validate:
        _check_affinity(aff)
    window = radius_mask(h, w, radius, device=aff.device)
    a = torch.where(window, aff.float(), torch.zeros((), device=aff.device)) ** power
    a = a / (a.sum(dim=1, keepdim=True) + eps)
    scores = torch.cat([torch.full_like(cams[:, :1], bg_score), cams.float()], dim=1).flatten(2)  # [B, K, N]
    present = torch.cat([torch.ones_like(labels[:, :1], dtype=torch.bool), labels > 0], dim=1)
    probs = scores.masked_fill(~present[:, :, None], float("-inf")).softmax(dim=1)
    return torch.bmm(probs, a).view(batch, num_fg + 1, h, w)


def _check_affinity(aff: torch.Tensor, name: str = "aff") -> None:
    """Refuse negative or non-finite affinities: even powers would turn negative cosines positive."""
    if aff.numel() == 0:
        return
    lo = aff.amin()
    if not bool(torch.isfinite(aff).all()) or bool(lo < 0):
        raise ValueError(
            f"{name} must hold finite, non-negative affinities, got a minimum of {float(lo):.4g}; a cosine "
            "graph (e.g. of DINO keys) has negative entries that a power would turn positive: clamp it at 0 "
            "first (aff.clamp_min(0), or ecaseg.affinity.cosine_affinity(keys))"
        )


def cosine_affinity(keys: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Non-negative affinity ``max(cos(k_i, k_j), 0)`` of patch features, for :func:`random_walk`.

    Eq. (4)'s graph clamped at 0: dissimilar patches (negative cosine) get no affinity, instead of a
    negative weight that a power would flip.

    Args:
        keys: ``[B, N, D]`` patch features (e.g. ``DINOAffinity(images).keys``).
        eps: Norm floor.

    Returns:
        ``[B, N, N]`` float32 in ``[0, 1]``.

    Example:
        >>> cosine_affinity(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])).tolist()
        [[[1.0, 0.0], [0.0, 1.0]]]
    """
    if keys.dim() != 3:
        raise ValueError(f"keys must be [B, N, D], got {tuple(keys.shape)}")
    unit = F.normalize(keys.float(), dim=-1, eps=eps)
    return torch.bmm(unit, unit.transpose(1, 2)).clamp_(0.0, 1.0)


def random_walk(
    probs: torch.Tensor,
    aff: torch.Tensor,
    power: float = 2.0,
    iterations: int = 1,
    radius: int | None = None,
    eps: float = 1e-5,
    validate: bool = True,
) -> torch.Tensor:
    """Random-walk propagation of class scores on a non-negative affinity (IRN / AFA style).

    The transition matrix is ``T = A^p`` (cut to the square window of ``radius`` when given) normalised
    per column, ``T_ij = A^p_ij / (sum_i A^p_ij + eps)``; the scores take ``iterations`` steps
    ``P <- P T`` (each patch takes the affinity-weighted average of the scores of the patches it is
    similar to). A larger ``power`` keeps only the strongest affinities.

    Args:
        probs: ``[B, K, h, w]`` class scores or probabilities on the affinity grid (``N = h * w``).
        aff: ``[B, N, N]`` finite, non-negative affinities (checked with ``validate``; clamp a cosine graph
            at 0 first, :func:`cosine_affinity`).
        power: Exponent of the affinity (IRN's beta).
        iterations: Number of steps (IRN uses ``2^8`` for its learned affinity).
        radius: Optional window radius in patches; ``None`` uses all pairs.
        eps: Added to the column sums.
        validate: Check ``aff`` (reads a value back to the host).

    Returns:
        ``[B, K, h, w]`` propagated scores (float32).

    Example:
        >>> p = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
        >>> random_walk(p, torch.ones(1, 2, 2), eps=0.0)[0, :, 0].tolist()
        [[0.5, 0.5], [0.5, 0.5]]
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be [B, K, h, w], got {tuple(probs.shape)}")
    batch, k, h, w = probs.shape
    n = h * w
    if aff.shape != (batch, n, n):
        raise ValueError(
            f"aff must be [B, N, N] = [{batch}, {n}, {n}] for the {h}x{w} grid, got {tuple(aff.shape)}"
        )
    if iterations < 0 or power <= 0:
        raise ValueError(f"iterations must be >= 0 and power > 0, got {iterations} and {power}")
    if validate:
        _check_affinity(aff)
    a = aff.float()
    if radius is not None:
        a = torch.where(radius_mask(h, w, radius, device=aff.device), a, torch.zeros((), device=aff.device))
    a = a**power
    trans = a / (a.sum(dim=1, keepdim=True) + eps)
    out = probs.float().flatten(2)
    for _ in range(iterations):  # a few steps, each one batched product
        out = torch.bmm(out, trans)
    return out.view(batch, k, h, w)


class AffinityLoss(nn.Module):
    """Module computing :func:`affinity_labels` from a pseudo-label and then :func:`affinity_loss`.

    Args:
        radius: pair radius on the affinity grid.
        ignore_index: label of uncertain pixels.
        split_positives: see :func:`affinity_loss`.

    Example:
        >>> crit = AffinityLoss(radius=8)
        >>> pred = torch.full((1, 4, 4), 0.5)
        >>> crit(pred, torch.zeros(1, 32, 32, dtype=torch.long))  # label downsampled to 2x2
        tensor(0.2500)
    """

    def __init__(self, radius: int = 8, ignore_index: int = 255, split_positives: bool = False) -> None:
        super().__init__()
        self.radius = radius
        self.ignore_index = ignore_index
        self.split_positives = split_positives

    if TYPE_CHECKING:

        def __call__(self, aff_pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor: ...

    def forward(self, aff_pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Affinity loss of predicted pair affinities against the pairs of a pseudo-label.

        The grid is taken as square when ``label`` is square; otherwise ``h = round(sqrt(N * H / W))``.

        Args:
            aff_pred: ``[B, N, N]`` predicted affinities in ``[0, 1]`` on an ``N = h * w`` grid.
            label: ``[B, H, W]`` long pseudo-label at any resolution (downsampled to the grid).

        Returns:
            Scalar loss.
        """
        n = aff_pred.shape[-1]
        hl, wl = label.shape[-2:]
        h = round((n * hl / wl) ** 0.5)
        w = n // max(h, 1)
        if h * w != n:
            raise ValueError(
                f"cannot map N={n} affinity patches onto a grid with the label's aspect {hl}x{wl}"
            )
        small = label if (hl, wl) == (h, w) else downsample_label(label, (h, w))
        return affinity_loss(
            aff_pred, affinity_labels(small, self.radius, self.ignore_index), self.split_positives
        )

    def extra_repr(self) -> str:
        return (
            f"radius={self.radius}, ignore_index={self.ignore_index}, split_positives={self.split_positives}"
        )
