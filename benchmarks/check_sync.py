"""Reports host-device synchronisations inside ECA training steps (CUDA only).

Runs a few full ECA steps at the paper's scale with ``torch.cuda.set_sync_debug_mode("warn")`` and prints each
distinct synchronising call site with its count. Pinned host batches are used, as the DataLoader gives them.

    python benchmarks/check_sync.py
"""

from __future__ import annotations

import collections
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import RandomSegData, random_weights_config

from ecaseg.engine.trainer import ECATrainer


def main() -> None:
    if not torch.cuda.is_available():
        print("check_sync needs CUDA")
        return
    cfg = random_weights_config([])
    data = RandomSegData(21, 512)
    trainer = ECATrainer(cfg, "/tmp/ecaseg-sync", overwrite=True, train_dataset=data, progress=False)
    samples = [data[i] for i in range(8)]
    batch = {
        "image": torch.stack([s["image"] for s in samples]).pin_memory(),
        "label": torch.stack([s["label"] for s in samples]).pin_memory(),
        "crop_box": torch.stack([s["crop_box"] for s in samples]).pin_memory(),
    }
    trainer.train_step(batch)  # warm-up (cuDNN autotuning, allocator)
    torch.cuda.synchronize()
    sites: collections.Counter[str] = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        for _ in range(3):
            trainer.train_step(batch)
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        sites[f"{w.filename}:{w.lineno}: {str(w.message)[:80]}"] += 1
    print(f"synchronising calls in 3 ECA steps: {sum(sites.values())}")
    for site, count in sites.most_common(20):
        print(f"{count:4d}  {site}")


if __name__ == "__main__":
    main()
