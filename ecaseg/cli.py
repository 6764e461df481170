"""The ``ecaseg`` command line: train, evaluate, predict, pseudo-labels, visualize, demo, configs.

Every user error (missing dataset root, bad checkpoint, unreadable image, invalid config) ends with one
line on stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from ecaseg import __version__
from ecaseg.crf import CRFParams
from ecaseg.data import read_image
from ecaseg.data.synthetic import SyntheticConfig, SyntheticWSSSDataset
from ecaseg.engine.builders import (
    build_carm_generator,
    build_dataset,
    build_dino,
    build_model,
    build_par,
    build_pseudo_labeler,
    needs_dino,
)
from ecaseg.engine.config import (
    Config,
    EvalConfig,
    apply_overrides,
    available_configs,
    config_from_dict,
    config_to_dict,
    load_config,
    resolve_device,
)
from ecaseg.engine.dino_pretrain import DINOPretrainConfig, pretrain_dino
from ecaseg.engine.evaluation import eval_loader, evaluate_segmentation
from ecaseg.engine.inference import (
    overlay,
    predict_batched,
    predict_labels,
    to_network_input,
    write_png,
)
from ecaseg.engine.pseudo import PseudoLabelPipeline
from ecaseg.engine.trainer import ECATrainer, check_class_names, check_compatible, load_checkpoint
from ecaseg.engine.visualize import heatmap, label_panel, panel_row, to_rgb_uint8
from ecaseg.errors import CheckpointError, ConfigError, DatasetError, EcasegError
from ecaseg.metrics import SegmentationMetric, format_iou_table
from ecaseg.models import ECANet
from ecaseg.utils.dist import finish_distributed, init_distributed, is_main_process
from ecaseg.utils.io import atomic_write_text, check_writable, json_dumps_finite

__all__ = [
    "build_parser",
    "build_pretrain_dino_parser",
    "main",
    "pretrain_dino_main",
    "run_pretrain_dino",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _device(name: str) -> torch.device:
    return resolve_device(name, "--device")


def _load_network(args: argparse.Namespace) -> tuple[Config, ECANet, dict[str, Any]]:
    """Config and network of ``--checkpoint`` (checked against ``--config`` when one is given)."""
    ckpt = load_checkpoint(args.checkpoint)
    saved = config_from_dict(ckpt["config"])
    overrides = getattr(args, "overrides", []) or []
    if getattr(args, "config", None):
        cfg = load_config(args.config, overrides)
        check_compatible(saved, cfg)
    else:
        cfg = apply_overrides(config_from_dict(ckpt["config"]), overrides)
    num_classes = len(ckpt.get("class_names") or []) or int(ckpt["model"]["classifier.weight"].shape[0]) + 1
    net = build_model(cfg, num_classes, load_weights=False)
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {args.checkpoint} does not match the network: {err}") from None
    return cfg, net, ckpt


def cmd_train(args: argparse.Namespace) -> int:
    init_distributed()
    ok = False
    try:
        rc = _train(args)
        ok = rc == 0
        return rc
    finally:  # every rank waits for the others (after a success) and leaves the process group
        finish_distributed(ok)


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    trainer = ECATrainer(
        cfg, args.work_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
    )
    try:
        metrics = trainer.train()
    except KeyboardInterrupt:
        last = Path(args.work_dir) / "last.pth"
        config = " ".join([args.config, *args.overrides])
        print(
            f"ecaseg train: interrupted at iteration {trainer.iteration}; checkpoint {last}; resume with: "
            f"ecaseg train --config {config} --work-dir {args.work_dir} --resume",
            file=sys.stderr,
        )
        return 130
    if is_main_process():
        print(json_dumps_finite({"work_dir": str(args.work_dir), "iteration": trainer.iteration, **metrics}))
    return 0


def _protocol(cfg: Config, args: argparse.Namespace) -> EvalConfig:
    """The config's ``eval`` section (the checkpoint's, or ``--config``'s) with the command's flags on top."""
    ev = dataclasses.replace(cfg.eval)
    if args.scales is not None:
        ev.scales = tuple(args.scales)
    if args.merge is not None:
        ev.merge = args.merge
    if args.resize_long is not None:
        ev.resize_long = args.resize_long
    if args.flip is not None:
        ev.flip = args.flip
    if args.crf is not None:
        ev.crf = args.crf
    if args.batch_size is not None:
        ev.batch_size = args.batch_size
    if args.crf_workers is not None:
        ev.crf_workers = args.crf_workers
    if args.crf_backend is not None:
        ev.crf_backend = args.crf_backend
    if ev.batch_size < 0 or ev.crf_workers < 0:
        raise ConfigError(
            f"--batch-size and --crf-workers must be >= 0, got {ev.batch_size} and {ev.crf_workers}"
        )
    if not ev.scales or any(s <= 0 for s in ev.scales):
        raise ConfigError(f"--scales must be positive factors, got {list(ev.scales)}")
    if ev.resize_long < 0:
        raise ConfigError(f"--resize-long must be >= 0 (0: native size), got {ev.resize_long}")
    return ev


def _protocol_settings(ev: EvalConfig) -> dict[str, Any]:
    return {
        "scales": list(ev.scales),
        "merge": ev.merge,
        "resize_long": ev.resize_long,
        "flip": ev.flip,
        "crf": ev.crf,
    }


def cmd_doctor(args: argparse.Namespace) -> int:
    from ecaseg.engine.doctor import run_doctor

    return run_doctor(args.config, args.overrides, time_steps=args.time_steps)


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.out:
        check_writable(args.out, "--out")  # before the run, not after it
    cfg, net, ckpt = _load_network(args)
    device = _device(args.device)
    net.to(device)
    split = args.split or cfg.data.val_split
    dataset = build_dataset(cfg, split, train=False)
    check_class_names(ckpt, getattr(dataset, "class_names", ()), f"the dataset of split {split!r}")
    ev = _protocol(cfg, args)
    result = evaluate_segmentation(
        net,
        dataset,
        device=device,
        scales=ev.scales,
        flip=ev.flip,
        crf=CRFParams() if ev.crf else None,
        crf_workers=ev.crf_workers,
        crf_backend=ev.crf_backend,
        max_images=args.max_images,
        amp=cfg.train.amp,
        merge=ev.merge,
        resize_long=ev.resize_long,
        batch_size=ev.batch_size,
    )
    class_names = list(ckpt.get("class_names") or getattr(dataset, "class_names", []))
    report = {
        "miou": result["miou"],
        "per_class_iou": result["per_class_iou"],
        "pixel_accuracy": result["pixel_accuracy"],
        "mean_accuracy": result["mean_accuracy"],
        "class_names": class_names,
        "settings": {
            "checkpoint": str(args.checkpoint),
            "config": cfg.name,
            "split": split,
            **_protocol_settings(ev),
            "max_images": args.max_images,
        },
    }
    print(format_iou_table(result["per_class_iou"], class_names, title=f"{cfg.name} ({split})"))
    if args.out:
        atomic_write_text(args.out, json_dumps_finite(report, str(args.out)))
    return 0


def _walk_images(root: Path) -> list[Path]:
    """Image files under ``root``, symlinked subfolders followed (each real folder once: a link back up the
    tree is reported on stderr and not followed again)."""
    found: list[Path] = []
    seen: dict[str, str] = {}
    for folder, subdirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            print(
                f"ecaseg: note: {folder} is a link to {seen[real]}, already searched; not searched again",
                file=sys.stderr,
            )
            subdirs[:] = []
            continue
        seen[real] = folder
        subdirs.sort()
        found += [Path(folder) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in found if p.is_file())


def _collect_images(inputs: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = _walk_images(path)
            if not found:
                raise DatasetError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise DatasetError(f"input {path} does not exist")
    return paths


def _plan_outputs(inputs: Sequence[str], out_dir: Path) -> list[tuple[Path, Path, Path]]:
    """``(image, mask file, overlay file)`` for every input image; refuses plans that could lose data.

    Folder inputs are mirrored under ``out_dir`` (``photos/a/x.jpg`` -> ``OUT/a/x.jpg.png`` and
    ``OUT/a/x.jpg.overlay.png``); file inputs go to ``OUT/<name>.png``. The extension stays in the name, so
    ``x.png`` and ``x.jpg`` never share an output, and no output can be an input.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"--out {out_dir} is a file; give a folder for the predictions")
    out_resolved = out_dir.resolve()
    plan: list[tuple[Path, Path, Path]] = []
    for item in inputs:
        root = Path(item)
        if root.is_dir():
            r = root.resolve()
            if out_resolved == r or r in out_resolved.parents:
                raise DatasetError(
                    f"--out {out_dir} is the input folder {root} or inside it: predictions would be mixed "
                    "with your images (and read as inputs on the next run); choose a folder outside it"
                )
            rels = [(p, p.relative_to(root)) for p in _collect_images([item])]
        else:
            rels = [(p, Path(p.name)) for p in _collect_images([item])]
        for path, rel in rels:
            base = out_dir / rel.parent
            plan.append((path, base / f"{rel.name}.png", base / f"{rel.name}.overlay.png"))
    seen: dict[Path, Path] = {}
    inputs_resolved = {p.resolve() for p, _, _ in plan}
    for path, mask, over in plan:
        for target in (mask, over):
            if target.resolve() in inputs_resolved:
                raise DatasetError(f"the output {target} would replace the input image {target}")
            if target in seen:
                raise DatasetError(
                    f"{seen[target]} and {path} would both be written to {target}; predict them into "
                    "separate --out folders"
                )
            seen[target] = path
    return plan


