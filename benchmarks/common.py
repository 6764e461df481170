"""Shared helpers of the benchmark scripts: timing with proper synchronisation and result records."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch

from ecaseg.utils.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"

#: The training-step variants that the speed benchmarks time (config overrides of the ``voc`` config).
STEP_VARIANTS: dict[str, list[str]] = {
    "eca": [],
    "afa": ["method.use_carm_seg=false", "method.use_cce=false", "method.aff_source=cam"],
    "eca_no_sae": ["method.use_carm_seg=false", "method.aff_source=cam"],
    "eca_no_cce": ["method.use_cce=false"],
}

#: Random weights (speed does not depend on them), no validation, no classifier-only warm-up.
RANDOM_WEIGHTS = [
    "model.allow_random_backbone=true",
    "model.backbone_weights=",
    "model.dino_allow_random_init=true",
    "model.dino_weights=",
    "train.val_interval=0",
    "train.cls_warmup_iters=0",
]


def device_name(device: torch.device) -> str:
    """A short name of the device: the GPU model, or the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def commit() -> str:
    """The git commit of the working tree (``-dirty`` with uncommitted changes); ``ECASEG_COMMIT`` overrides
    it where the tree has no ``.git`` (a copy on a GPU machine)."""
    if os.environ.get("ECASEG_COMMIT"):
        return os.environ["ECASEG_COMMIT"]
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
        ).stdout
        return sha + ("-dirty" if dirty.strip() else "") if sha else "unknown"
    except OSError:
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 10
) -> dict[str, float]:
    """Median / min / max milliseconds of ``fn`` after ``warmup`` calls, synchronising the device."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - start) * 1000.0)
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "n": repeats,
    }


def record(
    kind: str,
    device: torch.device,
    figures: dict[str, Any],
    settings: dict[str, Any],
    results_dir: Path | None = None,
) -> Path:
    """Write ``<results_dir>/<kind>-<device>-<date>.json`` (default ``benchmarks/results``) with device,
    versions, commit and the figures."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    slug = (
        "cuda-" + torch.cuda.get_device_name(device).split()[-1].lower() if device.type == "cuda" else "cpu"
    )
    payload = {
        "benchmark": kind,
        "device": device_name(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "commit": commit(),
        "date": date,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
        "figures": figures,
    }
    path = (results_dir or RESULTS) / f"{kind}-{slug}-{date}.json"
    atomic_write_text(path, json.dumps(payload, indent=2))
    return path
