"""One prepared check for a lent GPU (under 8 minutes on an H100): what a user of the ``voc`` config runs.

Random weights (``model.allow_random_backbone`` and friends; speed does not depend on them), synthetic
512 crops, the rest of the ``voc`` config as shipped (MiT-B1, DINO ViT-S/8, 21 classes, batch 8). Records:

* ``steps``: the ECA and AFA-style (no DINO, no CCE, CAM affinity) training step, median ms and peak memory,
  in fp32 (the config's default), fp32 + TF32 (``train.tf32``) and bf16 (``train.amp=bf16``);
* ``host_syncs``: synchronising CUDA calls per ECA step (``torch.cuda.set_sync_debug_mode``) and their
  sites;
* ``par``: the PAR refinement of one step (8 images at 256, a fixed slot count), eager vs
  ``torch.compile`` (and the compile time);
* ``ddp``: two processes on the one GPU (NCCL; gloo on the same GPU where NCCL refuses two ranks on one
  device) for a few steps through the warm-up boundary: both exit 0;
* ``inference``: images/s of ``predict_batched`` (the ``eval`` protocol of the config: scales 1.0, 0.5,
  0.75, flip, max merge, long side 512) without and with the dense CRF.

Each part writes the record again when it ends (``benchmarks/results/gpu-check-<device>-<date>.json``, or
``--out``), so a run cut short still leaves what it measured; a part that fails records its error and the
next part runs; parts that would start after ``--budget-s`` seconds are recorded as skipped.

    python benchmarks/gpu_check.py                       # on the GPU
    python benchmarks/gpu_check.py --tiny --out /tmp/x   # dry run on the CPU at a tiny size (test suite)
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import RandomSegData, make_batch, random_weights_config
from common import STEP_VARIANTS, record, sync, time_fn

from ecaseg.crf import CRFParams
from ecaseg.engine.builders import build_model, build_par
from ecaseg.engine.inference import predict_batched
from ecaseg.engine.pseudo import par_slots
from ecaseg.engine.trainer import ECATrainer

#: what the parts run: the voc config on a GPU, a few-second version of it on the CPU (``--tiny``)
SCALES: dict[str, dict[str, Any]] = {
    "gpu": {
        "batch": 8,
        "crop": 512,
        "local": 256,
        "classes": 21,
        "overrides": [],
        "warmup": 3,
        "repeats": 10,
    },
    "tiny": {
        "batch": 2,
        "crop": 64,
        "local": 32,
        "classes": 21,
        "overrides": [
            "model.backbone=mit_nano",
            "model.attn_blocks=2",
            "model.dino=vit_nano_p8",
            "method.cam_scales=[1.0]",
        ],
        "warmup": 1,
        "repeats": 1,
    },
}
PRECISIONS: dict[str, list[str]] = {
    "fp32": ["train.amp=none", "train.tf32=false"],
    "bf16": ["train.amp=bf16", "train.tf32=false"],
    "fp32_tf32": ["train.amp=none", "train.tf32=true"],  # last: it changes process-wide settings
}


def _config(s: dict[str, Any], device: torch.device, extra: list[str]) -> Any:
    return random_weights_config(
        [
            *s["overrides"],
            f"train.batch_size={s['batch']}",
            f"data.crop_size={s['crop']}",
            f"method.local_size={s['local']}",
            f"train.device={device}",
            *extra,
        ]
    )


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def part_steps(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    data = RandomSegData(s["classes"], s["crop"])
    batch = make_batch(data, s["batch"], device)
    tf32_before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    out: dict[str, Any] = {}
    try:
        for precision, flags in PRECISIONS.items():
            for variant in ("eca", "afa"):
                cfg = _config(s, device, [*STEP_VARIANTS[variant], *flags])
                trainer = ECATrainer(
                    cfg, "/tmp/ecaseg-gpu-check", overwrite=True, train_dataset=data, progress=False
                )
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                timing = time_fn(lambda t=trainer: t.train_step(batch), device, s["warmup"], s["repeats"])
                entry: dict[str, Any] = {"step_ms": timing}
                if device.type == "cuda":
                    entry["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
                out[f"{variant}_{precision}"] = entry
                print(f"step {variant} {precision}: {timing['median_ms']:.1f} ms", flush=True)
                del trainer
                _free(device)
            eca, afa = out[f"eca_{precision}"], out[f"afa_{precision}"]
            out[f"eca_over_afa_{precision}"] = eca["step_ms"]["median_ms"] / afa["step_ms"]["median_ms"]
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = tf32_before
    return out


def part_host_syncs(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "synchronisation debug mode needs CUDA"}
    data = RandomSegData(s["classes"], s["crop"])
    batch = make_batch(data, s["batch"], device)
    out: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        cfg = _config(s, device, PRECISIONS[precision])
        trainer = ECATrainer(cfg, "/tmp/ecaseg-gpu-check", overwrite=True, train_dataset=data, progress=False)
        trainer.train_step(batch)  # warm-up
        sync(device)
        steps = 3
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    trainer.train_step(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sites: collections.Counter[str] = collections.Counter(
            f"{w.filename}:{w.lineno}: {str(w.message)[:80]}" for w in caught
        )
        out[precision] = {"per_step": sum(sites.values()) / steps, "sites": dict(sites.most_common(20))}
        print(f"host syncs per ECA step ({precision}): {out[precision]['per_step']:.1f}", flush=True)
        del trainer
        _free(device)
    return out


def part_par(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    cfg = _config(s, device, [])
    par = build_par(cfg).to(device)
    side = s["crop"] // cfg.method.par_downsample
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(s["batch"], 3, side, side, generator=g).to(device)
    # the softmax path's maps of one step: CAM and CARM x 3 thresholds x (background + 4 slots)
    channels = 2 * 3 * (1 + par_slots(3, s["classes"] - 1))
    maps = torch.rand(s["batch"], channels, side, side, generator=g).to(device).softmax(1)
    out: dict[str, Any] = {"input": [s["batch"], channels, side, side]}
    with torch.no_grad():
        out["eager_ms"] = time_fn(lambda: par(rgb, maps), device, s["warmup"], s["repeats"])
        backend = "inductor" if device.type == "cuda" else "eager"  # inductor on the CPU takes minutes
        compiled = torch.compile(par, backend=backend)
        start = time.perf_counter()
        reference, got = par(rgb, maps), compiled(rgb, maps)
        sync(device)
        out["compile_s"] = time.perf_counter() - start
        out["backend"] = backend
        out["max_abs_diff"] = float((reference - got).abs().max())
        out["compiled_ms"] = time_fn(lambda: compiled(rgb, maps), device, s["warmup"], s["repeats"])
    out["speedup"] = out["eager_ms"]["median_ms"] / out["compiled_ms"]["median_ms"]
    print(
        f"PAR eager {out['eager_ms']['median_ms']:.2f} ms, compiled {out['compiled_ms']['median_ms']:.2f} ms"
    )
    return out


_DDP_CODE = """
import json, os, sys
sys.path.insert(0, {bench!r})
import torch
torch.set_num_threads(1)
from bench_step import RandomSegData, random_weights_config
from ecaseg.engine.trainer import ECATrainer
from ecaseg.utils.dist import finish_distributed, init_distributed, get_rank
init_distributed()
cfg = random_weights_config({overrides!r})
data = RandomSegData({classes}, {crop})
trainer = ECATrainer(cfg, {work!r}, overwrite=True, train_dataset=data, progress=False)
trainer.train()
backend = torch.distributed.get_backend()
print("DDP-OK", get_rank(), trainer.iteration, backend, flush=True)
finish_distributed()
"""


def _two_processes(code: str, backend: str, timeout: float) -> list[tuple[int, str]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK="0",  # both on the one GPU
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            ECASEG_DIST_BACKEND=backend,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = []
    try:
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
            except subprocess.TimeoutExpired:
                outputs.append("timed out")
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def part_ddp(s: dict[str, Any], device: torch.device, timeout: float) -> dict[str, Any]:
    steps = 4
    overrides = [
        *s["overrides"],
        f"train.batch_size={s['batch']}",
        f"data.crop_size={s['crop']}",
        f"method.local_size={s['local']}",
        f"train.max_iters={steps}",
        "train.cls_warmup_iters=2",  # through the warm-up boundary (the DDP wrapper is rebuilt there)
        "train.ckpt_interval=2",
        "train.log_interval=1",
        "train.tensorboard=false",
        "data.num_workers=0",
        f"train.device={'cuda' if device.type == 'cuda' else 'cpu'}",
    ]
    code = _DDP_CODE.format(
        bench=str(Path(__file__).resolve().parent),
        overrides=overrides,
        classes=s["classes"],
        crop=s["crop"],
        work="/tmp/ecaseg-gpu-check-ddp",
    )
    out: dict[str, Any] = {"steps": steps}
    backends = ["nccl", "gloo"] if device.type == "cuda" else ["gloo"]
    for backend in backends:
        start = time.perf_counter()
        results = _two_processes(code, backend, timeout)
        ok = all(rc == 0 and "DDP-OK" in text for rc, text in results)
        out[backend] = {
            "ok": ok,
            "seconds": time.perf_counter() - start,
            "exit_codes": [rc for rc, _ in results],
            "tails": [text[-1500:] for _, text in results] if not ok else [],
        }
        print(f"two processes ({backend}) on one device: {'ok' if ok else 'FAILED'}", flush=True)
        if ok:
            break
    return out


def part_inference(s: dict[str, Any], device: torch.device, crf_workers: int) -> dict[str, Any]:
    cfg = _config(s, device, [])
    ev = cfg.eval
    net = build_model(cfg, s["classes"]).to(device).eval()
    n = 16 if device.type == "cuda" else 2
    h, w = (375, 500) if device.type == "cuda" else (48, 64)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=g) for _ in range(n)]
    common = {
        "device": device,
        "scales": ev.scales,
        "flip": ev.flip,
        "merge": ev.merge,
        "resize_long": ev.resize_long if device.type == "cuda" else 0,
        "amp": cfg.train.amp,
    }
    out: dict[str, Any] = {"images": n, "hw": [h, w], **{k: v for k, v in common.items() if k != "device"}}

    def run(crf: CRFParams | None, workers: int) -> float:
        start = time.perf_counter()
        for _ in predict_batched(net, enumerate(images), crf=crf, crf_workers=workers, **common):
            pass
        sync(device)
        return n / (time.perf_counter() - start)

    run(None, 0)  # warm-up
    out["images_per_s"] = run(None, 0)
    out["crf_workers"] = crf_workers
    out["crf_images_per_s"] = run(CRFParams(), crf_workers)
    print(f"inference {out['images_per_s']:.1f} img/s, with CRF {out['crf_images_per_s']:.2f} img/s")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few-second dry run (CPU unless --device)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no part after this many s")
    parser.add_argument("--crf-workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)))
    parser.add_argument("--only", nargs="*", default=None, help="parts to run (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    s = SCALES["tiny" if args.tiny else "gpu"]
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "steps": lambda: part_steps(s, device),
        "host_syncs": lambda: part_host_syncs(s, device),
        "par": lambda: part_par(s, device),
        "ddp": lambda: part_ddp(s, device, timeout=150.0),
        "inference": lambda: part_inference(s, device, args.crf_workers if not args.tiny else 1),
    }
    settings = {
        "scale": "tiny" if args.tiny else "voc config as shipped, random weights",
        **{k: v for k, v in s.items() if k not in ("warmup", "repeats")},
        "warmup": s["warmup"],
        "repeats": s["repeats"],
        "budget_s": args.budget_s,
    }
    figures: dict[str, Any] = {}
    start = time.perf_counter()
    for name, fn in parts.items():
        if args.only and name not in args.only:
            continue
        if time.perf_counter() - start > args.budget_s:
            figures[name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        t0 = time.perf_counter()
        try:
            figures[name] = fn()
        except Exception as err:  # one broken part must not cost the others
            figures[name] = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-3000:],
            }
            print(f"{name}: FAILED {type(err).__name__}: {err}", flush=True)
        figures[name]["part_seconds"] = time.perf_counter() - t0
        _free(device)
        figures["total_seconds"] = time.perf_counter() - start
        path = record("gpu-check", device, figures, settings, results_dir=args.out)
    print(f"wrote {path} in {figures['total_seconds']:.0f} s")
    return figures


if __name__ == "__main__":
    main()
