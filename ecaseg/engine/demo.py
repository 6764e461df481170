"""``ecaseg demo``: the embedded synthetic WSSS benchmark, end to end, with no downloads.

Trains three models on the same synthetic data with the same budget — ECA, the AFA-style baseline (no CARM,
no CCE, affinity learning from CAM) and the fully supervised upper bound — evaluates them on the val split
and writes ``report.md``, ``metrics.json`` and figures to the output folder.

Each model's segmentation is evaluated twice, with one protocol for all three: the paper's inference
protocol (the config's ``eval`` section: scales, merge rule, flip, dense CRF; Sec. 4.1) gives
``seg_miou``, ``baseline_seg_miou``, ``supervised_seg_miou`` and ``ratio``; single-scale inference without
CRF gives the ``*_plain`` figures.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecaseg.crf import CRFParams
from ecaseg.engine.builders import build_dataset
from ecaseg.engine.config import Config, load_config
from ecaseg.engine.evaluation import evaluate_segmentation
from ecaseg.engine.inference import write_png
from ecaseg.engine.trainer import ECATrainer
from ecaseg.engine.visualize import bar_chart, training_panels
from ecaseg.errors import ConfigError
from ecaseg.metrics import format_iou_table
from ecaseg.utils.io import atomic_write_text, json_dumps_finite

__all__ = ["demo_configs", "run_demo", "seed_overrides"]


PRETRAIN_SOURCE_SEED = 1000
"""Benchmark seed whose images pretrained the packaged encoder (``test_resnet_synthetic_cls.pth``)."""

QUICK_BUDGET = [
    "train.max_iters=100",
    "train.cls_warmup_iters=25",
    "optim.warmup_iters=15",
    "data.synthetic_num_train=200",
    "data.synthetic_num_val=40",
]


def seed_overrides(seed: int) -> list[str]:
    """The overrides every run on benchmark seed ``seed`` shares (demo, ablation): the benchmark and training
    seed, no TensorBoard, no validation or checkpoints during training."""
    return [
        f"data.synthetic_seed={seed}",
        f"train.seed={seed}",
        "train.tensorboard=false",
        "train.val_interval=0",
        "train.ckpt_interval=0",
    ]


def demo_configs(seed: int, quick: bool, overrides: Sequence[str] = ()) -> dict[str, Config]:
    """The three configs of the demo (ECA, AFA-style baseline, supervised), one budget, one benchmark seed.

    The full budget is ``ecaseg/configs/synthetic.yaml``'s; ``quick`` cuts iterations and images.
    ``overrides`` (``section.key=value``) apply to all three runs, before what sets each run apart (e.g.
    ``model.backbone=timm:test_resnet model.attn_blocks=1`` for a CNN backbone).
    """
    common = seed_overrides(seed)
    if quick:
        common += QUICK_BUDGET
    common += list(overrides)
    if seed == PRETRAIN_SOURCE_SEED:
        cfg = load_config("synthetic", common)
        if cfg.model.backbone_weights == "packaged:test_resnet_synthetic_cls.pth":
            raise ConfigError(
                f"seed {seed} is the benchmark seed the packaged encoder was pretrained on; choose another "
                "seed or other model.backbone_weights"
            )
    return {
        "eca": load_config("synthetic", [*common, "name=eca"]),
        "baseline": load_config(
            "synthetic",
            [
                *common,
                "name=baseline",
                # AFA's decoder learns from the CAM pseudo-labels, whatever the ECA config says
                "method.use_cam_seg=true",
                "method.use_carm_seg=false",
                "method.use_cce=false",
                "method.aff_source=cam",
                # and, as AFA's released script, from the CAM propagated on the predicted affinity after
                # 30 % of the iterations (AFA: 6000 of 20000)
                "method.cam_seg_label=afa_rw",
                f"method.rw_switch_iter={round(0.3 * load_config('synthetic', common).train.max_iters)}",
            ],
        ),
        "supervised": load_config(
            "synthetic",
            [*common, "name=supervised", "method.fully_supervised=true", "train.cls_warmup_iters=0"],
        ),
    }


def run_demo(
    out_dir: Path,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the demo and return the metrics written to ``out_dir/metrics.json``.

    ``overrides`` are config overrides for all three runs (see :func:`demo_configs`); they are recorded in
    the metrics and the report.
    """
    start = time.perf_counter()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    configs = demo_configs(seed, quick, overrides)
    results: dict[str, dict[str, Any]] = {}
    val_dataset = build_dataset(configs["eca"], "val", train=False)
    class_names = list(getattr(val_dataset, "class_names", []))
    for name, cfg in configs.items():
        # the demo's own output folder: a rerun into it replaces its previous runs
        trainer = ECATrainer(cfg, out_dir / name, overwrite=True, val_dataset=val_dataset, progress=progress)
        trainer.train()
        entry: dict[str, Any] = {
            "seg": _evaluate(trainer, cfg, val_dataset, final=True),
            "seg_plain": _evaluate(trainer, cfg, val_dataset, final=False),
        }
        if name != "supervised":
            entry["wsss"] = trainer.validate()
        results[name] = entry
        if name == "eca":
            _figures(trainer, out_dir)
    bars = bar_chart(
        {name: entry["seg"]["per_class_iou"] for name, entry in results.items()},
        class_names or [str(i) for i in range(len(results["eca"]["seg"]["per_class_iou"]))],
        title="per-class IoU (%) on the val split, the paper's inference protocol",
    )
    write_png(out_dir / "per_class_iou.png", bars)
    eca_wsss = results["eca"]["wsss"]
    ev = configs["eca"].eval
    metrics = {
        "seed": seed,
        "quick": quick,
        "overrides": list(overrides),
        "protocol": {
            "scales": list(ev.scales),
            "merge": ev.merge,
            "resize_long": ev.resize_long,
            "flip": ev.flip,
            "crf": ev.crf,
        },
        "cam_pseudo_miou": eca_wsss["cam_pseudo_miou"],
        "carm_pseudo_miou": eca_wsss.get("carm_pseudo_miou", float("nan")),
        "cam_miou": eca_wsss["cam_miou"],
        "carm_miou": eca_wsss.get("carm_miou", float("nan")),
        "seg_miou": results["eca"]["seg"]["miou"],
        "baseline_seg_miou": results["baseline"]["seg"]["miou"],
        "baseline_cam_pseudo_miou": results["baseline"]["wsss"]["cam_pseudo_miou"],
        "supervised_seg_miou": results["supervised"]["seg"]["miou"],
        "seg_miou_plain": results["eca"]["seg_plain"]["miou"],
        "baseline_seg_miou_plain": results["baseline"]["seg_plain"]["miou"],
        "supervised_seg_miou_plain": results["supervised"]["seg_plain"]["miou"],
    }
    metrics["ratio"] = metrics["seg_miou"] / max(metrics["supervised_seg_miou"], 1e-9)
    metrics["ratio_plain"] = metrics["seg_miou_plain"] / max(metrics["supervised_seg_miou_plain"], 1e-9)
    metrics["seconds"] = time.perf_counter() - start
    atomic_write_text(out_dir / "metrics.json", json_dumps_finite(metrics, str(out_dir / "metrics.json")))
    atomic_write_text(out_dir / "report.md", _report(metrics, results, class_names))
    return metrics


