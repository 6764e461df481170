"""ECATrainer: Table 4 switches, exact resume, checkpoints (CPU, tiny synthetic data and networks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ecaseg.engine.config import load_config
from ecaseg.engine.trainer import ECATrainer, load_checkpoint
from ecaseg.errors import CheckpointError, ConfigError

TINY = ["train.val_interval=0", "train.log_interval=1000"]


def _batch(trainer: ECATrainer) -> dict[str, object]:
    loader = trainer._make_loader()
    return next(iter(loader))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], {"cls", "seg_cam", "seg_carm", "cce", "aff", "total"}),
        (
            ["method.aff_source=cam", "method.use_carm_seg=false", "method.use_cce=false"],
            {"cls", "seg_cam", "aff", "total"},
        ),
        (["method.use_carm_seg=false", "method.use_cce=false"], {"cls", "seg_cam", "aff", "total"}),
        (["method.use_cam_seg=false", "method.use_cce=false"], {"cls", "seg_carm", "aff", "total"}),
        (["method.use_cce=false"], {"cls", "seg_cam", "seg_carm", "aff", "total"}),
        (["method.aff_source=none", "method.use_cce=false"], {"cls", "seg_cam", "seg_carm", "total"}),
        (["method.fully_supervised=true"], {"seg", "total"}),
    ],
)
def test_table4_switches_select_the_losses(tmp_path: Path, overrides: list[str], expected: set[str]) -> None:
    cfg = load_config("synthetic_tiny", [*TINY, "train.cls_warmup_iters=0", *overrides])
    trainer = ECATrainer(cfg, tmp_path, progress=False)
    step = trainer.train_step(_batch(trainer))
    assert set(step.losses) == expected
    assert all(torch.isfinite(v) for v in step.losses.values())
    uses_dino = "seg_carm" in expected or (cfg.method.aff_source == "carm" and "aff" in expected)
    assert (trainer.dino is not None) == uses_dino


def test_warmup_trains_the_classifier_only(tmp_path: Path) -> None:
    cfg = load_config("synthetic_tiny", [*TINY, "train.cls_warmup_iters=5"])
    trainer = ECATrainer(cfg, tmp_path, progress=False)
    decoder_before = {k: v.clone() for k, v in trainer.net.decoder.state_dict().items()}
    step = trainer.train_step(_batch(trainer))
    assert set(step.losses) == {"cls", "total"}
    for key, value in trainer.net.decoder.state_dict().items():
        assert torch.equal(value, decoder_before[key]), key


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    overrides = [*TINY, "train.max_iters=4", "train.cls_warmup_iters=1", "train.ckpt_interval=0"]
    cfg = load_config("synthetic_tiny", overrides)
    straight = ECATrainer(cfg, tmp_path / "a", progress=False)
    straight.train()

    first = ECATrainer(load_config("synthetic_tiny", overrides), tmp_path / "b", progress=False)
    first.train(until=2)
    assert load_checkpoint(tmp_path / "b" / "last.pth")["iteration"] == 2
    resumed = ECATrainer(
        load_config("synthetic_tiny", overrides), tmp_path / "b", resume=True, progress=False
    )
    assert resumed.iteration == 2
    resumed.train()
    assert resumed.iteration == 4
    for key, value in straight.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key
    assert straight.carm_generator is not None and resumed.carm_generator is not None
    for key, value in straight.carm_generator.state_dict().items():
        assert torch.equal(value, resumed.carm_generator.state_dict()[key]), key
    # the optimiser's moments and the schedule continue exactly too
    a_state, b_state = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert a_state.keys() == b_state.keys()
    for index in a_state:
        assert torch.equal(a_state[index]["exp_avg"], b_state[index]["exp_avg"]), index
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(
        CheckpointError, match=r"junk.pth is not a weights file .* it starts with b.not a checkpoint"
    ):
        load_checkpoint(junk)
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an ecaseg checkpoint"):
        load_checkpoint(tmp_path / "other.pth")


def test_real_runs_refuse_silent_random_backbones(tmp_path: Path) -> None:
    cfg = load_config("synthetic_tiny", [*TINY, "model.allow_random_backbone=false"])
    with pytest.raises(ConfigError, match="backbone_weights"):
        ECATrainer(cfg, tmp_path, progress=False)


def test_optimised_step_equals_plain_step_in_fp32(tmp_path: Path) -> None:
    """The compact PAR path (labelled channels only, shared refinements) changes no loss."""
    losses = []
    for compact in ("true", "false"):
        overrides = [*TINY, "train.cls_warmup_iters=0", "data.synthetic_num_classes=6"]
        cfg = load_config("synthetic_tiny", [*overrides, f"method.compact_par={compact}"])
        torch.manual_seed(0)
        trainer = ECATrainer(cfg, tmp_path / compact, progress=False)
        batch = _batch(trainer)
        assert int(batch["label"].sum(1).max()) < 6  # so that the compact path really gathers channels
        torch.manual_seed(1)
        losses.append(trainer.train_step(batch).losses)
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        assert torch.allclose(losses[0][key], losses[1][key], rtol=1e-5, atol=1e-6), key


def test_afa_baseline_switches_to_random_walk_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """voc_afa's decoder label: the CAM band label up to the switch, then AFA's propagated label."""
    afa = load_config("voc_afa")
    assert (afa.method.cam_seg_label, afa.method.rw_switch_iter, afa.method.use_cce) == (
        "afa_rw",
        6000,
        False,
    )
    cfg = load_config(
        "synthetic_tiny",
        [*TINY, "train.cls_warmup_iters=0", "method.aff_source=cam", "method.use_carm_seg=false",
         "method.use_cce=false", "method.cam_seg_label=afa_rw", "method.rw_switch_iter=1"],
    )  # fmt: skip
    trainer = ECATrainer(cfg, tmp_path, progress=False)
    calls: list[torch.Tensor] = []
    original = trainer.labeler.random_walk_label

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        label = original(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(label)
        return label

    monkeypatch.setattr(trainer.labeler, "random_walk_label", spy)
    batches = iter(trainer._make_loader())
    for _ in range(3):  # iterations 0 and 1 use the band label, iteration 2 the propagated one
        step = trainer.train_step(next(batches))
        assert torch.isfinite(step.losses["seg_cam"])
    assert len(calls) == 1
    label = calls[0]
    num_fg = trainer.net.num_classes - 1
    assert label.dtype == torch.long and set(label.unique().tolist()) <= set(range(num_fg + 1)) | {255}


def test_training_forward_cam_is_reused_only_when_exact(tmp_path: Path) -> None:
    """method.reuse_train_cam: auto reuses the training forward's CAM only for a reproducible backbone, and
    the reused step's losses equal those of the step that recomputes it."""
    from ecaseg.models import stochastic_layers

    base = [*TINY, "train.cls_warmup_iters=0", "method.cam_scales=[1.0,0.5]"]
    cfg = load_config("synthetic_tiny", base)
    trainer = ECATrainer(cfg, tmp_path / "default", progress=False)
    assert stochastic_layers(trainer.net.backbone)  # MiT's drop-path (0.1, as AFA's)
    assert not trainer.reuse_train_cam
    always = ECATrainer(
        load_config("synthetic_tiny", [*base, "method.reuse_train_cam=always"]),
        tmp_path / "a",
        progress=False,
    )
    assert always.reuse_train_cam

    losses, seen = [], []
    for rule in ("afa", "sum"):
        for reuse in ("auto", "never"):
            torch.manual_seed(0)
            cfg = load_config(
                "synthetic_tiny", [*base, f"method.reuse_train_cam={reuse}", f"method.cam_rule={rule}"]
            )
            trainer = ECATrainer(cfg, tmp_path / f"{rule}-{reuse}", progress=False)
            for name, module in list(trainer.net.backbone.named_modules()):
                if type(module).__name__ == "DropPath":  # a reproducible backbone: no drop-path
                    parent = trainer.net.backbone.get_submodule(name.rsplit(".", 1)[0])
                    setattr(parent, name.rsplit(".", 1)[1], torch.nn.Identity())
            trainer.reuse_train_cam = reuse == "auto" and not stochastic_layers(trainer.net.backbone)
            assert trainer.reuse_train_cam == (reuse == "auto")
            batch = _batch(trainer)
            images: list[int] = []
            forward_cam = trainer.net.forward_cam

            def spy(
                x: torch.Tensor, *a: object, _seen: list[int] = images, _cam: Any = forward_cam, **k: object
            ) -> torch.Tensor:
                _seen.append(x.shape[0])
                return _cam(x, *a, **k)  # type: ignore[no-any-return]

            trainer.net.forward_cam = spy  # type: ignore[method-assign]
            torch.manual_seed(1)
            losses.append(trainer.train_step(batch).losses)
            seen.append(sum(images))
    batch_size = 2
    assert seen[0] == seen[1] - batch_size and seen[2] == seen[3] - batch_size  # one pass fewer when reused
    for reused, plain in (losses[:2], losses[2:]):
        assert reused.keys() == plain.keys()
        for key in reused:
            torch.testing.assert_close(reused[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_with_another_number_of_processes_starts_new_streams(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The checkpoint keeps every rank's random state; a run of another size reseeds from (seed, it, rank)."""
    import numpy as np

    overrides = [*TINY, "train.max_iters=1", "train.cls_warmup_iters=1", "train.ckpt_interval=0"]
    cfg = load_config("synthetic_tiny", overrides)
    ECATrainer(cfg, tmp_path, progress=False).train()
    expected_same = torch.rand(3)
    ckpt = load_checkpoint(tmp_path / "last.pth")
    assert len(ckpt["rng_per_rank"]) == 1
    # a checkpoint of ecaseg before per-rank states (one "rng"): continued exactly by one process
    old = {k: v for k, v in ckpt.items() if k != "rng_per_rank"}
    torch.save(old, tmp_path / "old.pth")
    ECATrainer(cfg, tmp_path, resume=tmp_path / "old.pth", progress=False)
    assert torch.equal(torch.rand(3), expected_same)
    # as if two processes had written it: this single process cannot continue either stream exactly
    torch.save({**ckpt, "rng_per_rank": ckpt["rng_per_rank"] * 2}, tmp_path / "two.pth")
    with caplog.at_level("WARNING", logger="ecaseg.train"):
        ECATrainer(cfg, tmp_path, resume=tmp_path / "two.pth", progress=False)
    got = torch.rand(3)
    torch.manual_seed(int(np.random.SeedSequence([cfg.train.seed, 1, 0]).generate_state(1)[0]))
    assert torch.equal(got, torch.rand(3))
    assert "random state of 2 process(es) and this run has 1" in caplog.text


def test_fused_adamw_is_an_option_close_to_foreach(tmp_path: Path) -> None:
    """optim.fused: the same AdamW update as the default foreach implementation up to rounding."""
    nets = []
    for fused in ("false", "true"):
        cfg = load_config("synthetic_tiny", [*TINY, "train.cls_warmup_iters=1", f"optim.fused={fused}"])
        torch.manual_seed(0)
        trainer = ECATrainer(cfg, tmp_path / fused, progress=False)
        assert trainer.optimizer.defaults["fused"] is (True if fused == "true" else None)
        batch = _batch(trainer)
        torch.manual_seed(1)
        trainer.train_step(batch)
        nets.append(trainer.net.state_dict())
    for key, value in nets[0].items():
        assert torch.allclose(value, nets[1][key], rtol=1e-5, atol=1e-7), key


def test_tf32_option_sets_both_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    from ecaseg.engine.trainer import set_tf32

    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        set_tf32(False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
    assert load_config("synthetic_tiny", ["train.tf32=true"]).train.tf32 is True


def test_compile_option_compiles_the_training_par_only(tmp_path: Path) -> None:
    """train.compile: the training step's PAR is compiled (fixed sizes), validation's PAR stays eager."""
    cfg = load_config("synthetic_tiny", [*TINY, "train.compile=true"])
    trainer = ECATrainer(cfg, tmp_path, progress=False)
    assert isinstance(trainer._train_labeler.par, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.labeler.par is trainer.par and not isinstance(
        trainer.labeler.par, torch._dynamo.eval_frame.OptimizedModule
    )
    plain = ECATrainer(load_config("synthetic_tiny", TINY), tmp_path / "plain", progress=False)
    assert plain._train_labeler is plain.labeler
