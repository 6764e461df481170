"""Work dirs: one run at a time, existing checkpoints never replaced by accident, stale temp files cleaned."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ecaseg.cli import main
from ecaseg.engine.workdir import LOCK_NAME, WorkDirLock, WorkDirLockedError, clean_stale_temp_files

TINY = ["train.max_iters=2", "train.val_interval=0", "train.ckpt_interval=0", "train.tensorboard=false"]


def _train(work: Path, *extra: str) -> int:
    return main(
        ["train", "--config", "synthetic_tiny", *TINY, "--work-dir", str(work), "--no-progress", *extra]
    )


def test_train_refuses_to_replace_a_checkpoint_without_resume_or_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "run"
    assert _train(work) == 0
    before = (work / "last.pth").read_bytes()
    capsys.readouterr()
    assert _train(work) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a checkpoint" in err and "--resume" in err
    assert (work / "last.pth").read_bytes() == before  # untouched
    stale = work / ".last.pth.k3j9.tmp"  # what a run killed while saving leaves behind
    stale.write_bytes(b"\0" * 64)
    assert _train(work, "--overwrite") == 0
    assert not stale.exists()
    assert not (work / LOCK_NAME).exists()  # released after the run


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "run"
    work.mkdir()
    lock = work / LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "since": "earlier"}))
    assert _train(work) == 2
    err = capsys.readouterr().err
    assert f"is in use by another run (pid {os.getppid()}" in err
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": "earlier"}))
    assert _train(work) == 0  # the process that left it is gone
    assert not lock.exists()


def test_lock_context_and_stale_temp_files(tmp_path: Path) -> None:
    with WorkDirLock(tmp_path):
        with pytest.raises(WorkDirLockedError, match="in use by another run"):
            WorkDirLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    stale = tmp_path / ".last.pth.x1y2.tmp"
    stale.write_bytes(b"\0" * 16)
    keep = tmp_path / "last.pth"
    keep.write_bytes(b"ckpt")
    assert clean_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and keep.exists()


def test_divergence_stops_the_run_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    work = tmp_path / "run"
    assert _train(work) == 0  # a good checkpoint at iteration 2
    good = torch.load(work / "last.pth", map_location="cpu", weights_only=False)
    capsys.readouterr()
    args = ["train.max_iters=6", "train.val_interval=0", "train.ckpt_interval=2", "train.tensorboard=false"]
    args += ["train.log_interval=1", "train.cls_warmup_iters=0", "optim.lr=1e30", "optim.warmup_iters=0"]
    code = main(
        [
            "train",
            "--config",
            "synthetic_tiny",
            *args,
            "--work-dir",
            str(work),
            "--overwrite",
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "training diverged: the loss became non-finite at iteration" in err, err
    assert f"the last good checkpoint is {work / 'last.pth'}" in err
    saved = torch.load(work / "last.pth", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert saved["iteration"] == good["iteration"]  # the first run's checkpoint, untouched


def test_ctrl_c_during_validation_stops_it_and_says_how_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import signal

    import ecaseg.engine.trainer as trainer_module

    seen: list[int] = []
    original = trainer_module.evaluate_wsss

    def interrupted(*args: object, **kwargs: object) -> dict[str, float]:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as validation starts
        stop = kwargs["should_stop"]
        assert callable(stop)

        def counting() -> bool:
            seen.append(1)
            return bool(stop())

        kwargs["should_stop"] = counting
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer_module, "evaluate_wsss", interrupted)
    work = tmp_path / "run"
    argv = ["train", "--config", "synthetic_tiny", "train.max_iters=4", "train.val_interval=2"]
    argv += ["train.ckpt_interval=0", "train.tensorboard=false", "data.synthetic_num_val=50"]
    assert main([*argv, "--work-dir", str(work), "--no-progress"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"interrupted at iteration 2; checkpoint {work / 'last.pth'}; resume with: ecaseg train" in err
    assert "--resume" in err and (work / "last.pth").is_file()
    assert len(seen) == 1  # validation stopped at its first image, not after 50


def test_os_errors_and_missing_devices_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert _train(blocker / "run") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(blocker) in err and "Traceback" not in err
    if not torch.cuda.is_available():
        work = tmp_path / "ok"
        assert _train(work) == 0
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint", str(work / "last.pth"), "--device", "cuda"]) == 2
        assert "no CUDA device is visible" in capsys.readouterr().err
        assert _train(tmp_path / "gpu", "train.device=cuda") == 2
        assert "no CUDA device is visible" in capsys.readouterr().err


def test_a_checkpoint_of_another_class_count_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "run"
    assert _train(work) == 0
    capsys.readouterr()
    assert _train(work, "data.synthetic_num_classes=4", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not match this run's (5 classes" in err, err


def test_the_checkpoint_is_written_before_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """0.1 validated first: a crash in validation lost the work of the interval."""
    import torch

    import ecaseg.engine.trainer as trainer_module

    def broken(*args: object, **kwargs: object) -> dict[str, float]:
        raise RuntimeError("validation failed")

    monkeypatch.setattr(trainer_module, "evaluate_wsss", broken)
    work = tmp_path / "run"
    argv = ["train", "--config", "synthetic_tiny", "train.max_iters=4", "train.val_interval=2"]
    argv += ["train.ckpt_interval=2", "train.tensorboard=false", "--work-dir", str(work), "--no-progress"]
    with pytest.raises(RuntimeError, match="validation failed"):
        main(argv)
    assert torch.load(work / "last.pth", map_location="cpu", weights_only=False)["iteration"] == 2


def test_the_library_trainer_refuses_to_replace_a_checkpoint_too(tmp_path: Path) -> None:
    from ecaseg.engine.config import load_config
    from ecaseg.engine.trainer import ECATrainer
    from ecaseg.errors import CheckpointError

    cfg = load_config("synthetic_tiny", TINY)
    ECATrainer(cfg, tmp_path, progress=False).train()
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        ECATrainer(cfg, tmp_path, progress=False)
    ECATrainer(cfg, tmp_path, overwrite=True, progress=False)  # explicit
    ECATrainer(cfg, tmp_path, resume=True, progress=False)