def _evaluate(trainer: ECATrainer, cfg: Config, dataset: Any, final: bool) -> dict[str, Any]:
    """Val mIoU with the paper's inference protocol (``final``) or single-scale without CRF."""
    ev = cfg.eval
    seg = evaluate_segmentation(
        trainer.net,
        dataset,
        device=trainer.device,
        scales=ev.scales if final else (1.0,),
        flip=ev.flip and final,
        crf=CRFParams() if final and ev.crf else None,
        crf_workers=ev.crf_workers,
        crf_backend=ev.crf_backend,
        batch_size=ev.batch_size,
        progress=False,
        merge=ev.merge if final else "mean",
        resize_long=ev.resize_long if final else 0,
    )
    seg.pop("confusion", None)
    return dict(seg)


def _figures(trainer: ECATrainer, out_dir: Path) -> None:
    dataset = trainer.val_dataset
    if dataset is None:
        return
    samples = [dataset[i] for i in range(min(4, len(dataset)))]  # type: ignore[arg-type]
    images = torch.stack([s["image"] for s in samples]).to(trainer.device)
    labels = torch.stack([s["label"] for s in samples]).to(trainer.device)
    masks = torch.stack([s["mask"] for s in samples]) if all("mask" in s for s in samples) else None
    trainer.net.eval()
    pseudo = trainer.labeler(images, labels, with_band=False, with_carm=trainer.dino is not None)
    with torch.no_grad():
        pred = trainer.net.forward_seg(images).argmax(1)
    names = list(getattr(dataset, "class_names", []))
    panels = training_panels(images, pseudo, pred, len(samples), masks=masks, class_names=names or None)
    write_png(out_dir / "panels.png", np.ascontiguousarray(panels))


#: What each figure of ``metrics.json`` measures: in plain terms first (see the glossary of the report),
#: then where the paper reports it.
METRIC_NAMES: dict[str, str] = {
    "cam_miou": "CAM label: each pixel to its most active labelled class, background below alpha "
    "(paper: Table 4, CAM column)",
    "cam_pseudo_miou": "CAM pseudo-label: the CAM label after PAR, a training target of the decoder "
    "(paper: L_seg of Eq. (12))",
    "carm_miou": "CARM label: the CARM thresholded at alpha like the CAM (paper: Eq. (7)-(10))",
    "carm_pseudo_miou": "CARM pseudo-label: the CARM label after PAR, ECA's second training target of the "
    "decoder (paper: Eq. (12))",
    "seg_miou": "ECA segmentation: the decoder's prediction, the headline figure (paper: Tables 2 and 3)",
    "baseline_seg_miou": "AFA baseline segmentation: the same training without CARM and cross-view loss "
    "(paper: Table 4, first row)",
    "supervised_seg_miou": "supervised reference: the same network trained on the ground-truth masks",
    "seg_miou_plain": "ECA segmentation, single scale, no flip, no CRF",
    "baseline_seg_miou_plain": "AFA baseline segmentation, single scale, no flip, no CRF",
    "supervised_seg_miou_plain": "supervised bound, single scale, no flip, no CRF",
}


