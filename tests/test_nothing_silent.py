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


# --- tracebacks where one line is promised --------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.crop_size=-64", "data.crop_size must be >= 16, got -64"),
        (
            "method.cam_scales=[1.0,.inf]",
            "method.cam_scales must hold finite values in (0, 4], got [1.0, inf]",
        ),
        ("method.cam_scales=[1.0,0.01]", "shrink the data.crop_size=64 crops below 16 pixels"),
        ("data.resize_long=[512,256]", "data.resize_long must be [low, high] with low <= high"),
        ("data.scale_range=[0,0]", "data.scale_range must hold finite values in (0, 16], got [0.0, 0.0]"),
        ("method.par_dilations=[]", "method.par_dilations must not be empty"),
        ("model.decoder_dim=0", "model.decoder_dim must be >= 1, got 0"),
        ("model.strides=[4,2,0,1]", "model.strides must hold finite values >= 1, got [4, 2, 0, 1]"),
        ("optim.betas=[1.5,0.999]", "optim.betas must hold finite values in [0, 1), got [1.5, 0.999]"),
    ],
)
def test_config_values_are_range_checked_at_load(
    override: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["configs", "synthetic_tiny", override]) == 2
    assert fragment in _one_error(capsys)


def test_every_numeric_config_key_has_a_range() -> None:
    import typing
    from dataclasses import fields

    from ecaseg.engine.config import RANGES, Config

    numeric = set()
    for section in fields(Config):
        if section.name == "name":
            continue
        for f in fields(getattr(Config(), section.name)):
            tp = typing.get_type_hints(type(getattr(Config(), section.name)))[f.name]
            args = typing.get_args(tp) if typing.get_origin(tp) is tuple else (tp,)
            if any(a in (int, float) for a in args):
                numeric.add(f"{section.name}.{f.name}")
    assert numeric == set(RANGES), (numeric - set(RANGES), set(RANGES) - numeric)


def test_pretrain_dino_refuses_a_nan_learning_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["pretrain-dino", "--synthetic", "--out", str(tmp_path / "v.pth"), "--lr", "nan"]
    assert main(argv) == 2
    assert "DINOPretrainConfig.lr=nan is invalid: must be finite" in capsys.readouterr().err


