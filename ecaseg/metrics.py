"""Evaluation metrics: segmentation confusion matrix / mIoU, multi-label AP / F1, and Table-3 style reports.

The segmentation confusion matrix is accumulated on the input's device with one ``torch.bincount`` per
``update`` (rows = ground truth, columns = prediction) and summed over processes in
:meth:`SegmentationMetric.compute` when ``torch.distributed`` is initialised, so every rank reports the
global score.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from ecaseg.utils.dist import all_reduce_sum, collective_device, is_distributed
from ecaseg.utils.io import atomic_write_text

__all__ = [
    "MultiLabelMetric",
    "SegmentationMetric",
    "average_precision",
    "format_iou_table",
    "write_iou_table",
]


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() > 0 else math.nan


class SegmentationMetric:
    """Confusion-matrix based semantic segmentation scores (mIoU, pixel and mean accuracy).

    Args:
        num_classes: K, the number of classes including background.
        ignore_index: target value that is left out of every score.

    Example:
        >>> m = SegmentationMetric(num_classes=3)
        >>> m.update(torch.tensor([[[0, 1], [2, 2]]]), torch.tensor([[[0, 1], [2, 255]]]))
        >>> m.compute()["miou"]
        1.0
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class index (K={num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion: torch.Tensor = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Zero the confusion matrix (kept on its current device)."""
        self.confusion = torch.zeros_like(self.confusion)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predictions to the confusion matrix.

        Args:
            pred: integer class map ``[B, H, W]`` (or any shape equal to ``target``), values in ``[0, K)``.
            target: integer ground truth of the same shape; ``ignore_index`` pixels are skipped.

        Raises:
            ValueError: on shape mismatch, non-integer input, or values outside ``[0, K)`` (ignore aside).
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError(f"pred and target must be integer tensors, got {pred.dtype} and {target.dtype}")
        k = self.num_classes
        if self.confusion.device != target.device:
            self.confusion = self.confusion.to(target.device)
        pred = pred.to(device=target.device, dtype=torch.int64).reshape(-1)
        target = target.to(torch.int64).reshape(-1)
        valid = target != self.ignore_index
        pred_v, target_v = pred[valid], target[valid]
        bad = (pred_v < 0) | (pred_v >= k) | (target_v < 0) | (target_v >= k)
        if bool(bad.any()):  # one sync per update; metrics are evaluation-time code
            values = torch.cat(
                [pred_v[(pred_v < 0) | (pred_v >= k)], target_v[(target_v < 0) | (target_v >= k)]]
            )
            raise ValueError(
                f"pred/target hold values outside [0, {k}) other than ignore_index={self.ignore_index}: "
                f"{values.unique()[:10].tolist()}"
            )
        counts = torch.bincount(target_v * k + pred_v, minlength=k * k)
        self.confusion += counts.view(k, k)

    def compute(self) -> dict[str, Any]:
        """Scores over everything seen so far (summed over processes under torch.distributed).

        Returns:
            dict with ``miou`` (mean over classes with a finite IoU), ``per_class_iou`` (K floats, NaN for a
            class that is in neither prediction nor target), ``pixel_accuracy``, ``mean_accuracy`` (mean
            recall over classes present in the target), ``per_class_accuracy`` (K floats, NaN when absent
            from the target) and ``confusion`` (K x K nested list of ints, rows = target, cols = pred).
        """
        conf = self.confusion.clone()
        if is_distributed():  # every rank, also one that saw no image (its matrix is still on the CPU)
            conf = all_reduce_sum(conf.to(collective_device()))
        conf_f = conf.to(device="cpu", dtype=torch.float64)
        tp = conf_f.diagonal()
        gt = conf_f.sum(dim=1)
        pr = conf_f.sum(dim=0)
        union = gt + pr - tp
        nan = torch.full_like(tp, math.nan)
        iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
        total = float(conf_f.sum())
        return {
            "miou": _nanmean(iou),
            "per_class_iou": iou.tolist(),
            "pixel_accuracy": float(tp.sum()) / total if total > 0 else math.nan,
            "mean_accuracy": _nanmean(acc),
            "per_class_accuracy": acc.tolist(),
            "confusion": conf.cpu().tolist(),
        }


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class average precision (area under the step precision-recall curve, ties grouped).

    AP = (1 / #positives) * sum over positives of the precision at the threshold equal to that sample's
    score (all samples tied with it count as predicted positive), i.e. scikit-learn's definition.

    Args:
        scores: ``[M, C]`` real scores (higher = more confident).
        labels: ``[M, C]`` binary ground truth.

    Returns:
        ``[C]`` float64 AP per class; NaN for a class without positives.

    Example:
        >>> average_precision(torch.tensor([[0.9], [0.8], [0.1]]), torch.tensor([[1], [0], [1]]))
        tensor([0.8333], dtype=torch.float64)
    """
    if scores.shape != labels.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and labels must both be [M, C], got {tuple(scores.shape)}, {tuple(labels.shape)}"
        )
    m = scores.shape[0]
    s = scores.to(torch.float64)
    y = (labels > 0.5).to(torch.float64)
    order = torch.argsort(s, dim=0, descending=True)
    s_sorted = torch.gather(s, 0, order)
    y_sorted = torch.gather(y, 0, order)
    tp = y_sorted.cumsum(0)
    rank = torch.arange(1, m + 1, dtype=torch.float64, device=s.device).unsqueeze(1)
    precision = tp / rank
    # index of the last element of each tie group: reverse cumulative min of "group end" positions
    is_end = torch.ones_like(s_sorted, dtype=torch.bool)
    is_end[:-1] = s_sorted[:-1] != s_sorted[1:]
    idx = torch.arange(m, device=s.device).unsqueeze(1).expand_as(s_sorted)
    end_idx = torch.where(is_end, idx, torch.full_like(idx, m))
    end_idx = end_idx.flip(0).cummin(0).values.flip(0)
    prec_at_group = torch.gather(precision, 0, end_idx)
    npos = y.sum(0)
    ap = (y_sorted * prec_at_group).sum(0) / npos.clamp_min(1)
    return torch.where(npos > 0, ap, torch.full_like(ap, math.nan))


class MultiLabelMetric:
    """Multi-label classification scores for the classifier branch (``num_classes - 1`` foreground classes).

    ``update`` stores scores and labels; ``compute`` returns per-class AP and mAP (NaN classes without a
    positive are left out of the mean) and F1 at a threshold of 0.5 on ``sigmoid(scores)`` (i.e. logits
    > 0); with ``from_logits=False`` the scores are probabilities and are thresholded at 0.5 directly.

    Args:
        num_classes: K, background included (21 for VOC), as everywhere in ecaseg; scores and labels hold
            the ``num_classes - 1`` foreground classes.
        from_logits: whether the scores are logits (default) or probabilities.

    Example:
        >>> m = MultiLabelMetric(num_classes=3)  # background + 2 foreground classes
        >>> m.update(torch.tensor([[3.0, -2.0], [-1.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> m.compute()["map"], m.compute()["mean_f1"]
        (1.0, 1.0)
    """

    def __init__(self, num_classes: int, from_logits: bool = True) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.num_fg = num_classes - 1
        self.from_logits = from_logits
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._scores.clear()
        self._labels.clear()

    @torch.no_grad()
    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Store a batch.

        Args:
            scores: ``[B, C]`` logits (or probabilities with ``from_logits=False``).
            labels: ``[B, C]`` multi-hot ground truth.
        """
        if scores.shape != labels.shape or scores.dim() != 2 or scores.shape[1] != self.num_fg:
            raise ValueError(
                f"scores and labels must both be [B, num_classes - 1] = [B, {self.num_fg}] "
                f"(num_classes={self.num_classes} counts the background), "
                f"got {tuple(scores.shape)} and {tuple(labels.shape)}"
            )
        self._scores.append(scores.detach().float())
        self._labels.append(labels.detach().float().to(scores.device))

    def compute(self) -> dict[str, Any]:
        """Scores over everything seen so far (gathered over processes under torch.distributed).

        Returns:
            dict with ``map`` (float), ``ap_per_class`` (C floats), ``f1_per_class`` (C floats, NaN where a
            class has neither a positive nor a positive prediction) and ``mean_f1``.
        """
        if self._scores:
            scores = torch.cat(self._scores)
            labels = torch.cat(self._labels)
        else:
            scores = labels = torch.zeros(0, self.num_fg)
        if is_distributed():  # a collective on every rank, also on one that saw no image
            device = collective_device()
            scores, labels = _all_gather_rows(scores.to(device)), _all_gather_rows(labels.to(device))
        if scores.shape[0] == 0:
            nan_list = [math.nan] * self.num_fg
            return {"map": math.nan, "ap_per_class": nan_list, "f1_per_class": nan_list, "mean_f1": math.nan}
        scores, labels = scores.cpu().double(), labels.cpu().double()
        ap = average_precision(scores, labels)
        prob = torch.sigmoid(scores) if self.from_logits else scores
        pred = (prob > 0.5).double()
        y = (labels > 0.5).double()
        tp = (pred * y).sum(0)
        fp = (pred * (1 - y)).sum(0)
        fn = ((1 - pred) * y).sum(0)
        denom = 2 * tp + fp + fn
        f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.full_like(tp, math.nan))
        return {
            "map": _nanmean(ap),
            "ap_per_class": ap.tolist(),
            "f1_per_class": f1.tolist(),
            "mean_f1": _nanmean(f1),
        }


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``[n_r, C]`` tensors of every rank along dim 0 (ranks may hold different n_r)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    max_n = max(1, *(int(s) for s in sizes))  # never a zero-size message
    padded = torch.zeros(max_n, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


def format_iou_table(
    per_class_iou: Sequence[float], class_names: Sequence[str], title: str = "ecaseg"
) -> str:
    """Markdown table of per-class IoU in the layout of the paper's Table 3.

    One row per class with the IoU in percent (one decimal, ``-`` for NaN), then a last ``mIoU`` row
    (mean over the finite values).

    Args:
        per_class_iou: K IoU values in ``[0, 1]`` (as returned by :meth:`SegmentationMetric.compute`).
        class_names: K class names (background first).
        title: the column header (e.g. the method name).

    Returns:
        the table as a string ending with a newline.

    Example:
        >>> print(format_iou_table([0.9, 0.5], ["bkg", "aero"], title="ECA"), end="")
        | Class | ECA |
        | --- | --- |
        | bkg | 90.0 |
        | aero | 50.0 |
        | mIoU | 70.0 |
    """
    if len(per_class_iou) != len(class_names):
        raise ValueError(f"got {len(per_class_iou)} IoU values for {len(class_names)} class names")
    values = torch.tensor([float(v) for v in per_class_iou], dtype=torch.float64)

    def fmt(v: float) -> str:
        return "-" if math.isnan(v) else f"{100.0 * v:.1f}"

    lines = [f"| Class | {title} |", "| --- | --- |"]
    lines += [f"| {name} | {fmt(float(v))} |" for name, v in zip(class_names, values)]
    lines.append(f"| mIoU | {fmt(_nanmean(values))} |")
    return "\n".join(lines) + "\n"


def write_iou_table(
    path: str | os.PathLike[str],
    per_class_iou: Sequence[float],
    class_names: Sequence[str],
    title: str = "ecaseg",
) -> None:
    """Write :func:`format_iou_table`'s output to ``path`` atomically (UTF-8)."""
    atomic_write_text(path, format_iou_table(per_class_iou, class_names, title))
