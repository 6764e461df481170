"""Can a randomly initialised encoder learn the synthetic classes from image-level labels? A classifier probe.

Trains an encoder plus a bias-free 1x1 classifier with global max pooling (ECA's classification branch) on the
synthetic benchmark with the multi-label soft-margin loss, batch ``--batch-size`` (8), AdamW (lr ``--lr`` for
the encoder, 10x for the classifier, weight decay 0.01, constant or ``--schedule poly``), random horizontal
flips, no other augmentation, and reports the val mAP every ``--every`` iterations. No CAM, CARM or decoder:
this isolates the question "does the encoder pick up the class cues at all".

    python benchmarks/classifier_probe.py --backbone mit_nano --iters 1000
    python benchmarks/classifier_probe.py --backbone timm:test_resnet --iters 1000
    python benchmarks/classifier_probe.py --backbone mit_nano --class-colours   # colour = class (easy)

With ``--save FILE`` it is also the classification *pretraining* of an encoder, the synthetic stand-in for
ImageNet pretraining: it writes the encoder's state dict (for a ``timm:`` backbone, in the layout that
``model.backbone_weights`` loads). The packaged ``test_resnet_synthetic_cls.pth`` was made on the images of
benchmark seed 1000, disjoint from the demo's seeds (docs, "The demo")::

    python benchmarks/classifier_probe.py --backbone timm:test_resnet --seed 1000 --num-train 4000 \
        --context-prob 0.4 --iters 2000 --batch-size 16 --lr 1e-3 --schedule poly --every 500 \
        --save ecaseg/assets/test_resnet_synthetic_cls.pth

Encoders are built by :class:`ecaseg.models.ECANet` (any ``mit_*`` or ``timm:<name>`` backbone).
The record goes to ``benchmarks/results/classifier-probe-<backbone>[-colours]-cpu-<date>.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import record

from ecaseg.data.synthetic import SyntheticConfig, SyntheticWSSSDataset
from ecaseg.data.transforms import EvalTransform
from ecaseg.metrics import average_precision
from ecaseg.models import ECANet, TimmBackbone, gmp_logits
from ecaseg.utils.io import atomic_write_bytes


def _load(config: SyntheticConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = SyntheticWSSSDataset(split, config, transform=EvalTransform())
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([s["image"] for s in items]), torch.stack([s["label"] for s in items])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mit_nano")
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--schedule", choices=("constant", "poly"), default="constant")
    parser.add_argument("--save", type=Path, default=None, help="write the encoder's state dict here")
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--context-prob", type=float, default=0.0, help="0: no context patches")
    parser.add_argument("--class-colours", action="store_true", help="object colour = class (easy variant)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = SyntheticConfig(
        seed=args.seed,
        num_train=args.num_train,
        num_val=args.num_val,
        shared_colours=not args.class_colours,
        context_prob=args.context_prob,
        spurious_context_prob=0.75 * args.context_prob,
    )
    x_train, y_train = _load(config, "train")
    x_val, y_val = _load(config, "val")
    attn_blocks = 1 if args.backbone.startswith("timm:") else 2
    net = ECANet(args.backbone, num_classes=config.num_classes, attn_blocks=attn_blocks)
    encoder, classifier = net.backbone, net.classifier
    optimizer = torch.optim.AdamW(
        [
            {"params": list(encoder.parameters()), "lr": args.lr},
            {"params": list(classifier.parameters()), "lr": 10 * args.lr},
        ],
        weight_decay=0.01,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: (1.0 - i / args.iters) ** 0.9 if args.schedule == "poly" else 1.0
    )

    def logits(x: torch.Tensor) -> torch.Tensor:
        return gmp_logits(encoder(x)[-1], classifier.weight)

    def val_map() -> float:
        encoder.eval()
        with torch.no_grad():
            scores = torch.cat([logits(x_val[i : i + 50]) for i in range(0, len(x_val), 50)])
        encoder.train()
        return float(average_precision(scores, y_val).nanmean())

    history = []
    start = time.perf_counter()
    for it in range(1, args.iters + 1):
        idx = torch.randint(0, len(x_train), (args.batch_size,))
        x = x_train[idx]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        loss = F.multilabel_soft_margin_loss(logits(x), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if it % args.every == 0 or it == args.iters:
            seconds = round(time.perf_counter() - start, 1)
            entry = {"iter": it, "val_map": round(val_map(), 4), "seconds": seconds}
            history.append(entry)
            print(json.dumps(entry), flush=True)
    figures = {
        "parameters_m": round(sum(p.numel() for p in encoder.parameters()) / 1e6, 3),
        "final_val_map": history[-1]["val_map"],
        "history": history,
    }
    if args.save is not None:
        body = encoder.body if isinstance(encoder, TimmBackbone) else encoder
        state = {k: v.detach().clone() for k, v in body.state_dict().items()}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(args.save, buffer.getvalue())
        figures["saved"] = str(args.save)
        print(f"saved the encoder to {args.save}")
    name = args.backbone.replace(":", "-") + ("-colours" if args.class_colours else "")
    name += "-pretrain" if args.save is not None else ""
    print(
        "wrote",
        record(f"classifier-probe-{name}", torch.device("cpu"), figures, vars(args), args.results_dir),
    )


if __name__ == "__main__":
    main()
