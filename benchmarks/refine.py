"""Refining CAMs that ecaseg did not make: threshold, CRF, PAR, random walk, CARM, CARM + PAR / CRF.

Three CAM sources per benchmark seed, each trained outside the ECA trainer's CARM path:

* ``cam``: a plain multi-label classifier written with timm alone (``test_resnet`` encoder with the packaged
  classification-pretrained weights, output stride 16, a fresh global-average-pooling + linear head, the
  multi-label soft-margin loss, ``--cls-iters`` iterations of AdamW at batch 8 with flips), its class
  activation maps (ReLU of the linear head applied to the features, image + flip summed, each map divided by
  its maximum as IRN does);
* ``gradcam``: Grad-CAM of the same classifier (``pytorch-grad-cam``, last residual stage, one target per
  labelled class; its maps are min-max scaled to [0, 1] by the library);
* ``afa``: the CAM of the AFA-style baseline of ``ecaseg demo`` (no CARM, no CCE, affinity from the CAM),
  trained with ``ECATrainer`` from the demo's baseline config (``--afa-iters``; multi-scale rule of the
  config).

Each source's CAMs of the val split (100 images) are written IRN-style (``<id>.npy`` dicts with ``keys``,
``cam`` and ``high_res``), read back with :func:`ecaseg.engine.refine.read_cam_file`, refined with every
method of :mod:`ecaseg.refine` with its defaults (the packaged ViT's CARM settings), and scored against the
masks (pseudo-label mIoU, and ms per image for the refinement alone, ViT included, batches of 8).

Extra rows: ``threshold_best`` (the CAM threshold at the alpha of 0.1-0.9 that scores best on these very
masks: an oracle, for reference), ``carm_readme_v020`` (``CARMGenerator`` with the constructor's paper
defaults, as ecaseg 0.2.0's README built it: gamma 0.15, Eq. (5) cue, calibration with the DINO tokens),
``carm_calib_dino`` (the ViT's settings plus calibration with the DINO tokens, prototypes updated on the
fly), and ``crf_afa_params`` (the CRF with AFA's full-size VOC parameters).

    python benchmarks/refine.py --seeds 0,1,2 --threads 1 --work-dir refine_runs

Rows are cached per source and seed in ``--work-dir`` (``--fresh`` recomputes them); CAMs and the trained
classifiers and baselines too. Writes ``benchmarks/results/refine-cpu-<date>.json`` (``--tag`` adds a
suffix) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import record

from ecaseg.cam import multiscale_cam
from ecaseg.carm import CARMGenerator
from ecaseg.crf import CRFParams
from ecaseg.data.synthetic import SyntheticWSSSDataset
from ecaseg.data.transforms import normalize
from ecaseg.dino_affinity import DINOAffinity
from ecaseg.engine.builders import build_dataset, build_model
from ecaseg.engine.config import load_config
from ecaseg.engine.demo import demo_configs, seed_overrides
from ecaseg.engine.refine import read_cam_file, write_cam_file
from ecaseg.engine.trainer import ECATrainer, load_checkpoint
from ecaseg.metrics import SegmentationMetric
from ecaseg.refine import REFINE_METHODS, CAMRefiner
from ecaseg.utils.assets import packaged_asset

SOURCES = ("cam", "gradcam", "afa")


def load_split(seed: int, split: str) -> dict[str, Any]:
    """Images ``[N, 3, H, W]`` in [0, 1], masks, labels and ids of the demo's benchmark of ``seed``."""
    cfg = load_config("synthetic", seed_overrides(seed))
    config = build_dataset(cfg, split, train=False).config  # type: ignore[attr-defined]
    ds = SyntheticWSSSDataset(split, config)
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([torch.from_numpy(it["image"]).permute(2, 0, 1) for it in items]).float() / 255.0
    masks = torch.stack([torch.from_numpy(it["mask"]).long() for it in items])
    labels = torch.stack([it["label"].float() for it in items])
    return {"images": images, "masks": masks, "labels": labels, "ids": list(ds.ids), "config": config}


