"""Can the CARM grow a part-CAM into the whole object? Region maps from ground-truth or trained CAMs.

On the synthetic benchmark a classifier's CAM fires on an object's head (the discriminative part) and
under-activates on its body. This script replaces the CAM with an *oracle*: the ground-truth mask of the heads
only (``--seeds head``) or of whole objects (``--seeds object``), area-pooled to the CAM grid (stride 16, like
the demo's backbone) and normalised per class; ``--seeds model --checkpoint FILE`` uses the CAM of a trained
checkpoint instead (single scale plus flip). It then runs the CARM of Eq. (3)-(7)
(:func:`ecaseg.carm.select_seeds`, :func:`~ecaseg.carm.affinity_graph`, :func:`~ecaseg.carm.foreground_cue`,
:func:`~ecaseg.carm.region_maps`) with the given affinity ViT, for each ``gamma``, with the ViT's foreground
cue (``cue1``), without a cue (``cue0``), with :func:`~ecaseg.carm.contrast_cue` (``cuecontrast``) and with
the ground-truth foreground as the cue (``cuegt``, an upper bound for a perfect cue), and scores the
alpha = 0.5 pseudo-labels of the CAM and of each CARM by mIoU. It also reports the AUC of the class-token and
contrast cues for foreground versus background patches (0.5 = uninformative).

The split's masks are used; run it on the ``train`` split to choose settings (as the paper chose ``gamma``
on VOC's training images) and keep ``val`` for reporting.

    python benchmarks/carm_oracle.py                                  # packaged ViT, train split of seed 0
    python benchmarks/carm_oracle.py --weights my_vit.pth --gammas 0.5,0.9 --split val
    python benchmarks/carm_oracle.py --seeds model --checkpoint demo/eca/last.pth --split val
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import record

from ecaseg.cam import background_cam, cam_to_label, multiscale_cam
from ecaseg.carm import affinity_graph, contrast_cue, foreground_cue, region_maps, select_seeds
from ecaseg.data import EvalTransform
from ecaseg.data.synthetic import SyntheticConfig, render_sample
from ecaseg.dino_affinity import DINOAffinity, packaged_weights
from ecaseg.engine.dino_pretrain import mann_whitney_auc
from ecaseg.metrics import SegmentationMetric


def _miou(maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, num_classes: int) -> float:
    up = F.interpolate(maps, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    metric = SegmentationMetric(num_classes)
    metric.update(cam_to_label(up, labels, alpha=0.5), masks)
    return float(metric.compute()["miou"])


def _load_model(path: Path) -> tuple[torch.nn.Module, SyntheticConfig]:
    """The segmentation network of a trained checkpoint (eval mode) and the benchmark it was trained on."""
    from ecaseg.engine.builders import build_model, synthetic_config
    from ecaseg.engine.config import config_from_dict
    from ecaseg.engine.trainer import load_checkpoint

    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    if cfg.data.dataset != "synthetic":
        raise SystemExit(f"{path}: trained on data.dataset={cfg.data.dataset!r}, not the synthetic benchmark")
    trained_on = synthetic_config(cfg)
    net = build_model(cfg, trained_on.num_classes + 1, load_weights=False)
    net.load_state_dict(ckpt["model"])
    return net.eval(), trained_on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="default: the packaged checkpoint")
    parser.add_argument("--variant", default="vit_nano_p8")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--synthetic-seed", type=int, default=0, help="ignored with --checkpoint (its own)")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--seeds", default="head", choices=("head", "object", "model"))
    parser.add_argument("--checkpoint", type=Path, default=None, help="trained checkpoint (--seeds model)")
    parser.add_argument("--gammas", default="0.15,0.5,0.7,0.8,0.9,0.95")
    parser.add_argument("--k", type=float, default=0.3)
    parser.add_argument("--cam-stride", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    weights = args.weights or packaged_weights("vit_nano_p8_synthetic")
    config = SyntheticConfig(seed=args.synthetic_seed)
    net = None
    if args.seeds == "model":
        if args.checkpoint is None:
            parser.error("--seeds model needs --checkpoint")
        net, config = _load_model(args.checkpoint)  # the checkpoint's benchmark (seed, classes, context)
    config = dataclasses.replace(
        config,
        num_train=args.num_images if args.split == "train" else 1,
        num_val=args.num_images if args.split == "val" else 1,
    )
    num_classes = config.num_classes
    samples = [render_sample(config, args.split, i) for i in range(args.num_images)]
    transform = EvalTransform()
    images = torch.stack([transform(s.image, s.mask)["image"] for s in samples])
    masks = torch.from_numpy(np.stack([s.mask for s in samples])).long()
    parts = torch.from_numpy(np.stack([s.parts for s in samples])).long()
    labels = torch.zeros(len(samples), config.num_fg_classes)
    for i, s in enumerate(samples):
        labels[i, [c - 1 for c in s.object_classes]] = 1.0

    if net is not None:
        with torch.no_grad():
            cams = multiscale_cam(net, images, labels, scales=(1.0,), flip=True)
        name = "model"
    else:
        onehot = F.one_hot(masks, num_classes).permute(0, 3, 1, 2)[:, 1:].float()
        if args.seeds == "head":
            onehot = onehot * (parts == 2)[:, None]
        cams = F.adaptive_avg_pool2d(onehot, masks.shape[-1] // args.cam_stride)
        cams = cams / cams.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        name = f"oracle_{args.seeds}"
    figures: dict[str, float] = {f"{name}_cam_miou": _miou(cams, labels, masks, num_classes)}

    dino = DINOAffinity(args.variant, weights=weights)
    with torch.no_grad():
        out = dino(images)
    hd, wd = out.grid
    fg_patch = F.adaptive_avg_pool2d((masks > 0).float()[:, None], (hd, wd)).flatten(1) > 0.5
    cue = foreground_cue(out.cls_query, out.keys)
    figures["fg_cue_auc"] = float(mann_whitney_auc(cue[fg_patch], cue[~fg_patch]))
    contrast = contrast_cue(out.keys)
    figures["contrast_cue_auc"] = float(mann_whitney_auc(contrast[fg_patch], contrast[~fg_patch]))
    fg = F.interpolate(cams, size=(hd, wd), mode="bilinear", align_corners=False).flatten(2)
    seeds = select_seeds(torch.cat([background_cam(fg), fg], dim=1), labels, args.k)
    graph = affinity_graph(out.keys)
    cues = {"1": cue, "0": None, "contrast": contrast, "gt": fg_patch.float()}
    for gamma in (float(g) for g in args.gammas.split(",")):
        for cue_name, cue_map in cues.items():
            maps = region_maps(seeds, graph, cue_map, gamma)
            maps = maps.view(len(samples), num_classes, hd, wd)[:, 1:]
            figures[f"carm_miou_gamma{gamma}_cue{cue_name}"] = _miou(maps, labels, masks, num_classes)
    for name, value in figures.items():
        print(f"{name:34s} {value:.4f}")
    settings = {
        "weights": str(weights.name),
        "variant": args.variant,
        "split": args.split,
        "synthetic_seed": config.seed,
        "num_images": args.num_images,
        "seeds": args.seeds,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "k": args.k,
        "cam_stride": args.cam_stride,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(
        "wrote",
        record(
            f"carm-oracle-{args.seeds}-{args.split}", torch.device("cpu"), figures, settings, args.results_dir
        ),
    )


if __name__ == "__main__":
    main()
