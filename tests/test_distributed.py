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


def _launch(code: str, timeout: float = 300) -> list[tuple[int, str]]:
    """Run ``code`` in two gloo processes (``torchrun``'s environment); their exit codes and outputs."""
    port = _free_port()
    procs = []
    for rank in range(2):
        ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        env = dict(
            os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", **ranks
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(code)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)  # a rank out of step would hang here
            outputs.append(out.decode())
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def _cli_code(overrides: list[str], work: Path, prelude: str = "") -> str:
    """A rank's program: ``prelude`` (patches), ``ecaseg train`` on synthetic_tiny, exit with its code."""
    return (
        "import os, sys, torch\ntorch.set_num_threads(1)\nfrom ecaseg.cli import main\n"
        + textwrap.dedent(prelude)
        + f"\nrc = main(['train', '--config', 'synthetic_tiny', *{overrides!r}, '--work-dir', {str(work)!r},"
        + " '--no-progress'])\nprint('RANK', os.environ['RANK'], 'RC', rc)\nsys.exit(rc)\n"
    )


@pytest.mark.slow
def test_two_gloo_processes_train_validate_and_log_images(tmp_path: Path) -> None:
    work = tmp_path / "run"
    overrides = [*TINY, "train.batch_size=4", "train.tensorboard=true", "data.num_workers=0"]
    prelude = """
        from ecaseg.engine.trainer import ECATrainer
        seen = []
        original = ECATrainer.train_step
        def spy(self, batch):
            seen.append(int(batch["image"].shape[0]))
            return original(self, batch)
        ECATrainer.train_step = spy
        import atexit
        atexit.register(lambda: print("RANK", os.environ["RANK"], "BATCHES", seen))
        """
    results = _launch(_cli_code(overrides, work, prelude))
    for rank, (rc, out) in enumerate(results):
        assert rc == 0, out[-3000:]
        # train.batch_size=4 is the global batch: 2 images per process and step
        assert f"RANK {rank} RC 0" in out and f"RANK {rank} BATCHES [2, 2, 2, 2]" in out, out[-3000:]
    assert torch.load(work / "last.pth", map_location="cpu", weights_only=False)["iteration"] == 4
    assert list((work / "tensorboard").glob("events.*"))
    metrics = json.loads((work / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and "seg_miou" in metrics["final"]


#: the smallest two-process runs: 2 images per process and step, no loader workers
SHORT = ["train.batch_size=4", "data.num_workers=0", "train.log_interval=1"]


@pytest.mark.slow
def test_fully_supervised_bound_trains_under_ddp(tmp_path: Path) -> None:
    """The classifier gets no gradient in the fully supervised bound: DDP must not wait for it."""
    work = tmp_path / "sup"
    overrides = [
        *SHORT,
        "method.fully_supervised=true",
        "train.max_iters=3",
        "train.val_interval=0",
        "train.ckpt_interval=0",
    ]
    results = _launch(_cli_code(overrides, work))
    for rank, (rc, out) in enumerate(results):
        assert rc == 0 and f"RANK {rank} RC 0" in out, out[-3000:]
    ckpt = torch.load(work / "last.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 3


@pytest.mark.slow
def test_validation_with_fewer_images_than_processes(tmp_path: Path) -> None:
    """data.val_max_images=1 over 2 processes: rank 1 validates no image and still joins every gather."""
    work = tmp_path / "val"
    overrides = [
        *SHORT,
        "train.max_iters=2",
        "train.val_interval=2",
        "train.ckpt_interval=0",
        "data.val_max_images=1",
    ]
    results = _launch(_cli_code(overrides, work))
    for rank, (rc, out) in enumerate(results):
        assert rc == 0 and f"RANK {rank} RC 0" in out, out[-3000:]
    final = json.loads((work / "metrics.json").read_text())["final"]
    assert "seg_miou" in final and "cls_map" in final


@pytest.mark.slow
def test_every_rank_resumes_its_own_random_stream(tmp_path: Path) -> None:
    """After a resume each rank draws what it would have drawn without the interruption."""
    work = tmp_path / "rng"
    overrides = [*SHORT, "train.max_iters=4", "train.val_interval=0", "train.ckpt_interval=0"]
    code = f"""
        import os, torch
        torch.set_num_threads(1)
        from ecaseg.engine.config import load_config
        from ecaseg.engine.trainer import ECATrainer
        from ecaseg.utils.dist import init_distributed
        init_distributed()
        cfg = load_config("synthetic_tiny", {overrides!r})
        ECATrainer(cfg, {str(work)!r}, progress=False).train(until=2)
        uninterrupted = torch.rand(3).tolist()
        ECATrainer(cfg, {str(work)!r}, resume=True, progress=False)
        resumed = torch.rand(3).tolist()
        print("RANK", os.environ["RANK"], "SAME", resumed == uninterrupted, "DRAW", uninterrupted)
        torch.distributed.destroy_process_group()
        """
    results = _launch(code)
    draws = []
    for rank, (rc, out) in enumerate(results):
        assert rc == 0 and f"RANK {rank} SAME True" in out, out[-3000:]
        draws.append(out.split("DRAW")[1].splitlines()[0])
    assert draws[0] != draws[1]  # two streams, not rank 0's twice
    ckpt = torch.load(work / "last.pth", map_location="cpu", weights_only=False)
    assert len(ckpt["rng_per_rank"]) == 2


_NAN_ON_RANK_1 = """
    import ecaseg.engine.trainer as trainer_module
    original = trainer_module.classification_loss
    calls = []
    def nan_at_third_step(*args, **kwargs):
        loss = original(*args, **kwargs)
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 3:
            return loss * float("nan")
        return loss
    trainer_module.classification_loss = nan_at_third_step
    """

_SIGTERM_ON_RANK_1 = """
    import signal
    from ecaseg.engine.trainer import ECATrainer
    original = ECATrainer.train_step
    def step(self, batch):
        if os.environ["RANK"] == "1" and self.iteration == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)
    ECATrainer.train_step = step
    """


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prelude", "code", "message"),
    [
        (
            _NAN_ON_RANK_1,
            2,
            "training diverged: the loss became non-finite at iteration 3 on rank 1 (lr ",
        ),
        (_SIGTERM_ON_RANK_1, 130, "ecaseg train: interrupted at iteration 2; checkpoint "),
    ],
    ids=["non-finite-loss", "sigterm"],
)
def test_one_rank_stops_every_rank(tmp_path: Path, prelude: str, code: int, message: str) -> None:
    """A non-finite loss or a stop signal on rank 1 alone: both ranks stop at the same iteration with the
    same message and exit code, and the last good checkpoint (iteration 2) is kept."""
    work = tmp_path / "stop"
    overrides = [*SHORT, "train.max_iters=5", "train.val_interval=0", "train.ckpt_interval=2"]
    results = _launch(_cli_code(overrides, work, prelude))
    lines = []
    for rank, (rc, out) in enumerate(results):
        assert rc == code and f"RANK {rank} RC {code}" in out, out[-3000:]
        (line,) = [x for x in out.splitlines() if message in x]
        lines.append(line)
    assert lines[0] == lines[1]
    assert torch.load(work / "last.pth", map_location="cpu", weights_only=False)["iteration"] == 2


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
