"""``ecaseg doctor``: one line per check, non-zero exit on any failure, no traceback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from ecaseg.cli import main
from ecaseg.engine.doctor import run_doctor


def _fixture_voc(root: Path) -> Path:
    """The official VOC layout with 6 images (the helper of tests/test_examples.py)."""
    spec = importlib.util.spec_from_file_location(
        "_ecaseg_test_examples", Path(__file__).parent / "test_examples.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module._fixture_voc(root))


def _lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.strip().splitlines()


def test_missing_root_and_checkpoints_fail_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--config", "voc", "data.root=/missing"]) == 1
    lines = _lines(capsys)
    fails = [line for line in lines if line.startswith("fail")]
    assert [f.split(":")[0] for f in fails] == [
        "fail  data.root",
        "fail  model.backbone_weights",
        "fail  model.dino_weights",
    ]
    assert "/missing is not a folder" in fails[0] and "mit_b1.pth" in fails[1]
    assert any(line.startswith("ok    train.batch_size: global batch 8") for line in lines)
    assert lines[-1] == "doctor: FAILED (voc)"


def test_console_script_exits_non_zero_without_traceback(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ecaseg.cli", "doctor", "--config", "voc", "data.root=/missing"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stdout + out.stderr
    assert all(line.split()[0] in ("ok", "warn", "fail", "doctor:") for line in out.stdout.splitlines())


def test_fixture_voc_layout_counts_and_items(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _fixture_voc(tmp_path)
    (root / "VOC2012" / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        (root / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text()
    )
    code = run_doctor("voc", [f"data.root={root}"], time_steps=0)
    lines = _lines(capsys)
    assert code == 1  # the checkpoints are missing
    assert "warn  split train_aug: 4 images, the official split has 10582" in lines
    assert "warn  split val: 2 images, the official split has 1449" in lines
    assert "ok    split val items: 2 sampled items read" in lines


def test_a_corrupt_image_fails_the_items_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _fixture_voc(tmp_path)
    (root / "VOC2012" / "JPEGImages" / "2007_000005.jpg").write_bytes(b"not a jpeg")
    run_doctor("voc", [f"data.root={root}", "data.train_split=train"], time_steps=0)
    lines = _lines(capsys)
    assert any(line.startswith("fail  split val items: item 1:") for line in lines), lines


def test_a_runnable_config_passes_and_is_timed(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_doctor("synthetic_tiny", [], time_steps=1) == 0
    lines = _lines(capsys)
    assert any(line.startswith("ok    speed: ") and "for 4 iterations" in line for line in lines)
    assert lines[-1] == "doctor: all checks passed (synthetic_tiny)"
    assert run_doctor("synthetic_tiny", ["train.batch_size=0"]) == 1
    assert _lines(capsys)[0].startswith("fail  config: train.batch_size must be >= 1")