def demo_targets(metrics: dict[str, Any]) -> list[tuple[str, bool]]:
    """The paper's claims, as checked on the benchmark: ``(statement, met)``."""
    return [
        (
            f"CARM pseudo-labels beat CAM pseudo-labels ({100 * metrics['carm_pseudo_miou']:.1f} % vs "
            f"{100 * metrics['cam_pseudo_miou']:.1f} %)",
            metrics["carm_pseudo_miou"] > metrics["cam_pseudo_miou"],
        ),
        (
            f"ECA beats the AFA baseline ({100 * metrics['seg_miou']:.1f} % vs "
            f"{100 * metrics['baseline_seg_miou']:.1f} %)",
            metrics["seg_miou"] > metrics["baseline_seg_miou"],
        ),
        (
            f"ECA reaches 90 % of the supervised bound ({100 * metrics['ratio']:.1f} %, Table 2's ratio)",
            metrics["ratio"] >= 0.90,
        ),
    ]


def _report(metrics: dict[str, Any], results: dict[str, dict[str, Any]], class_names: list[str]) -> str:
    protocol = metrics["protocol"]
    final = (
        f"scales {protocol['scales']} merged by {protocol.get('merge', 'mean')}, flip {protocol['flip']}, "
        f"CRF {protocol['crf']}"
    )
    lines = [
        "# ecaseg demo: synthetic WSSS benchmark",
        "",
        f"Seed {metrics['seed']}{' (quick budget)' if metrics['quick'] else ''}, {metrics['seconds']:.0f} s.",
        "",
        *([f"Config overrides: `{' '.join(metrics['overrides'])}`.", ""] if metrics["overrides"] else []),
        f"Segmentation is evaluated on the val split with one protocol for all three models: {final} "
        "(the paper's inference protocol), and single-scale without flip and CRF (plain).",
        "",
        "## Terms",
        "",
        "- **mIoU**: intersection over union of predicted and true pixels, per class, averaged over the "
        "classes (background included).",
        "- **CAM** (class activation map): where the image classifier finds evidence of a labelled class. "
        "Thresholded into a label map, each pixel goes to its most active class, or to the background "
        "where no class map reaches **alpha** (`method.alpha`, in (0, 1); maps are normalised to [0, 1]).",
        "- **CARM** (class-aware affinity region map, ECA's contribution): the CAM's most confident pixels "
        "(seeds) spread to the pixels that a frozen self-supervised vision transformer finds similar, then "
        "corrected with one mean feature (prototype) per class; thresholded like the CAM.",
        "- **PAR** (pixel-adaptive refinement): smooths a map along the image's colours and positions, so "
        "that labels follow the objects' edges.",
        "- **pseudo-label**: a label map computed from the image-level labels alone (no masks), on which the "
        "segmentation decoder is trained: ECA uses both the CAM and the CARM pseudo-labels, the AFA baseline "
        "(the method ECA builds on) the CAM one only.",
        "- **supervised reference** (`supervised_seg_miou`, the paper's 'fully supervised' upper bound): the "
        "same network trained on the ground-truth masks with the same short budget. It is a reference, not "
        "a ceiling: it is trained no longer than the others, so a weakly supervised model can score above "
        "it, and `ratio` can exceed 100 %.",
        "",
        "## Targets",
        "",
    ]
    for statement, met in demo_targets(metrics):
        lines.append(f"- {'met' if met else 'NOT met'}: {statement}")
    lines += [
        "",
        "## Figures (mIoU %, val split)",
        "",
        "| figure | what it measures | mIoU % |",
        "| --- | --- | --- |",
    ]
    for key, meaning in METRIC_NAMES.items():
        lines.append(f"| `{key}` | {meaning} | {100 * metrics[key]:.1f} |")
    lines.append(f"| `ratio` | seg_miou / supervised_seg_miou | {100 * metrics['ratio']:.1f} % |")
    lines.append(
        f"| `ratio_plain` | the same without post-processing | {100 * metrics['ratio_plain']:.1f} % |"
    )
    lines.append("")
    for name, entry in results.items():
        lines.append(
            format_iou_table(entry["seg"]["per_class_iou"], class_names, title=f"{name} segmentation (IoU %)")
        )
        lines.append("")
    lines.append(
        "![image, CAM, CARM, CAM and CARM pseudo-labels, prediction, ground truth, class colours](panels.png)"
    )
    lines.append("")
    lines.append(
        "`panels.png`, one row per val image, left to right: the image; the CAM and the CARM (largest "
        "class value per pixel, as a heat map); the CAM and CARM pseudo-labels (after PAR); the ECA "
        "decoder's prediction with single-scale inference, no flip and no CRF (the `seg_miou_plain` "
        "protocol, not the headline's); the ground truth; the class colours below."
    )
    lines.append("")
    lines.append("![per-class IoU (%)](per_class_iou.png)")
    return "\n".join(lines) + "\n"
