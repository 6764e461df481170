"""Speed of ``ecaseg refine``'s refinement: images per second of :class:`ecaseg.refine.CAMRefiner`.

CPU (default): the packaged ViT on 128 px images, batches of 8, ``--threads`` threads: ms per image of the
CARM part (ViT + CARM + threshold, method ``carm``) and of the default ``carm_par``.
CUDA (``--device cuda``): ``dino_vits8`` (random weights: timing only) on 512 px images, batches of
``--batch-size``, 21 classes; images per second after warm-up.

    python benchmarks/refine_speed.py --threads 1
    python benchmarks/refine_speed.py --device cuda --size 512 --batch-size 16

Writes ``benchmarks/results/refine-speed-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import record

from ecaseg.cam import minmax_normalize
from ecaseg.dino_affinity import DINOAffinity
from ecaseg.refine import CAMRefiner


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(refiner: CAMRefiner, batch: tuple[torch.Tensor, ...], device: torch.device, reps: int) -> float:
    """Milliseconds per image, median of ``reps`` timed calls after two warm-up calls."""
    for _ in range(2):
        refiner(*batch)
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        refiner(*batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return 1000.0 * times[len(times) // 2] / batch[0].shape[0]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="image side (default: 128 CPU, 512 CUDA)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=None, help="default: 6 CPU, 21 CUDA")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or (512 if cuda else 128)
    k = args.num_classes or (21 if cuda else 6)
    dino = (
        DINOAffinity("dino_vits8", allow_random_init=True) if cuda else DINOAffinity("vit_nano_p8_synthetic")
    ).to(device)
    gen = torch.Generator().manual_seed(0)
    b = args.batch_size
    labels = torch.zeros(b, k - 1)
    labels[:, 0] = 1.0
    labels[::2, min(3, k - 2)] = 1.0
    cams = (
        minmax_normalize(torch.rand(b, k - 1, size // 16, size // 16, generator=gen))
        * labels[..., None, None]
    )
    batch = (torch.rand(b, 3, size, size, generator=gen).to(device), cams.to(device), labels.to(device))
    figures = {}
    for method in ("carm", "carm_par"):
        refiner = CAMRefiner(k, method, dino, validate=False).to(device)  # type: ignore[arg-type]
        figures[f"{method}_ms_per_image"] = measure(refiner, batch, device, args.reps)
        figures[f"{method}_images_per_s"] = 1000.0 / figures[f"{method}_ms_per_image"]
    print({key: round(v, 2) for key, v in figures.items()})
    if not args.no_record:
        path = record(
            "refine-speed",
            device,
            figures,
            {
                "size": size,
                "batch_size": b,
                "num_classes": k,
                "threads": args.threads,
                "dino": "dino_vits8 (random weights)" if cuda else "vit_nano_p8_synthetic",
                "reps": args.reps,
            },
            results_dir=args.results_dir,
        )
        print("recorded", path)
    return figures


if __name__ == "__main__":
    main()
