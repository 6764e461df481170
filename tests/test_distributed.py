"""Multi-process training on the CPU (gloo): global batch semantics, no forward that only rank 0 runs in
training mode, validation and image logging on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from ecaseg.engine.config import load_config
from ecaseg.errors import ConfigError

TINY = ["train.max_iters=4", "train.val_interval=2", "train.ckpt_interval=2", "train.log_interval=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_gloo_processes_train_validate_and_log_images(tmp_path: Path) -> None:
    work = tmp_path / "run"
    overrides = [*TINY, "train.batch_size=4", "train.tensorboard=true", "data.num_workers=0"]
    code = textwrap.dedent(
        f"""
        import os, sys, torch
        torch.set_num_threads(1)
        from ecaseg.cli import main
        from ecaseg.engine.trainer import ECATrainer
        seen = []
        original = ECATrainer.train_step
        def spy(self, batch):
            seen.append(int(batch["image"].shape[0]))
            return original(self, batch)
        ECATrainer.train_step = spy
        rc = main(["train", "--config", "synthetic_tiny", *{overrides!r}, "--work-dir", {str(work)!r},
                   "--no-progress"])
        print("RANK", os.environ["RANK"], "BATCHES", seen, "RC", rc)
        sys.exit(rc)
        """
    )
    port = _free_port()
    procs = []
    for rank in range(2):
        ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        env = dict(
            os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", **ranks
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)  # a rank out of step would hang here
            outputs.append(out.decode())
    finally:
        for p in procs:
            p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, out[-3000:]
        # train.batch_size=4 is the global batch: 2 images per process and step
        assert f"RANK {rank} BATCHES [2, 2, 2, 2] RC 0" in out, out[-3000:]
    assert torch.load(work / "last.pth", map_location="cpu", weights_only=False)["iteration"] == 4
    assert list((work / "tensorboard").glob("events.*"))
    metrics = json.loads((work / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and "seg_miou" in metrics["final"]


def test_global_batch_must_divide_over_the_processes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ecaseg.engine.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "get_world_size", lambda: 3)
    cfg = load_config("synthetic_tiny", [*TINY, "train.batch_size=4"])
    with pytest.raises(ConfigError, match=r"train\.batch_size=4 is the global batch .* 3 processes"):
        trainer_module.ECATrainer(cfg, tmp_path, progress=False)


def test_image_logging_runs_the_network_in_eval_mode(tmp_path: Path) -> None:
    """Under DDP the decoder's SyncBatchNorm is a collective in training mode; rank 0 alone logs images."""
    from ecaseg.engine.trainer import ECATrainer

    cfg = load_config("synthetic_tiny", [*TINY, "train.tensorboard=false"])
    trainer = ECATrainer(cfg, tmp_path, progress=False)
    batches = iter(trainer._make_loader())
    batch = next(batches)
    step = trainer.train_step(batch)
    while step.pseudo is None:  # past the classifier warm-up
        batch = next(batches)
        step = trainer.train_step(batch)
    modes: list[bool] = []
    bns = [m for m in trainer.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns, "the decoder has BatchNorm"
    hooks = [m.register_forward_pre_hook(lambda mod, _in: modes.append(mod.training)) for m in bns]

    class Writer:
        def add_image(self, *args: Any, **kwargs: Any) -> None:
            pass

    trainer.net.train()
    try:
        trainer._log_images(Writer(), step, batch, 1)
    finally:
        for h in hooks:
            h.remove()
    assert modes and not any(modes)
    assert trainer.net.training  # restored
