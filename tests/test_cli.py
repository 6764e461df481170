"""The ``ecaseg`` command line end to end: train -> evaluate -> predict -> pseudo-labels -> visualize,
and the bad-input cases (one line on stderr, exit status 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ecaseg.cli import main

TINY = ["train.val_interval=4", "train.max_iters=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("run")
    assert main(["train", "--config", "synthetic_tiny", *TINY, "--work-dir", str(work), "--no-progress"]) == 0
    return work


def test_train_writes_checkpoint_log_and_metrics(trained: Path) -> None:
    assert (trained / "last.pth").is_file()
    assert (trained / "train.log").read_text().count("iter") >= 1
    metrics = json.loads((trained / "metrics.json").read_text())
    assert {"cam_miou", "cam_pseudo_miou", "carm_miou", "carm_pseudo_miou", "seg_miou", "cls_map"} <= set(
        metrics["final"]
    )
    assert not list(trained.glob("*.tmp")) and not list(trained.glob(".*.tmp"))


def test_evaluate_writes_metrics_json(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "metrics.json"
    code = main(["evaluate", "--checkpoint", str(trained / "last.pth"), "--flip", "--crf", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert {"miou", "per_class_iou", "pixel_accuracy", "class_names", "settings"} <= set(report)
    assert len(report["per_class_iou"]) == len(report["class_names"]) == 4
    assert report["settings"]["crf"] is True and report["settings"]["flip"] is True
    assert "| mIoU" in capsys.readouterr().out


def test_evaluate_runs_the_configs_protocol_and_flags_override_it(trained: Path, tmp_path: Path) -> None:
    ckpt = str(trained / "last.pth")
    out = tmp_path / "m.json"
    # no flags: the checkpoint config's eval section (synthetic: scales 0.75/1/1.25, mean, flip, CRF)
    assert main(["evaluate", "--checkpoint", ckpt, "--max-images", "2", "--out", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["scales"] == [0.75, 1.0, 1.25] and settings["merge"] == "mean"
    assert settings["flip"] is True and settings["crf"] is True and settings["resize_long"] == 0
    # --config voc carries AFA's protocol
    from ecaseg.engine.config import load_config

    voc = load_config("voc").eval
    assert (voc.scales, voc.merge, voc.resize_long, voc.flip, voc.crf) == (
        (1.0, 0.5, 0.75),
        "max",
        512,
        True,
        True,
    )
    # flags override single keys
    args = ["--scales", "1.0", "--merge", "max", "--resize-long", "64", "--no-flip", "--no-crf"]
    assert main(["evaluate", "--checkpoint", ckpt, "--max-images", "2", *args, "--out", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["scales"] == [1.0] and settings["merge"] == "max" and settings["resize_long"] == 64
    assert settings["flip"] is False and settings["crf"] is False


def test_predict_writes_palette_masks_and_overlays(trained: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(images / "a.png"), rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    cv2.imwrite(str(images / "b.jpg"), rng.integers(0, 255, (64, 40, 3), dtype=np.uint8))
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(trained / "last.pth"), str(images), "--out", str(out)]) == 0
    mask = Image.open(out / "a.png.png")
    assert mask.mode == "P" and mask.size == (53, 37)
    assert np.asarray(mask).max() < 4
    assert (out / "b.jpg.overlay.png").is_file()


def test_predict_never_loses_or_mixes_up_a_users_files(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(1)
    photos = tmp_path / "photos"
    for rel in ("a/img.png", "b/img.png", "img.png", "img.jpg", "x_overlay.png", "tiny.png", "banner.png"):
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        size = {"tiny.png": (16, 16), "banner.png": (12, 300)}.get(rel, (40, 48))
        cv2.imwrite(str(photos / rel), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    before = {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()}
    ckpt = ["predict", "--checkpoint", str(trained / "last.pth")]
    for out in (photos, photos / "pred"):  # the input folder itself, or a folder inside it
        assert main([*ckpt, str(photos), "--out", str(out)]) == 2
        assert "inside it" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main([*ckpt, str(photos), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (
        main(
            [
                *ckpt,
                str(photos / "a" / "img.png"),
                str(photos / "b" / "img.png"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "would both be written to" in capsys.readouterr().err
    out = tmp_path / "pred"
    assert main([*ckpt, str(photos), "--out", str(out), "--scales", "1.0", "--no-crf"]) == 0
    assert "wrote 7 predictions" in capsys.readouterr().out
    masks = sorted(str(p.relative_to(out)) for p in out.rglob("*.png") if not p.name.endswith(".overlay.png"))
    assert masks == ["a/img.png.png", "b/img.png.png", "banner.png.png", "img.jpg.png", "img.png.png",
                     "tiny.png.png", "x_overlay.png.png"]  # fmt: skip
    assert Image.open(out / "banner.png.png").size == (
        300,
        12,
    )  # thin and tiny images predicted at their size
    assert Image.open(out / "tiny.png.png").size == (16, 16)
    assert {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()} == before  # inputs untouched
    batched = tmp_path / "batched"  # same-size images batched, each label still written to its own file
    args = [*ckpt, str(photos), "--scales", "1.0", "--no-crf", "--batch-size", "3", "--out", str(batched)]
    assert main(args) == 0
    for mask in out.rglob("*.png"):
        expected = np.asarray(Image.open(mask))
        got = np.asarray(Image.open(batched / mask.relative_to(out)))
        assert got.shape == expected.shape and (got == expected).mean() > 0.999, mask
    assert main([*ckpt, str(photos), "--batch-size", "-1", "--out", str(tmp_path / "neg")]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_pseudo_labels_and_visualize(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "pseudo"
    code = main(
        ["pseudo-labels", "--checkpoint", str(trained / "last.pth"), "--split", "val", "--out", str(out)]
    )
    assert code == 0
    assert len(list((out / "cam").glob("*.png"))) == 4 and len(list((out / "carm").glob("*.png"))) == 4
    assert {"cam_pseudo_miou", "carm_pseudo_miou"} <= set(json.loads((out / "metrics.json").read_text()))
    figs = tmp_path / "figs"
    assert (
        main(["visualize", "--checkpoint", str(trained / "last.pth"), "--num", "2", "--out", str(figs)]) == 0
    )
    assert len(list(figs.glob("*.png"))) == 2


def test_bad_inputs_exit_2_with_one_line(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (
            [
                "train",
                "--config",
                "voc",
                "data.root=/nonexistent/VOCdevkit",
                "--work-dir",
                str(tmp_path / "w"),
            ],
            "nonexistent",
        ),
        (
            ["train", "--config", "synthetic_tiny", "method.kk=1", "--work-dir", str(tmp_path / "w")],
            "method.'kk'",
        ),
        (["evaluate", "--checkpoint", str(tmp_path / "none.pth")], "none.pth"),
        (["evaluate", "--checkpoint", str(trained / "last.pth"), "--config", "voc"], "model.backbone"),
    ]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    cases.append(
        (
            ["predict", "--checkpoint", str(trained / "last.pth"), str(broken), "--out", str(tmp_path)],
            "broken.png",
        )
    )
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if ": error: " in line]  # progress bars aside
        assert len(errors) == 1 and fragment in errors[0], (argv, err)
        assert "Traceback" not in err


def test_torchrun_two_processes_with_gloo(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "ecaseg.cli",
        "train",
        "--config",
        "synthetic_tiny",
        "train.max_iters=2",
        "train.val_interval=0",
        "--work-dir",
        str(tmp_path),
        "--no-progress",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "last.pth").is_file()
    assert len(list(tmp_path.glob("*.pth"))) == 1


def test_sigterm_writes_a_checkpoint_and_stops(tmp_path: Path) -> None:
    import signal
    import time

    cmd = [
        sys.executable,
        "-m",
        "ecaseg.cli",
        "train",
        "--config",
        "synthetic_tiny",
        "train.max_iters=100000",
        "train.val_interval=0",
        "train.ckpt_interval=0",
        "train.log_interval=1",
        "--work-dir",
        str(tmp_path),
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True
    )
    log = tmp_path / "train.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.exists() and "iter 2/" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    from ecaseg.engine.trainer import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "last.pth")
    assert 2 <= ckpt["iteration"] < 100000
    assert "signal" in log.read_text()


def test_tensorboard_scalars_and_image_panels(tmp_path: Path) -> None:
    code = main(
        [
            "train",
            "--config",
            "synthetic_tiny",
            "train.tensorboard=true",
            "train.val_interval=2",
            "train.max_iters=2",
            "--work-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"loss/total", "val/seg_miou", "val/cam_miou", "lr"} <= set(tags["scalars"])
    assert "train/panels" in tags["images"]


def test_folder_dataset_with_own_classes_and_no_masks_trains_and_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """classes.txt beside labels.csv names the classes; the val split is a held-out share; no masks."""
    root = tmp_path / "shop"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(3)
    rows = ["id,labels"]
    for i in range(10):
        cv2.imwrite(str(root / "images" / f"item_{i}.jpg"), rng.integers(0, 255, (72, 80, 3), dtype=np.uint8))
        rows.append(f"item_{i},{['widget', 'gadget', 'widget;gadget'][i % 3]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("widget\ngadget\n")
    data = [
        "data.dataset=folder",
        f"data.images_dir={root / 'images'}",
        f"data.labels_file={root / 'labels.csv'}",
        "data.val_fraction=0.2",
        "data.train_split=train",
        "data.val_split=val",
    ]
    work = tmp_path / "run"
    argv = ["train", "--config", "synthetic_tiny", *data, "train.max_iters=2", "train.val_interval=2"]
    argv += ["train.ckpt_interval=2", "--work-dir", str(work), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    ckpt = torch.load(work / "last.pth", map_location="cpu", weights_only=False)
    assert ckpt["class_names"] == ["background", "widget", "gadget"]
    final = json.loads((work / "metrics.json").read_text())["final"]
    assert "cls_map" in final and "seg_miou" not in final  # no masks: the classifier's figures only
    from ecaseg.engine.builders import build_dataset
    from ecaseg.engine.config import load_config

    cfg = load_config("synthetic_tiny", data)
    train_ids = set(build_dataset(cfg, "train", train=True).ids)
    val_ids = set(build_dataset(cfg, "val", train=False).ids)
    assert len(val_ids) == 2 and len(train_ids) == 8 and not train_ids & val_ids
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(work / "last.pth"), *data]) == 2
    assert "needs ground-truth masks" in capsys.readouterr().err
