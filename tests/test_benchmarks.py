"""The diagnostic benchmark scripts run end to end on tiny settings and write their records."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--threads", "1", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("backbone", ["mit_nano", "timm:test_resnet"])
def test_classifier_probe(tmp_path: Path, backbone: str) -> None:
    out = _run(
        "classifier_probe.py",
        "--backbone",
        backbone,
        "--iters",
        "3",
        "--every",
        "2",
        "--num-train",
        "8",
        "--num-val",
        "6",
        "--results-dir",
        str(tmp_path),
    )
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [entry["iter"] for entry in lines] == [2, 3]
    (path,) = tmp_path.glob("classifier-probe-*.json")
    payload = json.loads(path.read_text())
    assert payload["settings"]["backbone"] == backbone and payload["torch"]
    figures = payload["figures"]
    assert 0.0 <= figures["final_val_map"] <= 1.0 and figures["parameters_m"] > 0.1


def test_carm_oracle_reports_every_cue(tmp_path: Path) -> None:
    out = _run("carm_oracle.py", "--num-images", "4", "--gammas", "0.9", "--results-dir", str(tmp_path))
    (path,) = tmp_path.glob("carm-oracle-head-train-*.json")
    figures = json.loads(path.read_text())["figures"]
    for cue in ("1", "0", "contrast", "gt"):
        assert 0.0 <= figures[f"carm_miou_gamma0.9_cue{cue}"] <= 1.0, cue
    assert 0.0 <= figures["contrast_cue_auc"] <= 1.0
    assert "contrast_cue_auc" in out


def test_afa_rules_compares_merge_cam_rule_and_par_input(tmp_path: Path) -> None:
    from ecaseg.cli import main

    work = tmp_path / "run"
    argv = ["train", "--config", "synthetic_tiny", "train.max_iters=2", "train.val_interval=0"]
    assert main([*argv, "--work-dir", str(work), "--no-progress"]) == 0
    _run(
        "afa_rules.py",
        "--checkpoint",
        str(work / "last.pth"),
        "--max-images",
        "2",
        "--results-dir",
        str(tmp_path),
    )
    (path,) = tmp_path.glob("afa-rules-cpu-*.json")
    figures = json.loads(path.read_text())["figures"]
    assert set(figures["merge"]) == {"max", "max_crf", "mean", "mean_crf", "pixels_changed"}
    assert set(figures["cam_rule_x_par_input"]) == {"sum/scores", "sum/softmax", "afa/scores", "afa/softmax"}
    assert all(0.0 <= v["cam_pseudo_miou"] <= 1.0 for v in figures["cam_rule_x_par_input"].values())


def test_compare_runs_two_trees_interleaved(tmp_path: Path) -> None:
    """benchmarks/compare.py against this tree's own HEAD: both workers import their own tree, and the
    CARM outputs of identical code agree exactly."""
    root = BENCH.parent
    if not (root / ".git").exists():
        pytest.skip("needs a git checkout (it makes a worktree of the older commit)")
    out = _run("compare.py", "--base", "HEAD", "--parts", "carm", "--rounds", "1", "--repeats", "1",
               "--results-dir", str(tmp_path))  # fmt: skip
    (path,) = tmp_path.glob("compare-*.json")
    payload = json.loads(path.read_text())
    figures = payload["figures"]
    assert figures["carm_n1024"]["max_abs_diff"] == 0.0 and figures["carm_n4096"]["base_ms"] > 0
    assert len(payload["settings"]["samples"]["base"]["carm_n1024"]) == 1
    assert "round 1/1 done" in out


def test_ablation_rows_table_and_resume(tmp_path: Path) -> None:
    """benchmarks/ablation.py on a tiny budget: one result per row and seed, NaN-safe summary (the baseline
    has no CARM figure), the markdown table, and a second call keeps the finished runs."""
    tiny = ["train.max_iters=3", "train.cls_warmup_iters=1", "data.synthetic_num_train=8",
            "data.synthetic_num_val=4"]  # fmt: skip
    args = ["--rows", "baseline,demo", "--seeds", "0", "--out", str(tmp_path / "out"), "--results-dir",
            str(tmp_path), *tiny]  # fmt: skip
    proc = subprocess.run([sys.executable, str(BENCH / "ablation.py"), *args], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("ablation-*.json")
    figures = json.loads(path.read_text())["figures"]
    assert {r["row"] for r in figures["runs"]} == {"baseline", "demo"}
    assert math.isnan(figures["summary"]["baseline"]["carm_pseudo"]["mean"])  # no CARM in the baseline
    assert 0.0 <= figures["summary"]["demo"]["seg"]["mean"] <= 1.0
    assert "| baseline |" in (tmp_path / "out" / "ablation.md").read_text()
    again = subprocess.run([sys.executable, str(BENCH / "ablation.py"), *args], capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0 and again.stdout.count("kept") == 2


def test_ablation_row_groups_and_tag() -> None:
    """``--rows differences``: demo_v1 is the demo before the paper's settings, and each demo_v1_* row moves
    exactly the settings it names to the paper config's values."""
    sys.path.insert(0, str(BENCH))
    import ablation

    from ecaseg.engine.config import load_config

    assert set(ablation.TABLE4_ROWS) | set(ablation.DIFFERENCE_ROWS) == set(ablation.ROWS)
    paper = load_config("voc")

    def changes(a: str, b: str) -> dict[tuple[str, str], object]:
        ca, cb = ablation.row_config(a, 0, True, []), ablation.row_config(b, 0, True, [])
        return {
            (sec, key): value
            for sec in ("method", "model")
            for key, value in vars(getattr(cb, sec)).items()
            if getattr(getattr(ca, sec), key) != value
        }

    def paper_value(sec: str, key: str) -> object:
        return getattr(getattr(paper, sec), key)

    # the demo has the paper's PAR, radius and decoder width; demo_v1 sets them back
    back = changes("demo", "demo_v1")
    assert {key for _, key in back} == {
        "par_dilations", "par_iters", "par_downsample", "aff_radius", "decoder_dim"
    }  # fmt: skip
    assert all(value != paper_value(sec, key) for (sec, key), value in back.items())
    expected = {
        "demo_v1_msc": {"cam_scales"},
        "demo_v1_par": {"par_dilations", "par_iters", "par_downsample"},
        "demo_v1_radius8": {"aff_radius"},
        "demo_v1_dec256": {"decoder_dim"},
    }
    for row, keys in expected.items():
        moved = changes("demo_v1", row)
        assert {key for _, key in moved} == keys, row
        assert all(value == paper_value(sec, key) for (sec, key), value in moved.items()), row
    moved = changes("demo", "demo_msc")
    assert {key for _, key in moved} == {"cam_scales"}
    assert all(value == paper_value(sec, key) for (sec, key), value in moved.items())


