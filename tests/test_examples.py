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
import torch

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


def test_gradcam_carm_example_feeds_pytorch_grad_cam_maps_to_carm() -> None:
    out = load("gradcam_carm").main(["--size", "64"])
    assert out.carm.shape == (2, 5, 8, 8)
    assert torch.isfinite(out.carm).all() and out.carm.min() >= 0 and out.carm.max() <= 1
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert torch.all(out.carm[:, 1:][labels == 0] == 0)  # unlabelled classes stay empty


def _test_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"_ecaseg_{name}", Path(__file__).resolve().parent / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_train_voc_example_trains_from_official_checkpoint_files(tmp_path: Path) -> None:
    """The VOC script end to end on the fixture layout, with checkpoint files in the official layouts (random
    values): NVlabs ``mit_b1.pth`` and DINO ``dino_deitsmall8_pretrain.pth``, two iterations at 64 pixels."""
    import torch

    from ecaseg.engine.trainer import load_checkpoint

    # the official-layout state-dict builders of the model tests
    models = _test_module("test_models")
    dino_tests = _test_module("test_dino_affinity")
    B1, official_mit_shapes, random_state = models.B1, models.official_mit_shapes, models.random_state
    _official_vit_state = dino_tests._official_vit_state

    voc = _fixture_voc(tmp_path)
    mit = tmp_path / "mit_b1.pth"
    torch.save(random_state(official_mit_shapes(B1["dims"], B1["depths"], B1["sr"])), mit)
    dino = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save(_official_vit_state(384, 12, 8, 28, seed=1), dino)
    work = tmp_path / "work"
    small = [
        "data.train_split=train",
        "data.crop_size=64",
        "data.resize_long=[64,64]",
        "data.num_workers=0",
        "train.max_iters=2",
        "train.batch_size=2",
        "train.cls_warmup_iters=1",
        "train.amp=none",
        "train.val_interval=2",
        "train.ckpt_interval=0",
        "train.tensorboard=false",
        "method.local_size=32",
        "method.cam_scales=[1.0]",
        "method.par_dilations=[1,2]",
        "method.par_iters=2",
        "eval.scales=[1.0]",
        "eval.crf=false",
    ]
    load("train_voc").main(
        ["--voc", str(voc), "--mit", str(mit), "--dino", str(dino), "--work-dir", str(work), *small]
    )
    ckpt = load_checkpoint(work / "last.pth")
    assert ckpt["iteration"] == 2
    assert ckpt["config"]["model"]["backbone_weights"] == str(mit)
    assert ckpt["config"]["model"]["dino_weights"] == str(dino)
    # the MiT weights in the trained model started from the file (patch embedding barely moves in 2 steps)
    start = torch.load(mit, weights_only=True)["patch_embed1.proj.weight"]
    trained = ckpt["model"]["backbone.patch_embed1.proj.weight"]
    assert torch.allclose(start, trained, atol=1e-2)


def test_multistage_refine_example_end_to_end(tmp_path: Path) -> None:
    """classifier -> IRN-style CAM files -> ecaseg refine -> supervised training on the PNGs -> val mIoU."""
    sizes = ["--num-train", "12", "--num-val", "4"]
    out = load("multistage_refine").main(
        ["--seeds", "0", "--out", str(tmp_path), "--iters", "2", "--cls-iters", "2", *sizes]
    )
    for method in ("threshold", "carm_par"):
        run = out["runs"]["seed0"][method]
        assert 0.0 <= run["pseudo_label_miou"] <= 1.0 and 0.0 <= run["seg_miou"] <= 1.0
        assert len(list((tmp_path / "seed0" / f"pseudo_{method}").glob("*.png"))) == 12
    assert (tmp_path / "multistage.json").is_file()
