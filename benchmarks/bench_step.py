"""Paper-scale speed and memory: training steps, inference throughput and the SAE module.

Measures, with random weights and synthetic tensors (speed does not depend on them):

* the steady-state training step time and peak memory of the full ECA step, the AFA-style step (no DINO,
  no CCE, no CARM), and ECA with SAE or CCE switched off;
* inference throughput (images/s) at 512 with multi-scale (0.5..1.5) + flip, without and with dense CRF;
* ``CARMGenerator`` for batch 8, N = 4096 (ViT-S/8 at 512), 21 classes.

At the paper's scale (batch 8, 512 crops, MiT-B1, DINO ViT-S/8, 21 classes) on CUDA; on the CPU at a reduced
size that the JSON states. Results go to ``benchmarks/results/`` with device, versions and commit.

    python benchmarks/bench_step.py                 # everything
    python benchmarks/bench_step.py --only carm     # one part: step, infer, carm
    python benchmarks/bench_step.py --profile       # also the top CUDA kernels of the ECA step
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RANDOM_WEIGHTS, STEP_VARIANTS, record, sync, time_fn

from ecaseg.carm import CARMGenerator
from ecaseg.crf import CRFParams, dense_crf
from ecaseg.dino_features import DINOFeatures
from ecaseg.engine.config import Config, load_config
from ecaseg.engine.inference import predict_labels, predict_probs
from ecaseg.engine.trainer import ECATrainer

VARIANTS = STEP_VARIANTS


class RandomSegData(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Stands in for VOC: random crops and labels with the dataset attributes the trainer reads."""

    def __init__(self, num_classes: int, size: int, n: int = 64) -> None:
        self.num_classes = num_classes
        self.class_names = tuple(f"c{i}" for i in range(num_classes))
        self.size = size
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(index)
        label = (torch.rand(self.num_classes - 1, generator=g) < 0.15).float()
        label[index % (self.num_classes - 1)] = 1.0
        return {
            "image": torch.randn(3, self.size, self.size, generator=g),
            "label": label,
            "crop_box": torch.tensor([0, self.size, 0, self.size]),
            "id": str(index),
        }


def random_weights_config(overrides: list[str]) -> Config:
    """The paper's VOC config with random weights (speed does not depend on them) and no warm-up."""
    return load_config("voc", [*RANDOM_WEIGHTS, *overrides])


def make_batch(data: RandomSegData, batch: int, device: torch.device) -> dict[str, Any]:
    samples = [data[i] for i in range(batch)]
    # host tensors (pinned on CUDA), as the DataLoader gives them: the step copies them itself
    pin = device.type == "cuda"
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("image", "label", "crop_box")}
    return {k: v.pin_memory() if pin else v for k, v in batch.items()}


def scale_settings(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "batch": 8,
            "crop": 512,
            "local": 256,
            "backbone": "mit_b1",
            "dino": "dino_vits8",
            "classes": 21,
        }
    return {"batch": 2, "crop": 256, "local": 128, "backbone": "mit_b1", "dino": "dino_vits8", "classes": 21}


