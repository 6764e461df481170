"""The multi-stage WSSS route with ecaseg's refinement in the middle, end to end on the synthetic benchmark.

1. a multi-label classifier, written with timm alone (no ecaseg), is trained on the training images;
2. its CAMs of the training images are saved IRN-style (``<id>.npy`` dicts with ``keys`` and ``high_res``);
3. ``ecaseg refine`` turns them into pseudo-label PNGs, once with the plain CAM threshold and once with
   the default refinement (CARM + PAR with the packaged ViT);
4. ecaseg trains a segmentation network fully supervised on each folder of pseudo-label PNGs
   (``method.fully_supervised=true`` with ``data.masks_dir`` = the pseudo-labels) and scores it on the
   val split's ground truth (single scale, no CRF).

    python examples/multistage_refine.py --seeds 0,1,2 --out multistage_runs

Prints one line per seed and method and writes ``<out>/multistage.json``. On two CPU cores one seed takes
a few minutes (``--iters`` and ``--cls-iters`` shorten it).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import ResNet

from ecaseg.data import normalize
from ecaseg.data.io import read_image
from ecaseg.data.synthetic import write_synthetic_dataset
from ecaseg.engine.builders import build_dataset
from ecaseg.engine.config import load_config
from ecaseg.engine.demo import seed_overrides
from ecaseg.engine.evaluation import evaluate_segmentation
from ecaseg.engine.refine import RefineJob, refine_folder, write_cam_file
from ecaseg.engine.trainer import ECATrainer
from ecaseg.refine import DEFAULT_METHOD
from ecaseg.utils.assets import packaged_asset


def _split(root: Path, name: str) -> list[str]:
    return (root / f"{name}.txt").read_text(encoding="utf-8").split()


def train_classifier(root: Path, ids: list[str], num_fg: int, iters: int, seed: int) -> ResNet:
    """A timm ResNet (packaged classification-pretrained encoder) + a fresh GAP/linear head."""
    net = cast(
        ResNet, timm.create_model("test_resnet", num_classes=num_fg, output_stride=16, pretrained=False)
    )
    state = torch.load(packaged_asset("test_resnet_synthetic_cls.pth"), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=False)  # the encoder; the head is new
    images = torch.stack([torch.from_numpy(read_image(root / "images" / f"{i}.png")) for i in ids])
    images = images.permute(0, 3, 1, 2).float() / 255.0
    names = (root / "classes.txt").read_text(encoding="utf-8").split()
    labels_json = json.loads((root / "labels.json").read_text(encoding="utf-8"))
    labels = torch.zeros(len(ids), num_fg)
    for row, i in enumerate(ids):
        for name in labels_json[i]:
            labels[row, names.index(name) - 1] = 1.0
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in net.named_parameters() if not n.startswith("fc.")], "lr": 1e-3},
            {"params": [p for n, p in net.named_parameters() if n.startswith("fc.")], "lr": 1e-2},
        ],
        weight_decay=0.01,
    )
    net.train()
    for _ in range(iters):
        idx = torch.randint(0, len(ids), (8,), generator=gen)
        x = images[idx]
        x = torch.where((torch.rand(8, generator=gen) < 0.5)[:, None, None, None], x.flip(-1), x)
        loss = F.multilabel_soft_margin_loss(net(normalize(x)), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def save_cams(net: ResNet, root: Path, ids: list[str], cams_dir: Path) -> None:
    """IRN-style CAM files: ReLU(W f) of the image and its flip, at the image size, each map / its max."""
    names = (root / "classes.txt").read_text(encoding="utf-8").split()
    labels_json = json.loads((root / "labels.json").read_text(encoding="utf-8"))
    fc_weight = net.get_parameter("fc.weight")
    for i in ids:
        image = torch.from_numpy(read_image(root / "images" / f"{i}.png")).permute(2, 0, 1).float() / 255.0
        x = normalize(torch.stack([image, image.flip(-1)]))
        cam = F.relu(torch.einsum("kc,bchw->bkhw", fc_weight, net.forward_features(x)))
        cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)
        cam = cam[0] + cam[1].flip(-1)
        keys = torch.tensor([names.index(n) - 1 for n in labels_json[i]], dtype=torch.long)
        high = cam[keys] / (cam[keys].flatten(1).amax(1)[:, None, None] + 1e-5)
        write_cam_file(cams_dir / f"{i}.npy", keys.numpy(), high.numpy())


def train_on_pseudo_labels(root: Path, pseudo: Path, work: Path, seed: int, iters: int) -> float:
    """Fully supervised ecaseg training on a folder of pseudo-label PNGs; val mIoU on the ground truth."""
    cfg = load_config(
        "synthetic",
        [
            "data.dataset=folder",
            f"data.images_dir={root / 'images'}",
            f"data.labels_file={root / 'train_labels.json'}",
            f"data.val_labels_file={root / 'val_labels.json'}",
            f"data.masks_dir={pseudo}",
            f"data.val_masks_dir={root / 'masks'}",
            f"data.classes_file={root / 'classes.txt'}",
            "method.fully_supervised=true",
            "train.cls_warmup_iters=0",
            f"train.max_iters={iters}",
            f"train.seed={seed}",
            "train.tensorboard=false",
            "train.val_interval=0",
            "train.ckpt_interval=0",
        ],
    )
    trainer = ECATrainer(cfg, work, overwrite=True, progress=False)
    trainer.train()
    val = build_dataset(cfg, cfg.data.val_split, train=False)
    scores = evaluate_segmentation(trainer.net, val, device=trainer.device, progress=False)
    return float(scores["miou"])


def run_seed(
    seed: int, out: Path, iters: int, cls_iters: int, methods: Sequence[str], sizes: Sequence[str] = ()
) -> dict[str, Any]:
    # the benchmark of `ecaseg demo --seed SEED` (400 training and 100 val images of 128 px)
    config = build_dataset(
        load_config("synthetic", [*seed_overrides(seed), *sizes]), "val", train=False
    ).config  # type: ignore[attr-defined]
    root = write_synthetic_dataset(out / f"seed{seed}" / "data", config)
    labels = json.loads((root / "labels.json").read_text(encoding="utf-8"))
    for split in ("train", "val"):
        subset = {i: labels[i] for i in _split(root, split)}
        (root / f"{split}_labels.json").write_text(json.dumps(subset), encoding="utf-8")
    train_ids = _split(root, "train")
    num_fg = len((root / "classes.txt").read_text(encoding="utf-8").split()) - 1
    cams = out / f"seed{seed}" / "cams"
    if not cams.is_dir():
        net = train_classifier(root, train_ids, num_fg, cls_iters, seed)
        tmp = cams.with_name("cams.partial")
        tmp.mkdir(parents=True, exist_ok=True)
        save_cams(net, root, train_ids, tmp)
        tmp.rename(cams)
    result: dict[str, Any] = {}
    for method in methods:
        pseudo = out / f"seed{seed}" / f"pseudo_{method}"
        summary = refine_folder(
            RefineJob(
                cams=cams,
                images=root / "images",
                out=pseudo,
                num_classes=num_fg + 1,
                method=method,  # type: ignore[arg-type]
                masks=root / "masks",
                dino="vit_nano_p8_synthetic",
                progress=False,
            )
        )
        seg = train_on_pseudo_labels(root, pseudo, out / f"seed{seed}" / f"seg_{method}", seed, iters)
        result[method] = {"pseudo_label_miou": summary["miou"], "seg_miou": seg}
        print(
            f"seed {seed} {method}: pseudo-labels {100 * summary['miou']:.1f} %, "
            f"segmentation {100 * seg:.1f} %"
        )
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", type=Path, default=Path("multistage_runs"))
    parser.add_argument("--iters", type=int, default=500, help="segmentation training iterations")
    parser.add_argument("--cls-iters", type=int, default=300, help="classifier training iterations")
    parser.add_argument("--methods", default=f"threshold,{DEFAULT_METHOD}")
    parser.add_argument("--num-train", type=int, default=400, help="training images (the demo's 400)")
    parser.add_argument("--num-val", type=int, default=100, help="val images (the demo's 100)")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    sizes = [f"data.synthetic_num_train={args.num_train}", f"data.synthetic_num_val={args.num_val}"]
    runs = {
        f"seed{s}": run_seed(int(s), args.out, args.iters, args.cls_iters, methods, sizes)
        for s in args.seeds.split(",")
    }
    summary = {
        m: {
            "pseudo_label_miou_mean": statistics.mean(r[m]["pseudo_label_miou"] for r in runs.values()),
            "seg_miou_mean": statistics.mean(r[m]["seg_miou"] for r in runs.values()),
        }
        for m in methods
    }
    payload = {"runs": runs, "summary": summary, "iters": args.iters, "cls_iters": args.cls_iters}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multistage.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return payload


if __name__ == "__main__":
    main()
