"""Is the packaged DINO-pretrained nano ViT meaningful? AUC of Eq. (4) and (5) against random weights.

For the synthetic benchmark's val split, :func:`ecaseg.engine.dino_pretrain.affinity_auc` ranks the
``affinity_graph`` values of same-object patch pairs (positives) against different-class pairs (negatives),
and :func:`ecaseg.engine.dino_pretrain.foreground_cue_auc` ranks the foreground cues (the class-token cue of
Eq. (5), per head too, and the contrast cue) of object patches against background patches, for the packaged
``vit_nano_p8_synthetic`` weights and for the same architecture with seeded random weights.
Prints two tables and writes ``results/dino-auc-<device>-<date>.json``.

    python benchmarks/dino_affinity_auc.py                      # 200 val images, 2000 pairs per image
    python benchmarks/dino_affinity_auc.py --weights my_vit.pth --num-images 50 --tag mine
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import record

from ecaseg.data.synthetic import SyntheticConfig, SyntheticWSSSDataset
from ecaseg.dino_affinity import DINOAffinity, packaged_weights
from ecaseg.engine.dino_pretrain import affinity_auc, foreground_cue_auc


def _shown(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it (stable across checkouts)."""
    root = Path(__file__).resolve().parent.parent
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="default: the packaged checkpoint")
    parser.add_argument("--variant", default="vit_nano_p8")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--max-pairs", type=int, default=2000, help="positives and negatives per image")
    parser.add_argument("--seed", type=int, default=0, help="random weights and pair sampling")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tag", default="", help="record name dino-auc-TAG-<device>-<date>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    weights = args.weights or packaged_weights("vit_nano_p8_synthetic")
    dataset = SyntheticWSSSDataset("val", SyntheticConfig())
    torch.manual_seed(args.seed)
    models = {
        "pretrained": DINOAffinity(args.variant, weights=weights),
        "random": DINOAffinity(args.variant, allow_random_init=True),
    }
    figures = {}
    for name, dino in models.items():
        start = time.perf_counter()
        res = affinity_auc(
            dino.to(device),
            dataset,
            num_images=args.num_images,
            max_pairs_per_image=args.max_pairs,
            generator=torch.Generator().manual_seed(args.seed),
        )
        res["cues"] = foreground_cue_auc(dino, dataset, num_images=args.num_images)
        res["seconds"] = round(time.perf_counter() - start, 1)
        figures[name] = res
    keys = ("auc", "auc_fg", "auc_bg", "mean_positive", "mean_negative")
    print(f"| weights | {' | '.join(keys)} | positives | negatives |")
    print("| --- " * (len(keys) + 3) + "|")
    for name, res in figures.items():
        cells = " | ".join(f"{res[k]:.4f}" for k in keys)
        print(f"| {name} | {cells} | {res['num_positive']} | {res['num_negative']} |")
    print("\n| weights | class-token cue AUC (Eq. 5) | per head | contrast cue AUC |")
    print("| --- | --- | --- | --- |")
    for name, res in figures.items():
        cues = res["cues"]
        heads = ", ".join(f"{a:.3f}" for a in cues["cls_auc_heads"])
        print(f"| {name} | {cues['cls_auc']:.4f} | {heads} | {cues['contrast_auc']:.4f} |")
    settings = {
        "weights": _shown(weights),
        "variant": args.variant,
        "split": "val",
        "synthetic_config": "SyntheticConfig() defaults",
        "num_images": args.num_images,
        "max_pairs_per_image": args.max_pairs,
        "seed": args.seed,
        "positives": figures["pretrained"]["positives"],
        "negatives": "different majority class (auc: any; auc_fg: both foreground; auc_bg: one background)",
        "cues": "patches of majority label > 0 against majority 0 (foreground_cue_auc)",
    }
    print("wrote", record("dino-auc" + (f"-{args.tag}" if args.tag else ""), device, figures, settings))


if __name__ == "__main__":
    main()