def test_refine_benchmark_rows_and_record(tmp_path: Path) -> None:
    """benchmarks/refine.py on two sources, 6 val images, a 3-iteration classifier: every row, a record."""
    out = _run(
        "refine.py",
        *("--seeds", "0", "--sources", "cam,gradcam", "--cls-iters", "3", "--max-images", "6"),
        *("--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path)),
    )
    assert "| cam |" in out and "| gradcam |" in out
    record = json.loads(next(tmp_path.glob("refine-cpu-*.json")).read_text())
    summary = record["figures"]["summary"]
    for source in ("cam", "gradcam"):
        for method in ("threshold", "crf", "par", "random_walk", "carm", "carm_par", "carm_crf"):
            assert 0.0 <= summary[source][method]["miou_mean"] <= 100.0
    # the CAM files were written IRN-style and read back
    assert len(list((tmp_path / "work" / "cams_cam_seed0").glob("*.npy"))) == 6


def test_refine_speed_dry_run(tmp_path: Path) -> None:
    out = _run(
        "refine_speed.py", "--size", "32", "--batch-size", "2", "--reps", "1", "--results-dir", str(tmp_path)
    )
    record = json.loads(next(tmp_path.glob("refine-speed-cpu-*.json")).read_text())
    assert record["figures"]["carm_ms_per_image"] > 0 and "carm_par_images_per_s" in out


def test_loader_benchmark_times_both_paths(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_loader.py"),
            "--images",
            "2",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("loader-cpu-*.json")
    figures = json.loads(path.read_text())["figures"]
    assert figures["before_ms_per_sample"]["median"] > 0 and figures["speedup"] > 0


@pytest.mark.slow
def test_gpu_check_dry_runs_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py, prepared for a lent GPU, runs every part at a tiny size on the CPU."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("gpu-check-cpu-*.json")
    figures = json.loads(path.read_text())["figures"]
    for part in ("steps", "host_syncs", "par", "ddp", "inference"):
        assert "error" not in figures[part], figures[part]
    for precision in ("fp32", "fp32_tf32", "bf16"):
        assert figures["steps"][f"eca_{precision}"]["step_ms"]["median_ms"] > 0
        assert figures["steps"][f"eca_over_afa_{precision}"] > 0
    assert figures["par"]["max_abs_diff"] < 1e-4
    assert figures["ddp"]["gloo"]["ok"]
    assert figures["inference"]["images_per_s"] > 0 and figures["inference"]["crf_images_per_s"] > 0


def test_crf_speed_records_both_backends(tmp_path: Path) -> None:
    from ecaseg.crf import pydensecrf_available

    args = ["--height", "30", "--width", "40", "--classes", "3", "--repeats", "1", "--batch", "2"]
    _run("crf_speed.py", *args, "--results-dir", str(tmp_path))
    (path,) = tmp_path.glob("crf-cpu-*.json")
    payload = json.loads(path.read_text())
    figures = payload["figures"]
    assert figures["torch_ms_per_image"]["median_ms"] > 0 and payload["settings"]["classes"] == 3
    if pydensecrf_available():
        assert figures["label_agreement"] >= 0.99 and figures["pydensecrf_ms_per_image"]["median_ms"] > 0


def test_crf_agreement_evaluates_a_checkpoint_with_both_backends(tmp_path: Path) -> None:
    from ecaseg.cli import main
    from ecaseg.crf import pydensecrf_available

    if not pydensecrf_available():
        pytest.skip("pydensecrf is not installed")
    work = tmp_path / "run"
    argv = ["train", "--config", "synthetic_tiny", "train.max_iters=2", "train.val_interval=0"]
    assert main([*argv, "--work-dir", str(work), "--no-progress"]) == 0
    _run("crf_agreement.py", "--checkpoint", str(work / "last.pth"), "--max-images", "2",
         "--results-dir", str(tmp_path))  # fmt: skip
    (path,) = tmp_path.glob("crf-agreement-cpu-*.json")
    figures = json.loads(path.read_text())["figures"]
    assert figures["images"] == 2 and figures["label_agreement"] >= 0.99
    assert abs(figures["miou_difference"]) <= 0.003
