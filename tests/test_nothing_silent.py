"""Issue 26 ("nothing silent, round two"): each case a hostile tester found on e644d41 is a correct result
or a one-line error that names the file, key or value."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ecaseg.cam import minmax_normalize
from ecaseg.carm import CARMGenerator
from ecaseg.cce_loss import cce_loss
from ecaseg.cli import main
from ecaseg.data import read_image
from ecaseg.data.folder import resolve_class_names
from ecaseg.dino_affinity import DINOAffinity
from ecaseg.dino_features import DINOFeatures
from ecaseg.errors import DatasetError
from ecaseg.par import PAR, par_refine
from ecaseg.prototypes import prototype_momentum_update

# --- case 3: the public blocks check dtypes and parameter ranges ----------------------------------------


def test_dino_affinity_refuses_uint8_images() -> None:
    dino = DINOAffinity("vit_nano_p8", allow_random_init=True)
    images = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"floating-point tensor, got torch.uint8; the ViT expects ImageNet"):
        dino(images)


def test_dino_features_refuses_a_float_grid() -> None:
    with pytest.raises(ValueError, match="grid must be \\(h, w\\) of integers"):
        DINOFeatures(keys=torch.zeros(1, 6, 8), cls_query=torch.zeros(1, 8), grid=(2.0, 3.0))  # type: ignore[arg-type]
    ok = DINOFeatures(keys=torch.zeros(1, 6, 8), cls_query=torch.zeros(1, 8), grid=(np.int64(2), 3))  # type: ignore[arg-type]
    assert ok.grid == (2, 3)


def test_par_refuses_integer_masks_and_bad_weights() -> None:
    images = torch.rand(1, 3, 6, 6)
    one_hot = torch.zeros(1, 2, 6, 6, dtype=torch.long)
    one_hot[:, 0, :3] = 1
    one_hot[:, 1, 3:] = 1
    with pytest.raises(TypeError, match=r"masks must be a floating-point tensor, got torch.int64"):
        PAR(dilations=(1,), num_iter=1)(images, one_hot)
    # the float one-hot map gives a non-zero refinement (what the integer map silently lost)
    assert float(par_refine(images, one_hot.float(), (1,), 1).sum()) > 0
    for w1, w2, key in (
        (0.0, 0.01, "w1"),
        (0.3, -1.0, "w2"),
        (float("nan"), 0.01, "w1"),
        (0.3, math.inf, "w2"),
    ):
        with pytest.raises(ValueError, match=f"PAR {key} .* must be a finite number"):
            PAR(w1=w1, w2=w2)
        with pytest.raises(ValueError, match=f"PAR {key}"):
            par_refine(images, one_hot.float(), (1,), 1, w1=w1, w2=w2)


def test_carm_gamma_must_be_a_cosine_threshold() -> None:
    for gamma in (5.0, 1.0, -1.5):
        with pytest.raises(ValueError, match=r"gamma thresholds cosine similarities .* \[-1, 1\)"):
            CARMGenerator(3, feature_dim=4, gamma=gamma)
    CARMGenerator(3, feature_dim=4, gamma=-1.0)  # every patch connected: allowed


def test_prototype_seeds_must_be_bool() -> None:
    protos, init = torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"seeds must be a bool mask .* got torch.float32"):
        prototype_momentum_update(protos, init, torch.randn(1, 5, 4), torch.full((1, 3, 5), 0.5), 0.9)


def test_minmax_normalize_of_integers_returns_fractions() -> None:
    out = minmax_normalize(torch.tensor([[[1, 3, 2]]]))
    assert out.dtype == torch.float32
    assert out.tolist() == [[[0.0, 1.0, 0.5]]]


def test_an_empty_batch_is_an_empty_result() -> None:
    dino = DINOAffinity("vit_nano_p8", allow_random_init=True)
    feats = dino(torch.zeros(0, 3, 16, 24))
    ref = dino(torch.zeros(1, 3, 16, 24))
    assert feats.keys.shape == (0, *ref.keys.shape[1:]) and feats.grid == ref.grid == (2, 3)
    assert feats.tokens is not None and feats.tokens.shape[0] == 0
    gen = CARMGenerator(3, feature_dim=ref.tokens.shape[-1]).eval()  # type: ignore[union-attr]
    out = gen(torch.zeros(0, 2, 4, 6), torch.zeros(0, 2), feats)
    assert out.carm.shape == (0, 3, 4, 6) and out.seeds.shape == (0, 3, 6) and out.seeds.dtype == torch.bool
    cams = torch.zeros(0, 1, 2, 2, 2, requires_grad=True)
    loss = cce_loss(cams, torch.zeros(0, 1, 5), torch.zeros(0, 8, 8, dtype=torch.long))
    assert loss.shape == () and float(loss.detach()) == 0.0
    loss.backward()  # the graph is kept: a training step on an empty batch does not crash


# --- case 2: class names that are numbers ------------------------------------------------------------------


def test_class_names_that_are_numbers_are_refused(tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("0\n1\n2\n3\n")
    with pytest.raises(DatasetError, match="class name '0' is a number: labels files read numbers as class"):
        resolve_class_names(classes)
    assert resolve_class_names(["class_0", "class_1"]) == ("background", "class_0", "class_1")


# --- case 6: JSON never holds NaN ----------------------------------------------------------------------


def test_json_holds_null_not_nan_with_a_warning() -> None:
    from ecaseg.utils.io import json_dumps_finite

    with pytest.warns(RuntimeWarning, match=r"metrics.json: 2 value\(s\) .* final.miou \(nan\)"):
        text = json_dumps_finite({"final": {"miou": float("nan")}, "h": [float("inf")]}, "metrics.json")
    assert json.loads(text) == {"final": {"miou": None}, "h": [None]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert json.loads(json_dumps_finite({"a": 1.5})) == {"a": 1.5}


# --- the command line: a tiny folder dataset with own classes and masks ---------------------------------


def _folder_dataset(root: Path, n: int = 6) -> list[str]:
    """``n`` images with masks of classes 1 (cat: left half) and/or 2 (dog: right half)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = ["id,labels"]
    for i in range(n):
        image = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        names = []
        if i % 3 != 2:
            image[8:40, 4:28] += 150
            mask[8:40, 4:28] = 1
            names.append("cat")
        if i % 3 != 0:
            image[24:56, 36:60, 2] = 250
            mask[24:56, 36:60] = 2
            names.append("dog")
        cv2.imwrite(str(root / "images" / f"im{i}.png"), image)
        cv2.imwrite(str(root / "masks" / f"im{i}.png"), mask)
        rows.append(f"im{i},{';'.join(names)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("cat\ndog\n")
    return [
        "data.dataset=folder",
        f"data.images_dir={root / 'images'}",
        f"data.labels_file={root / 'labels.csv'}",
        f"data.masks_dir={root / 'masks'}",
        "data.val_fraction=0.34",
        "data.train_split=train",
        "data.val_split=val",
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A finished 2-iteration run on the folder dataset (validation at its last iteration)."""
    root = tmp_path_factory.mktemp("shop")
    data = _folder_dataset(root / "data")
    work = root / "run"
    argv = ["train", "--config", "synthetic_tiny", *data, "train.max_iters=2", "train.val_interval=2"]
    assert main([*argv, "train.ckpt_interval=2", "--work-dir", str(work), "--no-progress"]) == 0
    return work, data


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_case1_reordered_classes_are_refused_on_resume_and_evaluate(
    run: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work, data = run
    swapped = tmp_path / "classes.txt"
    swapped.write_text("dog\ncat\n")
    other = [*data, f"data.classes_file={swapped}"]
    resume = ["train", "--config", "synthetic_tiny", *other, "train.max_iters=3", "--work-dir", str(work)]
    assert main([*resume, "--resume", "--no-progress"]) == 2
    message = _one_error(capsys)
    assert "index 1 is 'cat' in the checkpoint but 'dog' here" in message, message
    assert "give the classes in the checkpoint's order (cat, dog)" in message
    assert torch.load(work / "last.pth", weights_only=False)["class_names"] == ["background", "cat", "dog"]
    assert main(["evaluate", "--checkpoint", str(work / "last.pth"), *other, "--max-images", "1"]) == 2
    assert "index 2 is 'dog' in the checkpoint but 'cat' here" in _one_error(capsys)


def test_case5_resuming_a_finished_run_keeps_its_final_metrics(
    run: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    work, data = run
    before = json.loads((work / "metrics.json").read_text())
    assert before["final"] and "seg_miou" in before["final"]
    argv = ["train", "--config", "synthetic_tiny", *data, "train.max_iters=2", "train.val_interval=2"]
    assert main([*argv, "--work-dir", str(work), "--resume", "--no-progress"]) == 0
    after = json.loads((work / "metrics.json").read_text())
    assert after["final"] == before["final"]
    assert json.loads(capsys.readouterr().out)["seg_miou"] == before["final"]["seg_miou"]


def test_case4_pseudo_labels_never_mix_two_runs(
    run: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work, _ = run
    out = tmp_path / "pseudo"
    argv = ["pseudo-labels", "--checkpoint", str(work / "last.pth"), "--split", "val", "--out", str(out)]
    assert main([*argv, "--max-images", "1"]) == 0
    first = sorted(p.name for p in (out / "cam").glob("*.png"))
    assert len(first) == 1
    capsys.readouterr()
    assert main(argv) == 2
    message = _one_error(capsys)
    assert f"--out {out} holds an earlier run's pseudo-labels (cam, carm, metrics.json)" in message
    assert sorted(p.name for p in (out / "cam").glob("*.png")) == first


def test_case6_an_empty_held_out_split_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder_dataset(tmp_path / "data", n=1)
    argv = [
        "train",
        "--config",
        "synthetic_tiny",
        *data,
        "train.max_iters=1",
        "--work-dir",
        str(tmp_path / "w"),
    ]
    assert main(argv) == 2
    assert "has 1 labelled image(s): a held-out train split needs at least 2" in _one_error(capsys)


def test_failing_late_evaluate_out_is_checked_before_the_run(
    run: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the checkpoint does not exist either: the --out error comes first, before anything is loaded
    missing = str(tmp_path / "none.pth")
    assert main(["evaluate", "--checkpoint", missing, "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder; give a file name" in _one_error(capsys)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["evaluate", "--checkpoint", missing, "--out", str(blocker / "m.json")]) == 2
    assert f"{blocker} is a file, not a folder" in _one_error(capsys)


# --- case 7: predict --------------------------------------------------------------------------------------


def _corrupt_jpeg(path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    data = bytearray(cv2.imencode(".jpg", image)[1].tobytes())
    for i in range(len(data) // 2, len(data) // 2 + 40):
        data[i] = 0xFF if i % 2 else 0x00
    path.write_bytes(bytes(data))


def test_case7_a_corrupt_jpeg_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jpg"
    _corrupt_jpeg(path)
    with pytest.warns(RuntimeWarning, match=f"image file {path} is a damaged JPEG \\(libjpeg: Corrupt JPEG"):
        read_image(path)
    with pytest.raises(DatasetError, match=f"image file {path} is a damaged JPEG"):
        read_image(path, corrupt="error")


def test_case7_predict_follows_symlinks_and_stops_or_skips_bad_images(
    run: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work, _ = run
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    photos.mkdir()
    elsewhere.mkdir()
    image = np.random.default_rng(1).integers(0, 255, (40, 48, 3)).astype(np.uint8)
    cv2.imwrite(str(photos / "a.png"), image)
    cv2.imwrite(str(elsewhere / "b.png"), image)
    (photos / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(photos, target_is_directory=True)  # a loop back up
    _corrupt_jpeg(photos / "c.jpg")
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(work / "last.pth"), str(photos), "--out", str(out)]
    argv += ["--crf-workers", "0", "--no-crf", "--scales", "1.0", "--no-flip"]
    assert main(argv) == 2
    message = _one_error(capsys)
    assert f"{photos / 'c.jpg'} is a damaged JPEG" in message and "nothing was predicted" in message
    assert not out.exists()
    assert main([*argv, "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 undecodable image(s) (--skip-bad):" in captured.err
    assert str(photos / "c.jpg") in captured.err and "already searched" in captured.err
    assert (out / "a.png.png").is_file() and (out / "linked" / "b.png.png").is_file()
    assert not (out / "c.jpg.png").exists()


# --- case 8: SIGHUP and stale locks -------------------------------------------------------------------------


def test_case8_sighup_checkpoints_like_sigterm(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "ecaseg.cli",
        "train",
        "--config",
        "synthetic_tiny",
        "train.max_iters=100000",
    ]
    cmd += ["train.val_interval=0", "train.ckpt_interval=0", "train.log_interval=1"]
    cmd += ["--work-dir", str(tmp_path), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "train.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.exists() and "iter 2/" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    ckpt = torch.load(tmp_path / "last.pth", map_location="cpu", weights_only=False)
    assert 2 <= ckpt["iteration"] < 100000
    assert f"signal {int(signal.SIGHUP)} received" in log.read_text()
    assert not (tmp_path / ".ecaseg.lock").exists()


def test_case8_a_lock_whose_pid_was_reused_is_stale(tmp_path: Path) -> None:
    import socket

    from ecaseg.engine.workdir import LOCK_NAME, WorkDirLock, WorkDirLockedError, _start_time

    if _start_time(os.getpid()) is None:
        pytest.skip("no /proc start times on this system")
    lock = tmp_path / LOCK_NAME
    live = os.getppid()  # a live process that is not the lock's owner
    owner = {"host": socket.gethostname(), "pid": live, "since": "earlier"}
    lock.write_text(json.dumps({**owner, "start_time": _start_time(live)}))
    with pytest.raises(WorkDirLockedError, match=f"in use by another run \\(pid {live}"):
        WorkDirLock(tmp_path).acquire()
    lock.write_text(json.dumps({**owner, "start_time": _start_time(live) - 1}))  # pid reused since
    with WorkDirLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


# --- failing late: pretrain-dino checks its output and its images before the first iteration ---------------


def _pretrain_argv(images: Path, out: Path) -> list[str]:
    argv = ["pretrain-dino", "--images", str(images), "--out", str(out), "--no-progress", "--iters", "1"]
    argv += ["--image-size", "32", "--global-size", "16", "--local-size", "8", "--num-local", "1"]
    argv += ["--out-dim", "32", "--hidden-dim", "16", "--bottleneck-dim", "8", "--batch-size", "2"]
    return [*argv, "--device", "cpu", "--amp", "false"]


def test_failing_late_pretrain_dino_checks_out_and_images_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ecaseg.engine.dino_pretrain.loop as loop

    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    built: list[int] = []
    real_build = loop._build_nets
    monkeypatch.setattr(loop, "_build_nets", lambda *a: built.append(1) or real_build(*a))
    assert main(_pretrain_argv(images, tmp_path)) == 2  # --out is a folder
    err = capsys.readouterr().err
    assert f"dino-pretrain: error: out {tmp_path} is a folder; give a file name" in err, err
    out = tmp_path / "vit.pth"
    assert main(_pretrain_argv(images, out)) == 2
    err = capsys.readouterr().err
    assert f"cannot decode image file {images / 'broken.png'}" in err and "no training was started" in err
    assert not built and not out.exists()  # stopped before any network was built
    assert main([*_pretrain_argv(images, out), "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and out.is_file()
    assert "skipped 1 undecodable image(s) of 4:" in captured.err and "broken.png" in captured.err


# --- case 4: pseudo-labels of a split without image-level labels ------------------------------------------


def test_case4_pseudo_labels_refuse_a_split_without_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(
            str(root / "JPEGImages" / f"im{i}.jpg"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        )
        mask = np.zeros((64, 64), np.uint8)
        mask[10:40, 10:40] = 1 + i  # aeroplane, bicycle, bird
        cv2.imwrite(str(root / "SegmentationClass" / f"im{i}.png"), mask)
    (sets / "train.txt").write_text("im0\nim1\n")
    (sets / "val.txt").write_text("im2\n")
    (sets / "test.txt").write_text("im2\n")
    data = ["data.dataset=voc", f"data.root={root}", "data.train_split=train", f"data.cache_dir={tmp_path}"]
    work = tmp_path / "run"
    argv = ["train", "--config", "synthetic_tiny", *data, "train.max_iters=1", "train.val_interval=0"]
    assert main([*argv, "--work-dir", str(work), "--no-progress"]) == 0
    out = tmp_path / "pseudo"
    argv = [
        "pseudo-labels",
        "--checkpoint",
        str(work / "last.pth"),
        *data,
        "--split",
        "test",
        "--out",
        str(out),
    ]
    assert main(argv) == 2
    assert "split 'test' has no image-level labels (e.g. VOC test)" in _one_error(capsys)
    assert not out.exists()
