"""AFA's rules against ecaseg 0.1's on one trained checkpoint: the figures of docs/choices.rst.

* inference merge (``eval.merge`` max vs mean, with and without CRF): val mIoU, time, share of pixels whose
  label changes;
* multi-scale CAM rule (``method.cam_rule`` afa vs sum) x PAR input (``method.par_input`` softmax vs
  scores): CAM, CARM and pseudo-label mIoU on the val split, time of the validation pass.

Usage (the ECA checkpoint of ``ecaseg demo --seed 0 --out DIR``; one thread, CPU)::

    python benchmarks/afa_rules.py --checkpoint DIR/eca/last.pth
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
from ecaseg.engine.builders import (
    build_carm_generator,
    build_dataset,
    build_dino,
    build_model,
    build_par,
    build_pseudo_labeler,
    needs_dino,
)
from ecaseg.engine.config import Config, apply_overrides, config_from_dict
from ecaseg.engine.evaluation import evaluate_segmentation, evaluate_wsss
from ecaseg.engine.inference import predict_probs
from ecaseg.engine.trainer import load_checkpoint

SCALES = (1.0, 0.5, 0.75)


def _network(ckpt: dict[str, Any], cfg: Config) -> Any:
    net = build_model(cfg, int(ckpt["model"]["classifier.weight"].shape[0]) + 1, load_weights=False)
    net.load_state_dict(ckpt["model"])
    return net.eval()


def merge_rules(ckpt: dict[str, Any], max_images: int) -> dict[str, Any]:
    cfg = config_from_dict(ckpt["config"])
    net = _network(ckpt, cfg)
    data = build_dataset(cfg, cfg.data.val_split, train=False)
    cpu = torch.device("cpu")
    out: dict[str, Any] = {}
    for merge in ("max", "mean"):
        for crf in (False, True):
            start = time.perf_counter()
            result = evaluate_segmentation(
                net, data, device=cpu, scales=SCALES, flip=True, merge=merge, resize_long=0,
                crf=CRFParams() if crf else None, max_images=max_images, progress=False,
            )  # fmt: skip
            out[merge + ("_crf" if crf else "")] = {
                "miou": result["miou"],
                "seconds": time.perf_counter() - start,
            }
    changed = total = 0
    with torch.no_grad():
        for i in range(min(len(data), max_images) if max_images else len(data)):  # type: ignore[arg-type]
            x = data[i]["image"][None]
            a = predict_probs(net, x, SCALES, True, merge="max").argmax(1)
            b = predict_probs(net, x, SCALES, True, merge="mean").argmax(1)
            changed += int((a != b).sum())
            total += a.numel()
    out["pixels_changed"] = changed / max(total, 1)
    return out


def cam_rules(ckpt: dict[str, Any], max_images: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rule in ("sum", "afa"):
        for par_input in ("scores", "softmax"):
            overrides = [f"method.cam_rule={rule}", f"method.par_input={par_input}"]
            cfg = apply_overrides(config_from_dict(ckpt["config"]), overrides)
            net = _network(ckpt, cfg)
            dino = carm = None
            if needs_dino(cfg):
                dino = build_dino(cfg)
                carm = build_carm_generator(cfg, net.num_classes, net.feature_dim)
                if ckpt.get("carm") is not None:
                    carm.load_state_dict(ckpt["carm"])
            labeler = build_pseudo_labeler(cfg, net, build_par(cfg), dino, carm)
            data = build_dataset(cfg, cfg.data.val_split, train=False)
            start = time.perf_counter()
            result = evaluate_wsss(
                net, data, labeler, device=torch.device("cpu"), max_images=max_images, progress=False
            )
            out[f"{rule}/{par_input}"] = {**result, "seconds": time.perf_counter() - start}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--max-images", type=int, default=0, help="val images (0: all)")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    figures = {
        "merge": merge_rules(ckpt, args.max_images),
        "cam_rule_x_par_input": cam_rules(ckpt, args.max_images),
    }
    path = record(
        "afa-rules",
        torch.device("cpu"),
        figures,
        {
            "checkpoint": args.checkpoint,
            "max_images": args.max_images,
            "scales": list(SCALES),
            "threads": args.threads,
        },
        results_dir=args.results_dir,
    )
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main()
