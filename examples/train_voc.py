"""The library route to the reference ECA training on PASCAL VOC (the same as ``ecaseg train --config voc``).

    python examples/train_voc.py --voc /data/VOCdevkit --mit pretrained/mit_b1.pth \
        --dino pretrained/dino_deitsmall8_pretrain.pth --work-dir work_dirs/eca_voc

Any ``section.key=value`` argument after the options overrides the config (e.g. ``train.max_iters=2000``).
The datasets are built here explicitly to show where a custom dataset would go.
"""

from __future__ import annotations

import argparse

from ecaseg import ECATrainer
from ecaseg.data import EvalTransform, TrainTransform, VOCAugDataset
from ecaseg.engine import load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train ECA on VOC 2012 + SBD")
    parser.add_argument("--voc", required=True, help="VOCdevkit (or VOC2012) folder")
    parser.add_argument("--mit", required=True, help="SegFormer ImageNet encoder mit_b1.pth")
    parser.add_argument("--dino", required=True, help="dino_deitsmall8_pretrain.pth")
    parser.add_argument("--work-dir", default="work_dirs/eca_voc")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    paths = [f"data.root={args.voc}", f"model.backbone_weights={args.mit}", f"model.dino_weights={args.dino}"]
    cfg = load_config("voc", [*paths, *args.overrides])
    d = cfg.data
    train_set = VOCAugDataset(
        d.root,
        split=d.train_split,
        transform=TrainTransform(crop_size=d.crop_size, resize_long=d.resize_long, scale_range=d.scale_range),
    )
    val_set = VOCAugDataset(d.root, split=d.val_split, transform=EvalTransform())
    trainer = ECATrainer(cfg, args.work_dir, resume=args.resume, train_dataset=train_set, val_dataset=val_set)
    print(trainer.train())


if __name__ == "__main__":
    main()