def _check_images(plan: list[tuple[Path, Path, Path]], skip_bad: bool) -> tuple[list[Any], list[str]]:
    """Decode every input before any work: the first undecodable one stops the run (named), or with
    ``skip_bad`` all of them are left out of the plan and returned as messages."""
    good: list[Any] = []
    bad: list[str] = []
    for entry in tqdm(plan, desc="check images", disable=len(plan) < 50):
        try:
            read_image(entry[0], corrupt="error")
        except DatasetError as err:
            if not skip_bad:
                raise DatasetError(
                    f"{err}; nothing was predicted (pass --skip-bad to predict the other images and list "
                    "the undecodable ones)"
                ) from None
            bad.append(str(err))
            continue
        good.append(entry)
    return good, bad


def cmd_predict(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    plan = _plan_outputs(args.inputs, out_dir)  # refuse before loading anything
    plan, bad = _check_images(plan, args.skip_bad)
    if not plan:
        raise DatasetError(f"none of the {len(bad)} input images can be decoded: {bad[0]}")
    cfg, net, _ = _load_network(args)
    device = _device(args.device)
    net.to(device).eval()
    ev = _protocol(cfg, args)

    def images() -> Iterator[tuple[tuple[np.ndarray, Path, Path], Tensor]]:
        for path, mask_file, overlay_file in tqdm(plan, desc="predict"):
            image = read_image(path, corrupt="error")
            yield (image, mask_file, overlay_file), to_network_input(image, torch.device("cpu"))[0]

    for (image, mask_file, overlay_file), label in predict_batched(
        net,
        images(),
        device=device,
        batch_size=ev.batch_size,
        scales=ev.scales,
        flip=ev.flip,
        merge=ev.merge,
        resize_long=ev.resize_long,
        amp=cfg.train.amp,
        crf=CRFParams() if ev.crf else None,
        crf_workers=ev.crf_workers,
        crf_backend=ev.crf_backend,
    ):
        label_map = label.cpu().numpy()
        mask_file.parent.mkdir(parents=True, exist_ok=True)
        write_png(mask_file, label_map, palette=True)
        write_png(overlay_file, overlay(image, label_map))
    print(f"wrote {len(plan)} predictions (label PNG + overlay each) to {out_dir}")
    if bad:
        print(f"skipped {len(bad)} undecodable image(s) (--skip-bad):", file=sys.stderr)
        for message in bad:
            print(f"  {message}", file=sys.stderr)
    return 0


def _labeler(cfg: Config, net: ECANet, ckpt: dict[str, Any], device: torch.device) -> PseudoLabelPipeline:
    dino = carm = None
    if needs_dino(cfg):
        dino = build_dino(cfg).to(device)
        carm = build_carm_generator(cfg, net.num_classes, net.feature_dim).to(device)
        if ckpt.get("carm") is not None:
            carm.load_state_dict(ckpt["carm"])
    return build_pseudo_labeler(cfg, net, build_par(cfg).to(device), dino, carm)


def cmd_pseudo_labels(args: argparse.Namespace) -> int:
    cfg, net, ckpt = _load_network(args)
    device = _device(args.device)
    net.to(device).eval()
    split = args.split or cfg.data.train_split
    dataset = build_dataset(cfg, split, train=False)
    check_class_names(ckpt, getattr(dataset, "class_names", ()), f"the dataset of split {split!r}")
    if not getattr(dataset, "has_labels", True):
        raise DatasetError(
            f"split {split!r} has no image-level labels (e.g. VOC test): pseudo-labels keep only the "
            "labelled classes, so every label would be background; choose a split with labels "
            "(--split train_aug, val) or label the images first"
        )
    out_dir = Path(args.out)
    _check_fresh_output(out_dir)
    labeler = _labeler(cfg, net, ckpt, device)
    has_carm = labeler.dino is not None
    metrics = {"cam": SegmentationMetric(net.num_classes), "carm": SegmentationMetric(net.num_classes)}
    with_masks = bool(getattr(dataset, "has_masks", False))
    for sample in tqdm(eval_loader(dataset, args.max_images), desc="pseudo-labels"):
        images = sample["image"][None].to(device)
        labels = sample["label"][None].to(device)
        pseudo = labeler(images, labels, with_band=False, with_carm=has_carm)
        write_png(out_dir / "cam" / f"{sample['id']}.png", pseudo.cam_label[0].cpu().numpy(), palette=True)
        if pseudo.carm_label is not None:
            write_png(
                out_dir / "carm" / f"{sample['id']}.png", pseudo.carm_label[0].cpu().numpy(), palette=True
            )
        if with_masks:
            target = sample["mask"][None].to(device)
            metrics["cam"].update(pseudo.cam_label, target)
            if pseudo.carm_label is not None:
                metrics["carm"].update(pseudo.carm_label, target)
    if with_masks:
        summary = {"cam_pseudo_miou": metrics["cam"].compute()["miou"]}
        if has_carm:
            summary["carm_pseudo_miou"] = metrics["carm"].compute()["miou"]
        text = json_dumps_finite(summary, str(out_dir / "metrics.json"))
        atomic_write_text(out_dir / "metrics.json", text)
        print(text)
    print(f"wrote pseudo-labels to {out_dir}")
    return 0


def _check_fresh_output(out_dir: Path) -> None:
    """Refuse an ``--out`` folder that holds an earlier ``pseudo-labels`` run (its labels would stay beside
    the new ones, and ``metrics.json`` would describe only the new ones)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"--out {out_dir} is a file; give a folder for the pseudo-labels")
    earlier = [p for p in (out_dir / "cam", out_dir / "carm", out_dir / "metrics.json") if p.exists()]
    if earlier:
        raise DatasetError(
            f"--out {out_dir} holds an earlier run's pseudo-labels ({', '.join(p.name for p in earlier)}); "
            "a new run there would mix the two: choose a new --out folder or delete those first"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    check_writable(out_dir / "metrics.json", "--out")


def cmd_visualize(args: argparse.Namespace) -> int:
    cfg, net, ckpt = _load_network(args)
    device = _device(args.device)
    net.to(device).eval()
    split = args.split or cfg.data.val_split
    dataset = build_dataset(cfg, split, train=False)
    check_class_names(ckpt, getattr(dataset, "class_names", ()), f"the dataset of split {split!r}")
    ids = list(getattr(dataset, "ids", []))
    if args.ids:
        missing = [i for i in args.ids if i not in ids]
        if missing:
            raise DatasetError(f"ids not in split {split!r}: {', '.join(missing)}")
        indices = [ids.index(i) for i in args.ids]
    else:
        indices = list(range(min(args.num, len(ids))))
    labeler = _labeler(cfg, net, ckpt, device)
    out_dir = Path(args.out)
    for index in tqdm(indices, desc="visualize"):
        sample = dataset[index]
        images = sample["image"][None].to(device)
        labels = sample["label"][None].to(device)
        pseudo = labeler(images, labels, with_band=False, with_carm=labeler.dino is not None)
        pred = predict_labels(net, images)[0].cpu().numpy()
        image = to_rgb_uint8(images)[0]
        size = image.shape[:2]
        panels = [image, heatmap(image, pseudo.cams[0].max(0).values.cpu().numpy())]
        titles = ["image", "CAM"]
        if pseudo.carm is not None and pseudo.carm_raw is not None:
            panels += [
                heatmap(image, pseudo.carm_raw[0, 1:].max(0).values.cpu().numpy()),
                heatmap(image, pseudo.carm[0, 1:].max(0).values.cpu().numpy()),
            ]
            titles += ["CARM (raw)", "CARM (calibrated)"]
        panels.append(label_panel(pred, size))
        titles.append("prediction")
        if "mask" in sample:
            panels.append(label_panel(sample["mask"].numpy(), size))
            titles.append("ground truth")
        write_png(out_dir / f"{sample['id']}.png", panel_row(panels, titles))
    print(f"wrote {len(indices)} figures to {out_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ecaseg.engine.demo import demo_targets, run_demo

    out = Path(args.out)
    report = run_demo(
        out_dir=out, seed=args.seed, quick=args.quick, progress=not args.no_progress, overrides=args.overrides
    )
    for statement, met in demo_targets(report):
        print(f"{'met    ' if met else 'NOT met'}  {statement}")
    print(
        f"ECA {100 * report['seg_miou']:.1f} %, AFA baseline {100 * report['baseline_seg_miou']:.1f} %, "
        f"supervised {100 * report['supervised_seg_miou']:.1f} % mIoU; the full report: {out / 'report.md'}"
    )
    return 0


# --- pretrain-dino: the command line of ecaseg.engine.dino_pretrain (also its ``python -m``) ---------------


def _parse_pretrain_field(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")
    if isinstance(default, tuple):
        parts = [p for p in text.replace(" ", "").split(",") if p]
        if len(parts) != len(default):
            raise argparse.ArgumentTypeError(f"expected {len(default)} comma-separated numbers, got {text!r}")
        return tuple(float(p) for p in parts)
    return type(default)(text)


def build_pretrain_dino_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The command line of :func:`pretrain_dino_main` (every ``DINOPretrainConfig`` field is an option).

    Args:
        parser: Parser (or sub-parser) to fill; a new one when None.

    Returns:
        The parser.
    """
    if parser is None:
        parser = argparse.ArgumentParser(
            prog="python -m ecaseg.engine.dino_pretrain",
            description="DINO self-distillation of an affinity ViT on unlabelled images (no labels/masks).",
        )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of images (searched recursively)")
    src.add_argument(
        "--synthetic", action="store_true", help="the train split of the embedded synthetic benchmark"
    )
    parser.add_argument("--out", type=Path, required=True, help="output file (teacher backbone state dict)")
    parser.add_argument("--synthetic-seed", type=int, default=0, help="SyntheticConfig.seed")
    parser.add_argument("--synthetic-num-train", type=int, default=1000, help="SyntheticConfig.num_train")
    parser.add_argument("--synthetic-image-size", type=int, default=128, help="SyntheticConfig.image_size")
    parser.add_argument(
        "--synthetic-objects", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
        help="SyntheticConfig.min_objects and max_objects (default: the generator's, 1 3)",
    )  # fmt: skip
    parser.add_argument(
        "--synthetic-object-scale", type=float, default=None, help="SyntheticConfig.object_scale (1.8)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out images that cannot be decoded (listed at the end); default: stop before training",
    )
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    for f in dataclasses.fields(DINOPretrainConfig):
        default = getattr(DINOPretrainConfig, f.name)

        def convert(text: str, _default: Any = default) -> Any:
            return _parse_pretrain_field(text, _default)

        convert.__name__ = type(default).__name__
        shown = ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else default
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f"cfg_{f.name}", type=convert, default=None,
                            metavar=type(default).__name__.upper(), help=f"(default: {shown})")  # fmt: skip
    return parser


