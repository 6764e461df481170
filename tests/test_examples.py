"""The examples run (the CARM plug-in step end to end; the VOC script on a fixture VOC layout)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_custom_carm_step_trains() -> None:
    history = load("custom_carm_step").main(["--steps", "2", "--device", "cpu"])
    assert len(history) == 2
    assert all(math.isfinite(v) for step in history for v in step.values())
    assert {"cls", "seg_cam", "seg_carm"} == set(history[0])


def _fixture_voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"2007_{i:06d}" for i in range(6)]
    for n, image_id in enumerate(ids):
        cv2.imwrite(
            str(voc / "JPEGImages" / f"{image_id}.jpg"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        )
        mask = np.zeros((40, 48), np.uint8)
        mask[10:30, 10:30] = 1 + n % 3
        cv2.imwrite(str(voc / "SegmentationClassAug" / f"{image_id}.png"), mask)
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[4:]) + "\n")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:4]) + "\n")
    return root / "VOCdevkit"


def test_train_voc_example_needs_the_checkpoints(tmp_path: Path) -> None:
    voc = _fixture_voc(tmp_path)
    module = load("train_voc")
    from ecaseg.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        module.main(["--voc", str(voc), "--mit", str(tmp_path / "mit_b1.pth"), "--dino", "x.pth"])
