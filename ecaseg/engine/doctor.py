"""``ecaseg doctor``: the pre-flight check of a training run, before 18k iterations are spent on it.

Takes the same ``--config`` and ``key=value`` overrides as ``ecaseg train`` and checks, one line each:
the config; the dataset root, its splits and their file counts against the official ones; a sample of
images, masks and image-level labels; that both checkpoint files load strictly into the configured
networks; the device; the global and per-process batch; and, where a GPU is present (or when asked),
a few timed training steps giving the peak memory and an estimate of the run's wall time. Any ``fail``
makes the command exit with status 1.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ecaseg.engine.builders import build_dataset, build_dino, build_model, needs_dino
from ecaseg.engine.config import Config, load_config, resolve_device
from ecaseg.errors import ConfigError, EcasegError

__all__ = ["OFFICIAL_SPLIT_SIZES", "Check", "run_doctor"]

Status = Literal["ok", "warn", "fail"]

#: ``(dataset, split) -> number of images`` of the official releases (REFERENCE.md).
OFFICIAL_SPLIT_SIZES: dict[tuple[str, str], int] = {
    ("voc", "train_aug"): 10582,
    ("voc", "val"): 1449,
    ("coco", "train"): 82081,
    ("coco", "val"): 40137,
}

#: How many images of each split are read back.
SAMPLE_SIZE = 8


@dataclass
class Check:
    """One line of the report."""

    status: Status
    name: str
    message: str

    def line(self) -> str:
        return f"{self.status:<5} {self.name}: {self.message}"


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _check_splits(cfg: Config, report: list[Check]) -> tuple[Any, int | None]:
    """Dataset root, splits, counts, a sample of items. Returns the training dataset and the class count."""
    d = cfg.data
    if d.dataset in ("voc", "coco") and not os.path.isdir(d.root):
        report.append(Check("fail", "data.root", f"{d.root} is not a folder (the {d.dataset} root)"))
        return None, None
    train_set = None
    num_classes: int | None = None
    for split, train in ((d.train_split, True), (d.val_split, False)):
        name = f"split {split}"
        try:
            dataset = build_dataset(cfg, split, train=train)
        except (EcasegError, OSError, ValueError) as err:
            report.append(Check("fail", name, _short(err)))
            continue
        n = len(dataset)  # type: ignore[arg-type]
        official = OFFICIAL_SPLIT_SIZES.get((d.dataset, split))
        if n == 0:
            report.append(Check("fail", name, "holds no images"))
            continue
        if official is not None and n != official:
            report.append(Check("warn", name, f"{n} images, the official split has {official}"))
        else:
            report.append(Check("ok", name, f"{n} images" + (" (official count)" if official else "")))
        k = int(getattr(dataset, "num_classes", 0) or 0) or None
        num_classes = num_classes or k
        bad = _sample_items(dataset, n, k)
        sample = f"{min(n, SAMPLE_SIZE)} sampled items"
        report.append(
            Check("fail", f"{name} items", bad) if bad else Check("ok", f"{name} items", f"{sample} read")
        )
        if train:
            train_set = dataset
    return train_set, num_classes


def _sample_items(dataset: Any, n: int, num_classes: int | None) -> str:
    """Read a spread of items; return what is wrong with the first bad one, or ``""``."""
    count = min(n, SAMPLE_SIZE)
    for i in sorted({round(j * (n - 1) / max(1, count - 1)) for j in range(count)}):  # first, last, between
        try:
            item = dataset[i]
        except Exception as err:  # an unreadable file, a bad label line, ...
            return f"item {i}: {_short(err)}"
        image = item.get("image")
        if not isinstance(image, torch.Tensor) or not bool(torch.isfinite(image).all()):
            return f"item {i}: the image is not a finite tensor"
        label = item.get("label")
        if isinstance(label, torch.Tensor) and not bool(((label == 0) | (label == 1)).all()):
            return f"item {i}: image-level labels are not 0/1"
        mask = item.get("mask")
        if isinstance(mask, torch.Tensor) and num_classes:
            values = torch.unique(mask)
            wrong = values[(values >= num_classes) & (values != 255)]
            if wrong.numel():
                classes = f"0..{num_classes - 1}"
                return f"item {i}: mask values {wrong.tolist()[:5]} are neither classes {classes} nor 255"
    return ""


def _check_weights(cfg: Config, num_classes: int, report: list[Check]) -> None:
    m = cfg.model
    try:
        build_model(cfg, num_classes, load_weights=True)
        if m.backbone_weights:
            report.append(
                Check(
                    "ok", "model.backbone_weights", f"{m.backbone_weights} loads strictly into {m.backbone}"
                )
            )
        else:
            report.append(
                Check("warn", "model.backbone_weights", "none: random weights (allow_random_backbone)")
            )
    except (EcasegError, OSError, RuntimeError, ValueError) as err:
        report.append(Check("fail", "model.backbone_weights", _short(err)))
    if not needs_dino(cfg):
        report.append(Check("ok", "model.dino_weights", "not needed by this config"))
        return
    try:
        build_dino(cfg)
        if m.dino_weights:
            report.append(Check("ok", "model.dino_weights", f"{m.dino_weights} loads strictly into {m.dino}"))
        else:
            report.append(
                Check("warn", "model.dino_weights", f"none: {m.dino} with packaged or random weights")
            )
    except (EcasegError, OSError, RuntimeError, ValueError, ConnectionError) as err:
        report.append(Check("fail", "model.dino_weights", _short(err)))


def _check_device(cfg: Config, report: list[Check]) -> torch.device | None:
    name = cfg.train.device
    try:
        device = resolve_device(name, "train.device")
    except ConfigError as err:
        report.append(Check("fail", "train.device", _short(err)))
        return None
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        gpu = torch.cuda.get_device_name(device)
        report.append(
            Check("ok", "train.device", f"{gpu}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
        )
    elif device.type != "cpu":
        report.append(Check("ok", "train.device", f"{device} (torch reports it available)"))
    else:
        if cfg.data.dataset in ("voc", "coco"):
            report.append(Check("warn", "train.device", "CPU (no GPU): a paper-scale run would take days"))
        else:
            report.append(Check("ok", "train.device", "CPU"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = cfg.train.batch_size
    if batch % world:
        report.append(
            Check("fail", "train.batch_size", f"global batch {batch} does not divide over {world} processes")
        )
    else:
        report.append(
            Check(
                "ok",
                "train.batch_size",
                f"global batch {batch} = {world} process(es) x {batch // world} images",
            )
        )
    return device


def _time_steps(cfg: Config, train_set: Any, device: torch.device, steps: int, report: list[Check]) -> None:
    from ecaseg.engine.trainer import ECATrainer

    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    timed = cfg.train.max_iters
    trial = load_config_like(
        cfg, ["train.tensorboard=false", "train.val_interval=0", "train.ckpt_interval=0"]
    )
    trial.train.batch_size = cfg.train.batch_size // world  # one process's share
    trial.train.cls_warmup_iters = 0  # time the full ECA step
    with tempfile.TemporaryDirectory() as work:
        try:
            trainer = ECATrainer(trial, work, train_dataset=train_set, progress=False)
            batches = iter(trainer._make_loader())
            trainer.train_step(next(batches))  # warm-up (allocations, kernels)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(next(batches))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            per_step = (time.perf_counter() - start) / steps
        except torch.cuda.OutOfMemoryError:
            report.append(
                Check("fail", "memory", f"out of memory at {trial.train.batch_size} images per process")
            )
            return
        except Exception as err:
            report.append(Check("fail", "training step", _short(err)))
            return
    total = per_step * timed
    human = (
        f"{total / 3600:.1f} h"
        if total >= 3600
        else f"{total / 60:.1f} min"
        if total >= 60
        else f"{total:.0f} s"
    )
    line = f"{per_step:.3f} s per step -> about {human} for {timed} iterations (no validation)"
    report.append(Check("ok", "speed", line))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        status: Status = "ok" if peak < 0.9 * total else "warn"
        report.append(Check(status, "memory", f"peak {peak:.1f} of {total:.1f} GiB per process"))


def load_config_like(cfg: Config, overrides: list[str]) -> Config:
    """A copy of ``cfg`` with ``overrides`` applied."""
    from ecaseg.engine.config import apply_overrides, config_from_dict, config_to_dict

    return apply_overrides(config_from_dict(config_to_dict(cfg)), overrides)


def run_doctor(
    config: str,
    overrides: list[str],
    *,
    time_steps: int | None = None,
    printer: Callable[[str], None] = print,
) -> int:
    """Run the checks, print one line each, and return the exit status (1 if any failed, else 0).

    Args:
        config: Config name or YAML path (as ``ecaseg train --config``).
        overrides: ``section.key=value`` strings.
        time_steps: Timed training steps; ``None`` times 3 steps on a GPU and none on the CPU, 0 skips.
        printer: Where the lines go.
    """
    report: list[Check] = []

    def flush() -> None:
        for check in report:
            printer(check.line())
        report.clear()

    try:
        cfg = load_config(config, overrides)
    except EcasegError as err:
        printer(Check("fail", "config", _short(err)).line())
        return 1
    printer(Check("ok", "config", f"{cfg.name}: {cfg.data.dataset}, {cfg.train.max_iters} iterations").line())
    failed = False
    train_set, num_classes = _check_splits(cfg, report)
    failed |= any(c.status == "fail" for c in report)
    flush()
    k = num_classes or {"voc": 21, "coco": 81}.get(cfg.data.dataset, cfg.data.synthetic_num_classes + 1)
    _check_weights(cfg, k, report)
    device = _check_device(cfg, report)
    failed |= any(c.status == "fail" for c in report)
    flush()
    steps = (3 if device is not None and device.type == "cuda" else 0) if time_steps is None else time_steps
    if steps > 0 and not failed and device is not None:
        _time_steps(cfg, train_set, device, steps, report)
        failed |= any(c.status == "fail" for c in report)
        flush()
    elif steps > 0:
        printer(Check("warn", "speed", "not timed: fix the failures above first").line())
    elif device is not None and device.type != "cuda":
        printer(Check("warn", "speed", "not timed on the CPU (pass --time-steps N to time N steps)").line())
    printer(f"doctor: {'FAILED' if failed else 'all checks passed'} ({config})")
    return 1 if failed else 0
