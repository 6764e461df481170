"""The training loader's CPU time per sample: before and after the data changes of issue 25.

A VOC-like folder (JPEG images of ``--height`` x ``--width``, PNG masks) is written to a temporary
directory, then ``VOCAugDataset("train_aug")[i]`` with the ``voc`` config's training transform (crop 512,
long side 512-2048, scale 0.5-2.0, flip) is timed, per sample, in one process with OpenCV single-threaded
(a loader worker's situation; the loop is what one worker does):

* ``before``: the mask is read, decoded, resized and cropped (and dropped by the trainer), the crop is
  normalised on the CPU to float32;
* ``after``: no mask file is read (``load_masks=False``), the crop stays uint8 (normalised on the device).

Both run on the same files and the same per-sample seeds, interleaved ``--repeats`` times; the record holds
the median ms per sample of each and their ratio. Run::

    python benchmarks/bench_loader.py --images 48 --repeats 5

(``--out DIR`` writes the JSON there instead of ``benchmarks/results``.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record

from ecaseg.data import TrainTransform, VOCAugDataset
from ecaseg.engine.config import load_config


def write_voc_like(root: Path, n: int, height: int, width: int, seed: int = 0) -> Path:
    """``n`` smooth-plus-noise JPEGs (quality 90, like VOC's) with PNG masks of 1-3 rectangles."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"img{i:04d}" for i in range(n)]
    for image_id in ids:
        low = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(voc / "JPEGImages" / f"{image_id}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        mask = np.zeros((height, width), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
            mask[y0 : y0 + height // 3, x0 : x0 + width // 3] = int(rng.integers(1, 21))
        mask[:2] = 255
        cv2.imwrite(str(voc / "SegmentationClassAug" / f"{image_id}.png"), mask)
    sets = voc / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("\n".join(ids) + "\n")
    (sets / "val.txt").write_text("")
    return voc


def time_per_sample(dataset: VOCAugDataset, n: int) -> float:
    """Milliseconds per ``dataset[i]`` over the first ``n`` items, each with its own fixed seed."""
    start = time.perf_counter()
    for i in range(n):
        torch.manual_seed(i)
        dataset[i]
    return (time.perf_counter() - start) * 1000.0 / n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cv2.setNumThreads(0)  # what ecaseg.data.worker_init does in each worker
    torch.set_num_threads(1)  # what the DataLoader does in each worker
    d = load_config("voc", []).data
    common = {"crop_size": d.crop_size, "resize_long": d.resize_long, "scale_range": d.scale_range}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_voc_like(Path(tmp), args.images, args.height, args.width)
        cache = Path(tmp) / "cache"
        before = VOCAugDataset(root, "train_aug", transform=TrainTransform(**common), cache_dir=cache)
        after = VOCAugDataset(
            root, "train_aug", transform=TrainTransform(**common, uint8=True), cache_dir=cache
        )
        after.load_masks = False
        assert "mask" in before[0] and "mask" not in after[0] and after[0]["image"].dtype == torch.uint8
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.repeats):  # interleaved: both see the same machine load
            times["before"].append(time_per_sample(before, args.images))
            times["after"].append(time_per_sample(after, args.images))
    figures: dict[str, Any] = {
        f"{k}_ms_per_sample": {"median": statistics.median(v), "all": [round(x, 3) for x in v]}
        for k, v in times.items()
    }
    figures["speedup"] = statistics.median(times["before"]) / statistics.median(times["after"])
    settings = {
        "images": args.images,
        "repeats": args.repeats,
        "image_hw": [args.height, args.width],
        "transform": common,
        "opencv_threads": "0 (single-threaded, as in a worker)",
        "torch_threads": 1,
    }
    path = record("loader", torch.device("cpu"), figures, settings, results_dir=args.out)
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"before {b:.2f} ms/sample, after {a:.2f} ms/sample, x{figures['speedup']:.2f} -> {path}")
    return figures


if __name__ == "__main__":
    main()
