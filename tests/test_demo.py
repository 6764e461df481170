"""``ecaseg demo --quick`` end to end: three trainings on the synthetic benchmark, report and figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ecaseg.cli import main


def test_quick_demo_writes_report_metrics_and_figures(tmp_path: Path) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    keys = {
        "cam_pseudo_miou",
        "carm_pseudo_miou",
        "seg_miou",
        "baseline_seg_miou",
        "supervised_seg_miou",
        "ratio",
        "seconds",
    }
    assert keys <= set(metrics)
    for key in keys - {"seconds", "ratio"}:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert math.isclose(metrics["ratio"], metrics["seg_miou"] / metrics["supervised_seg_miou"], rel_tol=1e-9)
    report = (tmp_path / "report.md").read_text()
    assert "seg_miou" in report and "| mIoU" in report
    for figure in ("panels.png", "per_class_iou.png"):
        assert (tmp_path / figure).stat().st_size > 1000, figure