def bench_steps(
    device: torch.device, warmup: int, repeats: int, compile_model: bool, profile: bool
) -> dict[str, Any]:
    s = scale_settings(device)
    results: dict[str, Any] = {}
    data = RandomSegData(s["classes"], s["crop"])
    for name, overrides in VARIANTS.items():
        cfg = random_weights_config(
            [
                *overrides,
                f"train.batch_size={s['batch']}",
                f"data.crop_size={s['crop']}",
                f"method.local_size={s['local']}",
                f"train.device={device}",
                f"train.compile={str(compile_model).lower()}",
            ],
        )
        trainer = ECATrainer(cfg, "/tmp/ecaseg-bench", overwrite=True, train_dataset=data, progress=False)
        batch = make_batch(data, s["batch"], device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timing = time_fn(lambda t=trainer, b=batch: t.train_step(b), device, warmup=warmup, repeats=repeats)
        entry: dict[str, Any] = {"step_ms": timing}
        if device.type == "cuda":
            entry["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
        results[name] = entry
        print(
            f"step {name}: {timing['median_ms']:.1f} ms"
            + (f", peak {entry['peak_memory_gb']:.2f} GB" if "peak_memory_gb" in entry else ""),
            flush=True,
        )
        if profile and name == "eca" and device.type == "cuda":
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    trainer.train_step(batch)
                sync(device)
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
            print(table)
            results["profile_top"] = table
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    eca, afa = results["eca"]["step_ms"]["median_ms"], results["afa"]["step_ms"]["median_ms"]
    results["eca_over_afa"] = eca / afa
    results["voc_schedule_hours"] = eca * 18000 / 1000 / 3600
    return results


def bench_inference(device: torch.device, repeats: int, crf_workers: int) -> dict[str, Any]:
    from ecaseg.models import ECANet

    size = 512 if device.type == "cuda" else 256
    net = ECANet("mit_b1", num_classes=21).to(device).eval()
    images = torch.randn(1, 3, size, size, device=device)
    rgb = np.random.default_rng(0).integers(0, 255, (1, size, size, 3), dtype=np.uint8)
    scales = (0.5, 0.75, 1.0, 1.25, 1.5)
    amp = "bf16" if device.type == "cuda" else "none"
    plain = time_fn(
        lambda: predict_labels(net, images, scales=scales, flip=True, amp=amp), device, 3, repeats
    )
    # CRF: images go through msc+flip on the device one by one while a persistent pool of CPU processes
    # runs the dense CRF (as ``ecaseg evaluate --crf`` does)
    n = 2 * max(crf_workers, 1)
    params = CRFParams()
    probs = predict_probs(net, images, scales=scales, flip=True, amp=amp)[0].cpu().numpy()
    single = time_fn(lambda: dense_crf(rgb[0], probs, params), torch.device("cpu"), 1, 3)
    with ProcessPoolExecutor(max_workers=max(crf_workers, 1)) as pool:
        list(pool.map(dense_crf, [rgb[0]] * crf_workers, [probs] * crf_workers, [params] * crf_workers))
        sync(device)
        start = time.perf_counter()
        futures = []
        for _ in range(n):
            p = predict_probs(net, images, scales=scales, flip=True, amp=amp)[0].cpu().numpy()
            futures.append(pool.submit(dense_crf, rgb[0], p, params))
        for future in futures:
            future.result()
        elapsed = time.perf_counter() - start
    with_crf = {"images": n, "seconds": elapsed, "crf_workers": crf_workers, "crf_single_ms": single}
    # the same protocol with the torch CRF backend on the device (the probabilities never leave it)
    torch_crf = time_fn(
        lambda: predict_labels(
            net, images, rgb, scales=scales, flip=True, amp=amp, crf=params, crf_backend="torch"
        ),
        device,
        1,
        min(repeats, 5),
    )
    result = {
        "size": size,
        "msc_flip_images_per_s": 1000.0 / plain["median_ms"],
        "msc_flip_crf_images_per_s": n / elapsed,
        "msc_flip_crf_torch_images_per_s": 1000.0 / torch_crf["median_ms"],
        "msc_flip_ms": plain,
        "msc_flip_crf_ms": with_crf,
        "msc_flip_crf_torch_ms": torch_crf,
    }
    print(
        f"inference {size}: {result['msc_flip_images_per_s']:.1f} img/s, "
        f"with CRF {result['msc_flip_crf_images_per_s']:.2f} img/s (pydensecrf, {crf_workers} processes), "
        f"{result['msc_flip_crf_torch_images_per_s']:.2f} img/s (torch CRF on {device.type})"
    )
    return result


def bench_carm(device: torch.device, repeats: int) -> dict[str, Any]:
    batch, grid, cam_grid, classes, dim = 8, 64, 32, 21, 384
    g = torch.Generator(device="cpu").manual_seed(0)
    cams = torch.rand(batch, classes - 1, cam_grid, cam_grid, generator=g).to(device)
    labels = (torch.rand(batch, classes - 1, generator=g) < 0.15).float().to(device)
    labels[:, 0] = 1
    keys = torch.randn(batch, grid * grid, dim, generator=g).to(device)
    query = torch.randn(batch, dim, generator=g).to(device)
    dino = DINOFeatures(keys=keys, cls_query=query, grid=(grid, grid))
    features = torch.randn(batch, 512, cam_grid, cam_grid, generator=g).to(device)
    sae = CARMGenerator(num_classes=classes, feature_dim=512, validate=False).to(device)  # the training path
    timing = time_fn(lambda: sae(cams, labels, dino, features), device, 3, repeats)
    print(f"CARMGenerator B8 N4096 K21: {timing['median_ms']:.1f} ms")
    return {"batch": batch, "dino_grid": grid, "cam_grid": cam_grid, "classes": classes, "ms": timing}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=("step", "infer", "carm"), default=None)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--crf-workers", type=int, default=8)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    figures: dict[str, Any] = {}
    if args.only in (None, "carm"):
        figures["carm"] = bench_carm(device, args.repeats)
    if args.only in (None, "step"):
        figures["train_step"] = bench_steps(device, args.warmup, args.repeats, args.compile, args.profile)
    if args.only in (None, "infer"):
        figures["inference"] = bench_inference(device, args.repeats, args.crf_workers)
    settings = {
        **scale_settings(device),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "compile": args.compile,
    }
    path = record("bench", device, figures, settings)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