def build_classifier(num_fg: int) -> torch.nn.Module:
    net = timm.create_model("test_resnet", num_classes=num_fg, output_stride=16, pretrained=False)
    state = torch.load(packaged_asset("test_resnet_synthetic_cls.pth"), map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == {"fc.weight", "fc.bias"}, (missing, unexpected)
    return net


def train_classifier(train: dict[str, Any], iters: int, seed: int, path: Path) -> torch.nn.Module:
    num_fg = train["labels"].shape[1]
    net = build_classifier(num_fg)
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in net.named_parameters() if not n.startswith("fc.")], "lr": 1e-3},
            {"params": net.fc.parameters(), "lr": 1e-2},
        ],
        weight_decay=0.01,
    )
    net.train()
    n = train["images"].shape[0]
    for _ in range(iters):
        idx = torch.randint(0, n, (8,), generator=gen)
        x = train["images"][idx]
        flip = torch.rand(8, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.multilabel_soft_margin_loss(net(normalize(x)), train["labels"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net.eval()


@torch.no_grad()
def classifier_cams(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """IRN-style CAM: ReLU(W f), image + flip summed, at the image size, each map / its maximum."""
    size = images.shape[-2:]
    out = []
    for chunk in images.split(16):
        x = normalize(torch.cat([chunk, chunk.flip(-1)]))
        feats = net.forward_features(x)
        cam = F.relu(torch.einsum("kc,bchw->bkhw", net.fc.weight, feats))
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
        b = chunk.shape[0]
        out.append(cam[:b] + cam[b:].flip(-1))
    cams = torch.cat(out)
    return cams / (cams.flatten(2).amax(-1)[..., None, None] + 1e-5)


def gradcam_cams(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cams = torch.zeros(images.shape[0], labels.shape[1], *images.shape[-2:])
    with GradCAM(model=net, target_layers=[net.layer4]) as grad_cam:
        for i in range(images.shape[0]):  # one target per labelled class: Grad-CAM's own API
            for c in labels[i].nonzero().flatten().tolist():
                m = grad_cam(input_tensor=normalize(images[i : i + 1]), targets=[ClassifierOutputTarget(c)])
                cams[i, c] = torch.from_numpy(m[0])
    return cams


def afa_cams(seed: int, iters: int, work: Path, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    cfg = demo_configs(seed, quick=False, overrides=[f"train.max_iters={iters}"])["baseline"]
    run = work / f"afa_seed{seed}"
    if not (run / "last.pth").is_file():
        ECATrainer(cfg, run, overwrite=True, progress=False).train()
    ckpt = load_checkpoint(run / "last.pth")
    net = build_model(cfg, labels.shape[1] + 1, load_weights=False)
    net.load_state_dict(ckpt["model"])
    net.eval()
    out = []
    with torch.no_grad():
        for x, y in zip(images.split(16), labels.split(16)):
            out.append(
                multiscale_cam(
                    net, normalize(x), y, scales=cfg.method.cam_scales, flip=True, rule=cfg.method.cam_rule
                )
            )
    return torch.cat(out)


def save_irn(cams: torch.Tensor, labels: torch.Tensor, ids: list[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for cam, label, name in zip(cams, labels, ids):
        keys = label.nonzero().flatten()
        high = cam[keys]
        low = F.interpolate(high[None], scale_factor=0.25, mode="bilinear", align_corners=False)[0]
        write_cam_file(folder / f"{name}.npy", keys.numpy(), high.numpy(), low.numpy())


def load_irn(folder: Path, ids: list[str], num_fg: int, size: tuple[int, int]) -> torch.Tensor:
    return torch.stack([read_cam_file(folder / f"{i}.npy", num_fg, size).cams for i in ids])


def score(
    refine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    data: dict[str, Any],
    cams: torch.Tensor,
    num_classes: int,
    batch: int = 8,
) -> tuple[float, float]:
    metric = SegmentationMetric(num_classes)
    seconds = 0.0
    for s in range(0, cams.shape[0], batch):
        img, cam, lab = data["images"][s : s + batch], cams[s : s + batch], data["labels"][s : s + batch]
        start = time.perf_counter()
        label = refine(img, cam, lab)
        seconds += time.perf_counter() - start
        metric.update(label, data["masks"][s : s + batch])
    return 100.0 * metric.compute()["miou"], 1000.0 * seconds / cams.shape[0]


def rows_for(
    cams: torch.Tensor, data: dict[str, Any], dino: DINOAffinity, num_classes: int
) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for method in REFINE_METHODS:
        refiner = CAMRefiner(num_classes, method, dino, crf_workers=0)
        rows[method] = score(lambda i, c, y, r=refiner: r(i, c, y).label, data, cams, num_classes)
    best = max(
        (
            score(
                lambda i, c, y, a=a: CAMRefiner(num_classes, "threshold", alpha=a)(i, c, y).label,
                data,
                cams,
                num_classes,
            )[0],
            a,
        )
        for a in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    )
    rows["threshold_best"] = (best[0], float("nan"), best[1])
    crf_afa = CAMRefiner(num_classes, "crf", crf_params=CRFParams(), crf_workers=0)
    rows["crf_afa_params"] = score(lambda i, c, y: crf_afa(i, c, y).label, data, cams, num_classes)
    old = CARMGenerator(num_classes, feature_dim=dino.embed_dim)
    old_refiner = CAMRefiner(num_classes, "carm", dino, carm=old)
    rows["carm_readme_v020"] = score(lambda i, c, y: old_refiner(i, c, y).label, data, cams, num_classes)
    calib = CARMGenerator.for_affinity(dino, num_classes, feature_dim=dino.embed_dim, calibrate=True)
    calib_refiner = CAMRefiner(num_classes, "carm", dino, carm=calib)
    rows["carm_calib_dino"] = score(lambda i, c, y: calib_refiner(i, c, y).label, data, cams, num_classes)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--cls-iters", type=int, default=300)
    parser.add_argument("--afa-iters", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=Path("refine_runs"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--fresh", action="store_true", help="recompute rows cached in --work-dir")
    parser.add_argument("--max-images", type=int, default=0, help="the first N val images only (0: all)")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    sources = [s for s in args.sources.split(",") if s]
    dino = DINOAffinity("vit_nano_p8_synthetic")
    results: dict[str, Any] = {}
    for seed in seeds:
        val = load_split(seed, "val")
        if args.max_images:
            val = {k: v[: args.max_images] if k != "config" else v for k, v in val.items()}
        num_classes = val["labels"].shape[1] + 1
        size = (val["images"].shape[-2], val["images"].shape[-1])
        for source in sources:
            folder = args.work_dir / f"cams_{source}_seed{seed}"
            if not folder.is_dir():
                if source in ("cam", "gradcam"):
                    train = load_split(seed, "train")
                    net = train_classifier(train, args.cls_iters, seed, args.work_dir / f"cls_seed{seed}.pth")
                    cams = (
                        classifier_cams(net, val["images"])
                        if source == "cam"
                        else gradcam_cams(net, val["images"], val["labels"])
                    )
                else:
                    cams = afa_cams(seed, args.afa_iters, args.work_dir, val["images"], val["labels"])
                save_irn(cams * val["labels"][:, :, None, None], val["labels"], val["ids"], folder)
            cams = load_irn(folder, val["ids"], num_classes - 1, size)
            cached = args.work_dir / f"rows_{source}_seed{seed}.json"
            if cached.is_file() and not args.fresh:  # rows of an earlier run of this script (same work dir)
                rows = json.loads(cached.read_text())
            else:
                rows = rows_for(cams, val, dino, num_classes)
                cached.write_text(json.dumps(rows))
            results[f"{source}/seed{seed}"] = {k: list(v) for k, v in rows.items()}
            print(source, seed, {k: round(v[0], 1) for k, v in rows.items()}, flush=True)
    methods = list(next(iter(results.values())).keys())
    table = ["| source | " + " | ".join(methods) + " |", "|" + " --- |" * (len(methods) + 1)]
    summary: dict[str, Any] = {}
    for source in sources:
        per = {m: [results[f"{source}/seed{s}"][m][0] for s in seeds] for m in methods}
        ms = {m: [results[f"{source}/seed{s}"][m][1] for s in seeds] for m in methods}
        summary[source] = {
            m: {"miou_mean": statistics.mean(v), "miou_seeds": v, "ms_mean": statistics.mean(ms[m])}
            for m, v in per.items()
        }
        table.append(
            f"| {source} | "
            + " | ".join(
                f"{statistics.mean(per[m]):.1f} ({min(per[m]):.1f}-{max(per[m]):.1f})" for m in methods
            )
            + " |"
        )
    ms_row = {m: statistics.mean(results[k][m][1] for k in results) for m in methods}
    table.append("| ms / image | " + " | ".join(f"{ms_row[m]:.1f}" for m in methods) + " |")
    print("\n".join(table))
    kind = "refine" + (f"-{args.tag}" if args.tag else "")
    path = record(
        kind,
        torch.device("cpu"),
        {"runs": results, "summary": summary, "ms_per_image": ms_row, "table": table},
        {
            "seeds": seeds,
            "sources": sources,
            "cls_iters": args.cls_iters,
            "afa_iters": args.afa_iters,
            "threads": args.threads,
            "dino": "vit_nano_p8_synthetic",
            "carm_settings": repr(dino.carm_settings),
        },
        results_dir=args.results_dir,
    )
    print("recorded", path)
    return summary


if __name__ == "__main__":
    main()
