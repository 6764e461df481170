"""``ecaseg demo --quick`` end to end: three trainings on the synthetic benchmark, report and figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ecaseg.cli import main
from ecaseg.engine.demo import demo_configs
from ecaseg.errors import ConfigError


def test_quick_demo_writes_report_metrics_and_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].endswith(f"the full report: {tmp_path / 'report.md'}")  # not a JSON dump
    assert sum(line.startswith(("met", "NOT met")) for line in out) == 3
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    keys = {
        "cam_pseudo_miou",
        "carm_pseudo_miou",
        "seg_miou",
        "baseline_seg_miou",
        "supervised_seg_miou",
        "ratio",
        "seconds",
        "seg_miou_plain",
        "baseline_seg_miou_plain",
        "supervised_seg_miou_plain",
        "ratio_plain",
    }
    assert keys <= set(metrics)
    for key in keys - {"seconds", "ratio", "ratio_plain"}:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert math.isclose(metrics["ratio"], metrics["seg_miou"] / metrics["supervised_seg_miou"], rel_tol=1e-9)
    assert math.isclose(
        metrics["ratio_plain"],
        metrics["seg_miou_plain"] / metrics["supervised_seg_miou_plain"],
        rel_tol=1e-9,
    )
    # the paper's inference protocol of the synthetic config, recorded with the figures
    assert metrics["protocol"] == {
        "scales": [0.75, 1.0, 1.25],
        "merge": "mean",
        "resize_long": 0,
        "flip": True,
        "crf": True,
    }
    # the two protocols are two evaluations (equal figures would mean the protocol was ignored)
    for prefix in ("", "baseline_", "supervised_"):
        assert metrics[f"{prefix}seg_miou"] != metrics[f"{prefix}seg_miou_plain"], prefix
    report = (tmp_path / "report.md").read_text()
    assert "seg_miou" in report and "| mIoU" in report
    assert (
        "## Targets" in report and "CARM pseudo-label: the CARM label after PAR" in report
    )  # names explained
    assert "(IoU %)" in report
    for figure in ("panels.png", "per_class_iou.png"):
        assert (tmp_path / figure).stat().st_size > 1000, figure


def test_demo_overrides_reach_all_three_runs() -> None:
    configs = demo_configs(
        3, quick=True, overrides=["model.backbone=timm:test_resnet", "model.attn_blocks=1"]
    )
    assert set(configs) == {"eca", "baseline", "supervised"}
    for cfg in configs.values():
        assert (cfg.model.backbone, cfg.model.attn_blocks, cfg.data.synthetic_seed) == (
            "timm:test_resnet",
            1,
            3,
        )
    # what sets the runs apart still applies on top of the overrides
    assert configs["supervised"].method.fully_supervised and not configs["eca"].method.fully_supervised
    assert not configs["baseline"].method.use_cce
    # the baseline's decoder learns from CAM pseudo-labels even where ECA's learns from CARM's only
    assert configs["baseline"].method.use_cam_seg and not configs["baseline"].method.use_carm_seg
    assert not configs["eca"].method.use_cam_seg and configs["eca"].method.use_carm_seg
    with pytest.raises(ConfigError, match=r"method\.fg_cue"):
        demo_configs(0, quick=True, overrides=["method.fg_cue=maybe"])


def test_demo_cli_refuses_bad_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path), "method.gamma=high"]) != 0
    assert "method.gamma" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def test_demo_refuses_the_pretraining_source_seed() -> None:
    with pytest.raises(ConfigError, match="seed 1000 is the benchmark seed the packaged encoder"):
        demo_configs(1000, quick=True)
    configs = demo_configs(
        1000,
        quick=True,
        overrides=[
            "model.backbone_weights=",
            "model.backbone=mit_nano",
            "model.attn_blocks=2",
            "model.allow_random_backbone=true",
        ],
    )
    assert configs["eca"].model.backbone == "mit_nano"


def test_panels_have_titles_ground_truth_and_a_legend() -> None:
    import torch

    from ecaseg.engine.pseudo import PseudoLabels
    from ecaseg.engine.visualize import training_panels

    images = torch.zeros(2, 3, 32, 32)
    label = torch.zeros(2, 32, 32, dtype=torch.long)
    pseudo = PseudoLabels(
        cams=torch.rand(2, 2, 4, 4), cam_label=label, carm=torch.rand(2, 3, 4, 4), carm_label=label
    )
    plain = training_panels(images, pseudo, label, 2)
    full = training_panels(images, pseudo, label, 2, masks=label, class_names=["background", "cat", "dog"])
    assert full.shape[1] == plain.shape[1] + 32 + 4  # one more column: the ground truth
    assert full.shape[0] > plain.shape[0]  # the legend band below
    title_band = full[:18]  # a white band with dark text (the images below are grey, not white)
    assert (title_band == 255).all(axis=-1).mean() > 0.5 and (title_band < 128).any()
    legend = full[-20:]
    assert (legend == 255).all(axis=-1).mean() > 0.5  # the legend band, white with swatches