def test_yaml_base_cycles_and_encodings_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\ntrain:\n  max_iters: 3\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    assert main(["configs", str(tmp_path / "a.yaml")]) == 2
    assert "its _base_ chain loops back to it" in _one_error(capsys)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("_base_: synthetic_tiny.yaml\nname: caf\xe9\n".encode("latin-1"))
    assert main(["configs", str(latin)]) == 2
    assert f"config file {latin} is not UTF-8 text (byte 0xe9 at position 37)" in _one_error(capsys)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf_base_: synthetic_tiny.yaml\nname: bom\n")
    assert main(["configs", str(bom)]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "bom"


def test_labels_class_and_id_files_utf8_with_or_without_bom(tmp_path: Path) -> None:
    from ecaseg.data.base import read_id_file
    from ecaseg.data.folder import parse_labels_file

    classes = tmp_path / "classes.txt"
    classes.write_bytes(b"\xef\xbb\xbfcat\ndog\n")
    assert resolve_class_names(classes) == ("background", "cat", "dog")
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"\xef\xbb\xbf2007_000032\n2007_000039\n")
    assert read_id_file(ids) == ["2007_000032", "2007_000039"]
    labels = tmp_path / "labels.csv"
    labels.write_bytes("id,labels\nchâteau,cat\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=f"labels file {labels} is not UTF-8 text \\(byte 0xe2"):
        parse_labels_file(labels, ("background", "cat"))
    ids.write_bytes("ch\xe2teau\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"id list .* is not UTF-8 text"):
        read_id_file(ids)


def test_eval_cam_alpha_is_gone_and_warned(tmp_path: Path) -> None:
    from ecaseg.engine.config import EvalConfig, load_config

    assert not hasattr(EvalConfig(), "cam_alpha")
    with pytest.warns(UserWarning, match="config key eval.cam_alpha is ignored: read by nothing"):
        load_config("synthetic_tiny", ["eval.cam_alpha=0.3"])


def test_devices_must_be_available(
    run: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work, _ = run
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    available = {"mps": mps is not None and mps.is_available(), "xpu": xpu is not None and xpu.is_available()}
    for name in ("meta", "mps", "xpu"):
        if available.get(name):
            continue
        assert main(["evaluate", "--checkpoint", str(work / "last.pth"), "--device", name]) == 2
        assert f"--device {name} is not available here (available: cpu" in _one_error(capsys)
    argv = ["train", "--config", "synthetic_tiny", "train.device=meta", "--work-dir", str(tmp_path / "w")]
    assert main(argv) == 2
    assert "train.device meta is not available here" in _one_error(capsys)
    from ecaseg.engine.doctor import run_doctor

    run_doctor("synthetic_tiny", ["train.device=meta"], time_steps=0)
    out = capsys.readouterr().out
    assert "fail  train.device: train.device meta is not available here" in out, out
    assert main(["pretrain-dino", "--synthetic", "--out", str(tmp_path / "v.pth"), "--device", "meta"]) == 2
    assert "DINOPretrainConfig.device meta is not available here" in capsys.readouterr().err


def test_checkpoints_of_the_wrong_kind_are_named(
    run: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work, data = run
    # a folder as --checkpoint
    assert main(["evaluate", "--checkpoint", str(work)]) == 2
    assert f"checkpoint {work} is a folder; give the checkpoint file, e.g. {work / 'last.pth'}" in _one_error(
        capsys
    )
    # a model-only checkpoint to --resume
    ckpt = torch.load(work / "last.pth", map_location="cpu", weights_only=False)
    model_only = {k: ckpt[k] for k in ("format", "config", "class_names", "model")}
    other = tmp_path / "other"
    other.mkdir()
    torch.save(model_only, other / "last.pth")
    argv = ["train", "--config", "synthetic_tiny", *data, "train.max_iters=3", "--work-dir", str(other)]
    assert main([*argv, "--resume", "--no-progress"]) == 2
    assert (
        "lacks the training state (optimizer, scheduler, iteration, rng): it holds a model only"
        in _one_error(capsys)
    )
    # a text file as backbone_weights, a training checkpoint as dino_weights
    text = tmp_path / "weights.txt"
    text.write_text("hello\n")
    assert main(["configs", "synthetic_tiny"]) == 0
    capsys.readouterr()
    argv = [
        "train",
        "--config",
        "synthetic_tiny",
        f"model.backbone_weights={text}",
        "--work-dir",
        str(tmp_path / "b"),
    ]
    assert main(argv) == 2
    assert f"{text} is not a weights file (a torch.save archive or .safetensors)" in _one_error(capsys)
    argv = ["train", "--config", "synthetic_tiny", f"model.dino_weights={work / 'last.pth'}"]
    assert main([*argv, "--work-dir", str(tmp_path / "d")]) == 2
    message = _one_error(capsys)
    assert f"{work / 'last.pth'} is an ecaseg training checkpoint" in message and "pretrain-dino" in message


def test_dataloader_worker_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder_dataset(tmp_path / "data")
    (tmp_path / "data" / "images" / "im1.png").write_bytes(b"\x89PNG not really")
    argv = ["train", "--config", "synthetic_tiny", *data, "data.num_workers=1", "train.max_iters=2"]
    assert main([*argv, "--work-dir", str(tmp_path / "w"), "--no-progress"]) == 2
    message = _one_error(capsys)
    assert message.startswith("ecaseg train: error: cannot decode image file"), message
    assert "(in DataLoader worker process 0)" in message and "Original Traceback" not in message


def test_crf_takes_bf16_probabilities_and_names_meta_tensors() -> None:
    from ecaseg.crf import crf_batch

    images = np.random.default_rng(0).integers(0, 255, (1, 3, 6, 6), dtype=np.uint8)
    probs = torch.rand(1, 2, 6, 6).softmax(1)
    bf16 = probs.bfloat16()
    assert torch.equal(crf_batch(images, bf16, num_workers=0), crf_batch(images, bf16.float(), num_workers=0))
    with pytest.raises(ValueError, match=r"a meta tensor \(1, 2, 6, 6\) holds no values"):
        crf_batch(images, torch.empty(1, 2, 6, 6, device="meta"), num_workers=0)


def test_ctrl_c_during_crf_workers_prints_no_worker_tracebacks(
    run: tuple[Path, list[str]], tmp_path: Path
) -> None:
    work, _ = run
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(400):
        cv2.imwrite(str(photos / f"{i:03d}.png"), rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    cmd = [sys.executable, "-m", "ecaseg.cli", "predict", "--checkpoint", str(work / "last.pth"), str(photos)]
    cmd += ["--out", str(tmp_path / "out"), "--crf", "--crf-workers", "2", "--scales", "1.0", "--no-flip"]
    # a test worker may ignore SIGINT, and children inherit that: give the command a terminal's default
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "out").glob("*.png")):
        time.sleep(0.1)
    # a terminal's Ctrl-C reaches the whole process group: the main process and its workers
    for pid in [proc.pid, *_children(proc.pid)]:
        os.kill(pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "ecaseg predict: interrupted" in err


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        pytest.skip("no /proc children list on this system")
    return [int(p) for p in text.split()]


# --- the demo's report, for a reader without the paper ------------------------------------------------------


def test_demo_report_explains_its_terms_and_the_panels_protocol() -> None:
    from ecaseg.engine.demo import METRIC_NAMES, _report

    metrics: dict[str, object] = {key: 0.5 for key in METRIC_NAMES}
    metrics.update(
        seed=0, quick=True, overrides=[], seconds=1.0, ratio=1.02, ratio_plain=0.9,
        protocol={"scales": [1.0], "merge": "max", "resize_long": 0, "flip": True, "crf": True},
    )  # fmt: skip
    results = {name: {"seg": {"per_class_iou": [0.5, 0.5]}} for name in ("eca", "baseline", "supervised")}
    report = _report(metrics, results, ["background", "disc"])
    assert "## Terms" in report
    for term in ("**CAM**", "**CARM**", "**PAR**", "**alpha**", "**pseudo-label**", "**mIoU**"):
        assert report.index(term) < report.index("## Targets"), term  # explained before it is used
    assert "It is a reference, not a ceiling" in report and "`ratio` can exceed 100 %" in report
    assert "no flip and no CRF (the `seg_miou_plain` protocol, not the headline's)" in report
    assert "Table 4's CAM column" not in report and "the L_seg target" not in report


def test_the_demo_folder_is_ignored_by_git() -> None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "check-ignore", "-q", "ecaseg_demo/report.md"], cwd=root, capture_output=True, check=False
    )
    assert out.returncode == 0, "ecaseg demo's default --out folder is not ignored by git"


def test_sighup_is_left_ignored_under_nohup() -> None:
    """``nohup ecaseg train ...`` ignores SIGHUP: the run must go on when the terminal closes."""
    from ecaseg.engine.trainer import ECATrainer

    trainer = ECATrainer.__new__(ECATrainer)
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        previous = trainer._install_signal_handlers()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.SIGHUP not in previous
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        previous = trainer._install_signal_handlers()
        assert signal.SIGHUP in previous and callable(signal.getsignal(signal.SIGHUP))
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    finally:
        signal.signal(signal.SIGHUP, old)


def test_demo_quick_help_states_the_measured_cpu_time(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "under 2 minutes" not in text  # the whole quick demo took 171 s with one thread, not under 120
    assert "171 s with one thread" in text