def _pretrain_config_from_args(args: argparse.Namespace) -> DINOPretrainConfig:
    values = {
        f.name: getattr(args, f"cfg_{f.name}")
        for f in dataclasses.fields(DINOPretrainConfig)
        if getattr(args, f"cfg_{f.name}", None) is not None
    }
    return DINOPretrainConfig(**values)


def run_pretrain_dino(args: argparse.Namespace) -> Path:
    """Run ``pretrain_dino`` for arguments parsed by :func:`build_pretrain_dino_parser`; returns ``--out``."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = _pretrain_config_from_args(args)
    images: str | Path | Dataset | Sequence[dict[str, Any]]
    if args.synthetic:
        extra: dict[str, Any] = {}
        if args.synthetic_objects is not None:
            extra["min_objects"], extra["max_objects"] = args.synthetic_objects
        if args.synthetic_object_scale is not None:
            extra["object_scale"] = args.synthetic_object_scale
        syn = SyntheticConfig(
            seed=args.synthetic_seed,
            image_size=args.synthetic_image_size,
            num_train=args.synthetic_num_train,
            **extra,
        )
        images = SyntheticWSSSDataset("train", syn)
    else:
        images = args.images
    return pretrain_dino(images, args.out, cfg, progress=not args.no_progress, skip_bad=args.skip_bad)


def pretrain_dino_main(argv: Sequence[str] | None = None) -> int:
    """Command line ``ecaseg pretrain-dino`` = ``python -m ecaseg.engine.dino_pretrain``: DINO pretraining.

    Usage: ``(--images DIR | --synthetic) --out FILE [--<DINOPretrainConfig field> VALUE ...]``.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0, or 2 after a one-line error message for bad user input.
    """
    return _pretrain_dino_command(build_pretrain_dino_parser().parse_args(argv))


def _pretrain_dino_command(args: argparse.Namespace) -> int:
    """Run parsed ``pretrain-dino`` arguments: log lines with ``--no-progress``, one error line, a summary."""
    if args.no_progress:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            out = run_pretrain_dino(args)
    except (EcasegError, OSError) as err:
        text = str(err) if isinstance(err, EcasegError) or not err.strerror else err.strerror
        print(f"dino-pretrain: error: {' '.join(text.split())}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - start:.0f} s")
    for w in caught:  # the images left out with --skip-bad (and any other warning), after the work
        print(f"dino-pretrain: warning: {w.message}", file=sys.stderr)
    return 0


def cmd_pretrain_dino(args: argparse.Namespace) -> int:
    return _pretrain_dino_command(args)


def cmd_refine(args: argparse.Namespace) -> int:
    from ecaseg.engine.refine import RefineJob, refine_folder
    from ecaseg.refine import DEFAULT_METHOD

    overrides: dict[str, Any] = {}
    if args.gamma is not None:
        overrides["gamma"] = args.gamma
    if args.fg_cue is not None:
        overrides["fg_cue"] = args.fg_cue
    job = RefineJob(
        cams=Path(args.cams),
        images=Path(args.images),
        out=Path(args.out),
        num_classes=args.num_classes,
        method=args.method or DEFAULT_METHOD,
        masks=Path(args.masks) if args.masks else None,
        labels=Path(args.labels) if args.labels else None,
        classes=Path(args.classes) if args.classes else None,
        dino=args.dino,
        dino_weights=args.dino_weights,
        alpha=args.alpha,
        save_npy=args.save_npy,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
        carm_overrides=overrides,
    )
    summary = refine_folder(job)
    done = f"{summary['refined']} refined, {summary['skipped']} already done"
    score = f"; mIoU {100 * summary['miou']:.1f} % (metrics.json)" if "miou" in summary else ""
    print(f"ecaseg refine: {done} -> {args.out}{score}")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    if args.name:
        print(json.dumps(config_to_dict(load_config(args.name, args.overrides)), indent=2))
    else:
        print("\n".join(available_configs()))
    return 0


def _worker_error(message: str) -> str:
    """The original message of an error re-raised from a DataLoader worker (torch puts the worker's whole
    traceback into it: ``Caught DatasetError in DataLoader worker process 0. Original Traceback ...``)."""
    if not message.startswith("Caught ") or "Original Traceback" not in message:
        return message
    lines = message.splitlines()
    for i in range(len(lines) - 1, 0, -1):
        head, sep, rest = lines[i].partition(": ")
        if sep and not lines[i].startswith(" ") and head.replace(".", "").replace("_", "").isalnum():
            where = lines[0].removeprefix("Caught ").split(" ", 1)[-1].rstrip(".")
            return "\n".join([f"{rest} ({where})", *lines[i + 1 :]])
    return message


def one_line(message: str) -> str:
    r"""Fold a multi-line error (e.g. a dataset layout tree) into one line for stderr.

    Example:
        >>> one_line("root missing; expected layout:\nroot/\n├── images/   (jpg)\n└── masks/")
        'root missing; expected layout: root/ images/ masks/'
    """
    message = _worker_error(message)
    first, *rest = message.strip().splitlines() or [""]
    parts = []
    for line in rest:
        name = line.strip().lstrip("│├└─ ").split("  ")[0].strip()
        if name:
            parts.append(name)
    return " ".join([first.rstrip(), *parts]) if parts else first


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ecaseg`` command."""
    parser = argparse.ArgumentParser(prog="ecaseg", description="ECA weakly supervised semantic segmentation")
    parser.add_argument("--version", action="version", version=f"ecaseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train ECA (or an ablation) from a config")
    p.add_argument(
        "--config", required=True, help=f"packaged name ({', '.join(available_configs())}) or .yaml"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--work-dir", required=True, type=Path)
    p.add_argument("--resume", action="store_true", help="continue from WORK_DIR/last.pth")
    p.add_argument(
        "--overwrite", action="store_true", help="train from scratch into a work dir that holds a checkpoint"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    def add_protocol(q: argparse.ArgumentParser) -> None:
        g = q.add_argument_group(
            "inference protocol", "default: the eval section of the checkpoint's config (or of --config)"
        )
        g.add_argument("--scales", type=float, nargs="+", default=None, help="eval.scales, e.g. 1.0 0.5 0.75")
        g.add_argument("--merge", choices=("max", "mean"), default=None, help="eval.merge")
        g.add_argument("--resize-long", type=int, default=None, help="eval.resize_long (0: native size)")
        g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="eval.flip")
        g.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None, help="eval.crf")
        g.add_argument(
            "--batch-size", type=int, default=None, help="eval.batch_size: images of one size per forward"
        )
        g.add_argument(
            "--crf-workers", type=int, default=None, help="eval.crf_workers: pydensecrf processes (0: cores)"
        )
        g.add_argument(
            "--crf-backend", choices=("torch", "pydensecrf", "auto"), default=None, help="eval.crf_backend"
        )

    def add_ckpt(q: argparse.ArgumentParser) -> None:
        q.add_argument("--checkpoint", required=True, type=Path)
        q.add_argument("--config", default=None, help="check the checkpoint against this config")
        q.add_argument("--device", default="auto")

    p = sub.add_parser(
        "doctor", help="pre-flight check of a training run (data, weights, device, batch, speed)"
    )
    p.add_argument("--config", required=True, help="config name or YAML file, as for train")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, as for train")
    p.add_argument(
        "--time-steps",
        type=int,
        default=None,
        help="timed training steps (default: 3 on a GPU, none on the CPU)",
    )
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("evaluate", help="mIoU of a checkpoint on a split with masks")
    add_ckpt(p)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (data.root=...)")
    p.add_argument("--split", default=None)
    add_protocol(p)
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="metrics JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="segment images or folders of images")
    add_ckpt(p)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out images that cannot be decoded (listed at the end); default: stop before any work",
    )
    add_protocol(p)
    p.set_defaults(func=cmd_predict, overrides=[])

    p = sub.add_parser("pseudo-labels", help="export PAR-refined CAM and CARM pseudo-labels of a split")
    add_ckpt(p)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--split", default=None)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--max-images", type=int, default=0)
    p.set_defaults(func=cmd_pseudo_labels)

    p = sub.add_parser("visualize", help="figures: image, CAM, CARM before/after calibration, prediction")
    add_ckpt(p)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--split", default=None)
    p.add_argument("--ids", nargs="*", default=None)
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("demo", help="the embedded synthetic WSSS benchmark, end to end (no downloads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("ecaseg_demo"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run: three trainings of 100 iterations (measured: 171 s with one thread on a 2-core "
        "machine; much longer when the cores are busy with other work)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for all three runs")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "pretrain-dino",
        help="DINO self-distillation of an affinity ViT on unlabelled images (see pretrain-dino --help)",
        description="DINO self-distillation of an affinity ViT on unlabelled images (no labels/masks).",
    )
    build_pretrain_dino_parser(p)  # the options of python -m ecaseg.engine.dino_pretrain
    p.set_defaults(func=cmd_pretrain_dino)

    p = sub.add_parser(
        "refine",
        help="refine CAMs saved by another pipeline (IRN/AMN .npy dicts, plain arrays) into pseudo-labels",
    )
    p.add_argument("--cams", required=True, help="folder of <id>.npy / <id>.npz CAM files")
    p.add_argument("--images", required=True, help="folder of the images (<id>.jpg, .png, ...)")
    p.add_argument("--out", required=True, help="new folder for <id>.png labels (resumes an earlier run)")
    p.add_argument("--num-classes", type=int, required=True, help="classes, background included (VOC: 21)")
    p.add_argument("--masks", default=None, help="folder of ground-truth <id>.png: writes metrics.json")
    p.add_argument("--labels", default=None, help="image labels (CSV/JSON), needed for plain arrays")
    p.add_argument("--classes", default=None, help="classes.txt: the class names, background first")
    p.add_argument(
        "--method", default=None, help="threshold, crf, par, random_walk, carm, carm_par, carm_crf"
    )
    p.add_argument("--dino", default="dino_vits8", help="affinity ViT (ecaseg.dino_affinity.list_variants())")
    p.add_argument("--dino-weights", default=None, help="its checkpoint, e.g. dino_deitsmall8_pretrain.pth")
    p.add_argument("--alpha", type=float, default=0.5, help="background score of the thresholded maps")
    p.add_argument("--gamma", type=float, default=None, help="override the ViT's CARM graph threshold")
    p.add_argument("--fg-cue", default=None, choices=("cls", "contrast", "none"), help="override its cue")
    p.add_argument("--save-npy", action="store_true", help="also write the refined maps as IRN-style .npy")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("configs", help="list packaged configs, or print one")
    p.add_argument("name", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_configs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ecaseg`` console script."""
    parser = build_parser()
    # section.key=value overrides may stand on both sides of the options (argparse alone would take the
    # later ones for unknown arguments)
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in late]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if late:
        if not isinstance(getattr(args, "overrides", None), list):
            parser.error(f"ecaseg {args.command} takes no section.key=value overrides: {' '.join(late)}")
        args.overrides = [*args.overrides, *late]
    try:
        return int(args.func(args))
    except (EcasegError, FileNotFoundError) as err:
        print(f"ecaseg {args.command}: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ecaseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk, a read-only folder, permissions: one line naming the path
        where = f" ({err.filename})" if err.filename else ""
        print(f"ecaseg {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
