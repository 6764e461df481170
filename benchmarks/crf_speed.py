"""Dense CRF speed and agreement: the torch backend (on the CPU or CUDA) against pydensecrf (one CPU process).

One image of ``--height`` x ``--width`` (default 500 x 375, a typical VOC image) cut from a synthetic
benchmark image, class probabilities ``--classes`` (default 21) from smooth random logits, AFA's CRF
parameters with ``--iterations`` (default 10) mean-field iterations. Reports milliseconds per image
(median of ``--repeats`` after one warm-up, the device synchronised) of each backend, the torch backend
also for a batch of ``--batch`` images and for its first call (which builds the position-only kernel that
later calls of the same image size reuse), the fraction of pixels where the two label maps agree and the
largest difference of their marginals. Writes ``results/crf-<device>-<date>.json``.

    python benchmarks/crf_speed.py                       # CUDA if present, else the CPU
    python benchmarks/crf_speed.py --device cpu --threads 1
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import device_name, record, time_fn

from ecaseg.crf import CRFParams, _crf_probs, dense_crf_torch, pydensecrf_available
from ecaseg.data.synthetic import SyntheticConfig, generate_sample


def inputs(height: int, width: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image cut from a synthetic-benchmark image and smooth random class probabilities."""
    size = max(height, width)
    image, _ = generate_sample(SyntheticConfig(image_size=max(64, size)), "val", seed)
    image = np.ascontiguousarray(image[:height, :width])
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, classes, height // 32 + 2, width // 32 + 2, generator=g) * 3
    logits = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    logits = logits + 0.5 * torch.randn(1, classes, height, width, generator=g)
    return image, logits[0].softmax(0).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="images per call of the batched torch timing")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    params = CRFParams(iterations=args.iterations)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = torch.device("cpu")

    image, probs = inputs(args.height, args.width, args.classes, seed=0)
    img_t = torch.from_numpy(image)[None].to(device)
    prb_t = torch.from_numpy(probs)[None].to(device)
    start = time.perf_counter()
    q_torch = (
        dense_crf_torch(img_t, prb_t, params)[0].cpu().numpy()
    )  # also builds the cached smoothness kernel
    first_ms = (time.perf_counter() - start) * 1000.0
    torch_ms = time_fn(lambda: dense_crf_torch(img_t, prb_t, params), device, warmup=1, repeats=args.repeats)
    batch = [inputs(args.height, args.width, args.classes, seed=s) for s in range(args.batch)]
    imgs_b = torch.from_numpy(np.stack([b[0] for b in batch])).to(device)
    prbs_b = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)
    batch_ms = time_fn(
        lambda: dense_crf_torch(imgs_b, prbs_b, params), device, warmup=1, repeats=max(1, args.repeats // 2)
    )
    figures: dict[str, Any] = {
        "torch_first_call_ms": first_ms,
        "torch_ms_per_image": torch_ms,
        f"torch_batch{args.batch}_ms_per_image": {
            k: (v / args.batch if k.endswith("_ms") else v) for k, v in batch_ms.items()
        },
    }
    print(f"torch backend on {device_name(device)}: {torch_ms['median_ms']:.0f} ms / image")
    print(f"  batch of {args.batch}: {batch_ms['median_ms'] / args.batch:.0f} ms / image")
    if pydensecrf_available():
        q_ref = _crf_probs(image, probs, params)
        ref_ms = time_fn(lambda: _crf_probs(image, probs, params), cpu, warmup=1, repeats=args.repeats)
        agree = float((q_ref.argmax(0) == q_torch.argmax(0)).mean())
        figures.update(
            pydensecrf_ms_per_image=ref_ms,
            torch_over_pydensecrf_time=torch_ms["median_ms"] / ref_ms["median_ms"],
            label_agreement=agree,
            max_abs_marginal_difference=float(np.abs(q_ref - q_torch).max()),
            pixels_changed_by_crf=float((q_ref.argmax(0) != probs.argmax(0)).mean()),
        )
        print(f"pydensecrf (one CPU process): {ref_ms['median_ms']:.0f} ms / image")
        print(f"labels equal on {100 * agree:.3f} % of the pixels")
    settings = {
        "height": args.height,
        "width": args.width,
        "classes": args.classes,
        "iterations": args.iterations,
        "repeats": args.repeats,
        "batch": args.batch,
        "threads": args.threads,
        "params": vars(params),
        "pydensecrf_device": device_name(cpu) if pydensecrf_available() else None,
        # other work on the machine slows both backends: the 1-minute load average before and after
        "load_average": [load_before, os.getloadavg()[0]] if hasattr(os, "getloadavg") else None,
    }
    print(record("crf", device, figures, settings, args.results_dir))


if __name__ == "__main__":
    main()
