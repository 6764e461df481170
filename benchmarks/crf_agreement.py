"""A checkpoint's evaluation with the dense CRF of each backend: mIoU and the share of equal labels.

Runs the inference protocol of the checkpoint's config (its ``eval`` section) on its val split once per CRF
backend (``torch`` and ``pydensecrf``, CPU, one process each) and writes
``results/crf-agreement-cpu-<date>.json`` with the mIoU of each and the fraction of pixels whose labels
agree. ``--demo-seed N`` first trains the demo's ECA model of seed ``N`` (full budget, about 8 minutes of one
CPU core) into ``--work-dir`` and evaluates that.

    python benchmarks/crf_agreement.py --demo-seed 0 --work-dir /tmp/crf_demo
    python benchmarks/crf_agreement.py --checkpoint work_dirs/synthetic/last.pth
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record

from ecaseg.crf import CRFParams
from ecaseg.engine.builders import build_dataset, build_model
from ecaseg.engine.config import config_from_dict
from ecaseg.engine.inference import predict_batched
from ecaseg.engine.trainer import load_checkpoint
from ecaseg.metrics import SegmentationMetric

BACKENDS = ("pydensecrf", "torch")


def train_demo_model(seed: int, work_dir: Path) -> Path:
    """Train the demo's ECA model of ``seed`` (what ``ecaseg demo`` trains first); returns its checkpoint."""
    from ecaseg.engine.demo import demo_configs
    from ecaseg.engine.trainer import ECATrainer

    cfg = demo_configs(seed, quick=False)["eca"]
    ECATrainer(cfg, work_dir, overwrite=True, progress=False).train()
    return work_dir / "last.pth"


def agreement(checkpoint: Path, max_images: int) -> dict[str, Any]:
    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt["config"])
    num_classes = int(ckpt["model"]["classifier.weight"].shape[0]) + 1
    net = build_model(cfg, num_classes, load_weights=False)
    net.load_state_dict(ckpt["model"])
    net.eval()
    data = build_dataset(cfg, cfg.data.val_split, train=False)
    count = len(data) if max_images <= 0 else min(max_images, len(data))  # type: ignore[arg-type]
    samples = [data[i] for i in range(count)]
    ev = cfg.eval
    labels: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, Any] = {}
    for backend in BACKENDS:
        start = time.perf_counter()
        labels[backend] = {
            key: label.cpu()
            for key, label in predict_batched(
                net,
                ((i, s["image"]) for i, s in enumerate(samples)),
                device=torch.device("cpu"),
                batch_size=ev.batch_size,
                scales=ev.scales,
                flip=ev.flip,
                merge=ev.merge,
                resize_long=ev.resize_long,
                crf=CRFParams(),
                crf_workers=1,
                crf_backend=backend,  # type: ignore[arg-type]
            )
        }
        metric = SegmentationMetric(num_classes)
        for i, s in enumerate(samples):
            metric.update(labels[backend][i][None], s["mask"][None])
        out[backend] = {"miou": metric.compute()["miou"], "seconds": time.perf_counter() - start}
        print(f"{backend}: mIoU {out[backend]['miou']:.4f} ({out[backend]['seconds']:.0f} s)", flush=True)
    equal = sum(int((labels["torch"][i] == labels["pydensecrf"][i]).sum()) for i in range(count))
    total = sum(labels["torch"][i].numel() for i in range(count))
    out["label_agreement"] = equal / max(total, 1)
    out["miou_difference"] = out["torch"]["miou"] - out["pydensecrf"]["miou"]
    out["images"] = count
    out["protocol"] = {
        "scales": list(ev.scales),
        "flip": ev.flip,
        "merge": ev.merge,
        "resize_long": ev.resize_long,
        "crf": "CRFParams()",
    }
    print(f"labels equal on {100 * out['label_agreement']:.4f} % of {total} pixels")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--demo-seed", type=int, default=None, help="train the demo's ECA model first")
    parser.add_argument("--work-dir", type=Path, default=Path("work_dirs/crf_agreement"))
    parser.add_argument("--max-images", type=int, default=0, help="val images (0: all)")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if (args.checkpoint is None) == (args.demo_seed is None):
        parser.error("give exactly one of --checkpoint and --demo-seed")
    checkpoint = args.checkpoint or train_demo_model(args.demo_seed, args.work_dir)
    figures = agreement(checkpoint, args.max_images)
    settings = {
        "checkpoint": checkpoint,
        "demo_seed": args.demo_seed,
        "max_images": args.max_images,
        "threads": args.threads,
    }
    path = record("crf-agreement", torch.device("cpu"), figures, settings, results_dir=args.results_dir)
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main()
