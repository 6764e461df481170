"""Tests of ecaseg.metrics against independent numpy / loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ecaseg.metrics as metrics_mod
from ecaseg.metrics import (
    MultiLabelMetric,
    SegmentationMetric,
    average_precision,
    format_iou_table,
    write_iou_table,
)


def _numpy_scores(pred: np.ndarray, target: np.ndarray, k: int, ignore: int = 255) -> dict:
    conf = np.zeros((k, k), dtype=np.int64)
    for p, t in zip(pred.ravel(), target.ravel()):
        if t == ignore:
            continue
        conf[t, p] += 1
    iou, acc = [], []
    for c in range(k):
        tp = conf[c, c]
        fn = conf[c, :].sum() - tp
        fp = conf[:, c].sum() - tp
        iou.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else math.nan)
        acc.append(tp / conf[c, :].sum() if conf[c, :].sum() > 0 else math.nan)
    return {
        "conf": conf,
        "iou": iou,
        "miou": float(np.nanmean(iou)),
        "pa": np.trace(conf) / conf.sum(),
        "ma": float(np.nanmean(acc)),
    }


def _random_labels(rng: np.random.Generator, shape: tuple[int, ...], k: int) -> tuple[np.ndarray, np.ndarray]:
    # class k-1 never appears; class k-2 only in predictions
    target = rng.integers(0, k - 2, size=shape)
    target[rng.random(shape) < 0.2] = 255
    pred = rng.integers(0, k - 1, size=shape)
    return pred, target


def test_segmentation_metric_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    k = 6
    pred, target = _random_labels(rng, (3, 9, 11), k)
    m = SegmentationMetric(k)
    m.update(torch.from_numpy(pred), torch.from_numpy(target))
    out = m.compute()
    ref = _numpy_scores(pred, target, k)
    assert np.array_equal(np.array(out["confusion"]), ref["conf"])
    got_iou = np.array(out["per_class_iou"])
    ref_iou = np.array(ref["iou"])
    assert np.array_equal(np.isnan(got_iou), np.isnan(ref_iou))
    assert math.isnan(got_iou[k - 1]) and got_iou[k - 2] == 0.0
    np.testing.assert_allclose(got_iou[~np.isnan(got_iou)], ref_iou[~np.isnan(ref_iou)], rtol=1e-12)
    assert out["miou"] == pytest.approx(ref["miou"], rel=1e-12)
    assert out["pixel_accuracy"] == pytest.approx(ref["pa"], rel=1e-12)
    assert out["mean_accuracy"] == pytest.approx(ref["ma"], rel=1e-12)
    assert len(out["per_class_iou"]) == k


def test_segmentation_metric_accumulates_and_resets() -> None:
    rng = np.random.default_rng(1)
    k = 5
    pred, target = _random_labels(rng, (4, 6, 7), k)
    whole = SegmentationMetric(k)
    whole.update(torch.from_numpy(pred), torch.from_numpy(target))
    parts = SegmentationMetric(k)
    for i in range(4):
        parts.update(torch.from_numpy(pred[i : i + 1]), torch.from_numpy(target[i : i + 1]))
    assert parts.compute()["confusion"] == whole.compute()["confusion"]
    parts.reset()
    assert int(parts.confusion.sum()) == 0
    assert math.isnan(parts.compute()["miou"])


def test_segmentation_metric_bad_input() -> None:
    m = SegmentationMetric(3)
    with pytest.raises(ValueError, match="shapes differ"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*\[3\]"):
        m.update(torch.full((1, 2, 2), 3), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[7\]"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        m.update(torch.full((1, 2, 2), -1), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        m.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="collides"):
        SegmentationMetric(3, ignore_index=1)
    # the failed updates left nothing behind
    assert int(m.confusion.sum()) == 0


def test_segmentation_metric_all_reduces(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_all_reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape)
        t.mul_(2)  # as if a second rank saw the same data
        return t

    monkeypatch.setattr(metrics_mod, "is_distributed", lambda: True)
    monkeypatch.setattr(metrics_mod, "all_reduce_sum", fake_all_reduce)
    m = SegmentationMetric(3)
    m.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]]))
    out = m.compute()
    assert calls == [torch.Size([3, 3])]
    assert out["confusion"] == [[2, 0, 0], [0, 2, 2], [0, 0, 0]]
    assert int(m.confusion.sum()) == 3  # the local matrix is not modified


def _loop_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    pos = [i for i in range(len(scores)) if labels[i] > 0.5]
    if not pos:
        return math.nan
    precs = []
    for i in pos:
        above = [j for j in range(len(scores)) if scores[j] >= scores[i]]
        precs.append(sum(labels[j] > 0.5 for j in above) / len(above))
    return float(np.mean(precs))


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=12))
def test_average_precision_matches_loop(seed: int, m: int) -> None:
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=(m, 4)), 1)  # rounding creates ties
    labels = (rng.random((m, 4)) < 0.4).astype(np.float64)
    labels[:, 3] = 0.0  # a class without positives
    got = average_precision(torch.from_numpy(scores), torch.from_numpy(labels)).numpy()
    ref = np.array([_loop_ap(scores[:, c], labels[:, c]) for c in range(4)])
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got[~np.isnan(got)], ref[~np.isnan(ref)], rtol=1e-12)


def test_multilabel_metric_map_and_f1() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(20, 5))
    labels = (rng.random((20, 5)) < 0.5).astype(np.float32)
    labels[:, 4] = 0
    m = MultiLabelMetric(6)
    m.update(torch.from_numpy(scores[:8]).float(), torch.from_numpy(labels[:8]))
    m.update(torch.from_numpy(scores[8:]).float(), torch.from_numpy(labels[8:]))
    out = m.compute()
    ref_ap = [_loop_ap(scores[:, c].astype(np.float32).astype(np.float64), labels[:, c]) for c in range(5)]
    np.testing.assert_allclose(out["ap_per_class"][:4], ref_ap[:4], rtol=1e-9)
    assert math.isnan(out["ap_per_class"][4])
    assert out["map"] == pytest.approx(float(np.mean(ref_ap[:4])), rel=1e-9)
    f1_ref = []
    for c in range(5):
        tp = fp = fn = 0
        for i in range(20):
            p = 1.0 / (1.0 + math.exp(-float(np.float32(scores[i, c])))) > 0.5
            y = labels[i, c] > 0.5
            tp += p and y
            fp += p and not y
            fn += (not p) and y
        f1_ref.append(2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn > 0 else math.nan)
    np.testing.assert_allclose(out["f1_per_class"], f1_ref, rtol=1e-9)
    assert out["mean_f1"] == pytest.approx(float(np.nanmean(f1_ref)), rel=1e-9)


def test_multilabel_metric_probabilities_and_errors() -> None:
    m = MultiLabelMetric(3, from_logits=False)
    m.update(torch.tensor([[0.6, 0.4]]), torch.tensor([[1.0, 1.0]]))
    assert m.compute()["f1_per_class"] == [1.0, 0.0]
    with pytest.raises(ValueError):
        m.update(torch.zeros(1, 3), torch.zeros(1, 3))
    m.reset()
    assert math.isnan(m.compute()["map"])


def test_format_iou_table(tmp_path) -> None:
    text = format_iou_table([0.9221, math.nan, 0.5], ["bkg", "aero", "bicycle"], title="ECA (Ours)")
    lines = text.strip().split("\n")
    assert lines[0] == "| Class | ECA (Ours) |"
    assert lines[1] == "| --- | --- |"
    assert lines[2] == "| bkg | 92.2 |"
    assert lines[3] == "| aero | - |"
    assert lines[4] == "| bicycle | 50.0 |"
    assert lines[5] == "| mIoU | 71.1 |"
    with pytest.raises(ValueError, match="2 class names"):
        format_iou_table([0.1, 0.2, 0.3], ["a", "b"])
    out = tmp_path / "sub" / "table.md"
    write_iou_table(out, [0.5, 1.0], ["bkg", "aero"])
    assert out.read_text(encoding="utf-8").endswith("| mIoU | 75.0 |\n")
