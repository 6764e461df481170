"""The DINO training loop: :func:`pretrain_dino` and its checkpoint file (:func:`resume_path`).

Builds the student and the teacher (a timm ViT of :data:`ecaseg.dino_affinity.DINO_VARIANTS` with a
:class:`~ecaseg.engine.dino_pretrain.DINOHead`), iterates multi-crop batches, and writes the teacher
backbone with timm ``VisionTransformer`` key names.

Layout: engine layer; imports the other modules of this package, ``ecaseg.dino_affinity``,
``ecaseg.errors`` and ``ecaseg.utils``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ecaseg.dino_affinity import DINO_VARIANTS, build_vit
from ecaseg.engine.config import resolve_device
from ecaseg.engine.dino_pretrain.augment import multi_crop
from ecaseg.engine.dino_pretrain.config import DINOPretrainConfig
from ecaseg.engine.dino_pretrain.data import _as_dataset, _SquareImages
from ecaseg.engine.dino_pretrain.head import DINOHead, _MultiCropNet
from ecaseg.engine.dino_pretrain.loss import dino_loss, ema_update, teacher_entropies, update_center
from ecaseg.engine.dino_pretrain.schedule import cosine_schedule
from ecaseg.errors import CheckpointError, EcasegError
from ecaseg.utils.io import atomic_save_torch, check_writable

_LOG = logging.getLogger("ecaseg.engine.dino_pretrain")  # the package's logger (its name before the split)

__all__ = ["pretrain_dino", "resume_path"]


def _resolve_device(name: str) -> torch.device:
    return resolve_device(name, "DINOPretrainConfig.device")


def _build_nets(cfg: DINOPretrainConfig, device: torch.device) -> tuple[_MultiCropNet, _MultiCropNet]:
    variant = DINO_VARIANTS[cfg.variant]
    student_variant = variant
    if cfg.drop_path_rate > 0:
        kwargs = dict(variant.model_kwargs)
        kwargs["drop_path_rate"] = cfg.drop_path_rate
        student_variant = dataclasses.replace(variant, model_kwargs=kwargs)
    embed = variant.embed_dim

    def head() -> DINOHead:
        return DINOHead(embed, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, 3, cfg.norm_last_layer)

    student = _MultiCropNet(build_vit(student_variant), head()).to(device)
    teacher = _MultiCropNet(build_vit(variant), head()).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    teacher.eval()
    student.train()
    return student, teacher


def _param_groups(student: nn.Module) -> list[dict[str, Any]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in ("cls_token", "pos_embed")
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def _batches(loader: DataLoader, start_epoch: int) -> Iterator[Tensor]:
    epoch = start_epoch
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]
        yield from loader
        epoch += 1


def resume_path(out: str | Path) -> Path:
    """Where :func:`pretrain_dino` keeps its full training state for ``out``: ``<out>.resume.pth``."""
    return Path(f"{out}.resume.pth")


def pretrain_dino(
    images: str | Path | Dataset | Sequence[dict[str, Any]],
    out: str | Path,
    config: DINOPretrainConfig,
    progress: bool = True,
    skip_bad: bool = False,
) -> Path:
    """Train a ViT with DINO self-distillation on unlabelled images; write the teacher backbone to ``out``.

    Per iteration: load a batch (random square cut resized to ``image_size``), make two global and
    ``num_local`` local crops (:func:`multi_crop`), run the teacher on the global crops and the student on
    all crops, minimise :func:`dino_loss` with AdamW (learning rate: linear warm-up then cosine; weight
    decay: cosine), clip the gradient, keep the head's last layer fixed during ``freeze_last_layer_iters``,
    update the teacher as an EMA of the student (momentum: cosine from ``teacher_momentum`` to
    ``final_teacher_momentum``) and the centre (:func:`update_center`). Only images are read; labels and
    masks of a dataset are ignored.

    Args:
        images: A folder (searched recursively for jpg / jpeg / png / bmp / tif / tiff / webp files), or a
            map-style dataset whose items are dicts with an ``"image"``: ``uint8 [H, W, 3]`` numpy RGB, or a
            float ``[3, H, W]`` ImageNet-normalised tensor (e.g.
            ``SyntheticWSSSDataset("train", SyntheticConfig())``).
        out: Output file: the teacher backbone as a plain state dict with timm ``VisionTransformer`` key names
            (float32, CPU), written atomically; ``DINOAffinity(config.variant, weights=out)`` loads it.
        config: The recipe.
        progress: Show a progress bar with the loss.
        skip_bad: For a folder: leave out the images that cannot be decoded (a warning lists them) instead
            of stopping. Either way every image is decoded once before the first iteration.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        DatasetError: Empty or missing folder, unreadable image (named), malformed dataset item.
        EcasegError: The loss became non-finite (lower ``lr`` or raise ``teacher_temp``).

    Example:
        >>> import tempfile
        >>> from ecaseg.dino_affinity import DINOAffinity
        >>> data = [{"image": np.full((24, 24, 3), 40 * i, np.uint8)} for i in range(3)]
        >>> cfg = DINOPretrainConfig(image_size=24, global_size=16, local_size=8, num_local=1, out_dim=32,
        ...                          hidden_dim=16, bottleneck_dim=8, batch_size=2, iters=1, device="cpu")
        >>> path = pretrain_dino(data, tempfile.mkdtemp() + "/vit.pth", cfg, progress=False)
        >>> DINOAffinity("vit_nano_p8", weights=path).embed_dim
        96
    """
    cfg = config
    device = _resolve_device(cfg.device)
    out = Path(out)
    check_writable(out, "out")  # before the work, not after it
    check_writable(resume_path(out), "out")
    source = _as_dataset(images, skip_bad=skip_bad)
    skipped = list(getattr(source, "skipped", []))
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} undecodable image(s) of {len(skipped) + len(source)}: "
            + "; ".join(skipped),
            RuntimeWarning,
            stacklevel=2,
        )
    dataset = _SquareImages(source, cfg.image_size, cfg.cache_images)
    torch.manual_seed(cfg.seed)
    student, teacher = _build_nets(cfg, device)
    groups = _param_groups(student)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    last_layer = student.head.last_layer_parameters()
    center = torch.zeros(1, cfg.out_dim, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    lr_at = cosine_schedule(cfg.lr, cfg.min_lr, cfg.iters, cfg.warmup_iters)
    wd_at = cosine_schedule(cfg.weight_decay, cfg.final_weight_decay, cfg.iters)
    momentum_at = cosine_schedule(cfg.teacher_momentum, cfg.final_teacher_momentum, cfg.iters)
    temp_at = np.full(cfg.iters, cfg.teacher_temp, dtype=np.float64)
    warm = min(cfg.warmup_teacher_temp_iters, cfg.iters)
    temp_at[:warm] = np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, warm)

    start = 0
    state_file = resume_path(out)
    if cfg.resume and state_file.is_file():
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=True)
            student.load_state_dict(state["student"])
            teacher.load_state_dict(state["teacher"])
            optimizer.load_state_dict(state["optimizer"])
            center = state["center"].to(device)
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            start = int(state["iteration"])
        except Exception as err:  # corrupt file, other recipe (head size, variant), ...
            raise CheckpointError(
                f"cannot resume from {state_file}: {type(err).__name__}: {err}; delete it to start afresh"
            ) from err

    batch_size = min(cfg.batch_size, len(dataset))
    loader_gen = torch.Generator().manual_seed(cfg.seed + start)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.num_workers,
        generator=loader_gen,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
    )
    batches = _batches(loader, 0)
    use_amp = cfg.amp and device.type == "cuda"
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iters, initial=start, desc="dino-pretrain", dynamic_ncols=True)
    tic = time.perf_counter()
    for it in range(start, cfg.iters):
        for group in optimizer.param_groups:
            group["lr"] = float(lr_at[it])
            if group["apply_wd"]:
                group["weight_decay"] = float(wd_at[it])
        batch = next(batches).to(device, non_blocking=True)
        global_views, local_views = multi_crop(batch, cfg, gen)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            with torch.no_grad():
                teacher_out = teacher([global_views])
            views = [global_views] if local_views is None else [global_views, local_views]
            student_out = student(views)
        loss = dino_loss(student_out, teacher_out, center, cfg.student_temp, float(temp_at[it]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
        if it < cfg.freeze_last_layer_iters:
            for p in last_layer:
                p.grad = None
        optimizer.step()
        ema_update(teacher, student, float(momentum_at[it]))
        center = update_center(center, teacher_out, cfg.center_momentum)
        done = it + 1
        if done % cfg.log_interval == 0 or done == cfg.iters:
            value = float(loss.detach().item())
            if not math.isfinite(value):
                raise EcasegError(
                    f"DINO loss is {value} at iteration {done}; lower lr (now {cfg.lr}) or raise teacher_temp"
                )
            ent, mean_ent = teacher_entropies(teacher_out, center, float(temp_at[it]))
            _LOG.info(
                "iter %d/%d loss %.4f teacher entropy %.3f (of its batch mean %.3f; ln K %.3f) lr %.2e "
                "momentum %.5f %.0f s",
                done,
                cfg.iters,
                value,
                ent,
                mean_ent,
                math.log(cfg.out_dim),
                lr_at[it],
                momentum_at[it],
                time.perf_counter() - tic,
            )
            if bar is not None:
                bar.set_postfix(
                    loss=f"{value:.4f}", lr=f"{lr_at[it]:.2e}", s=f"{time.perf_counter() - tic:.0f}"
                )
        if bar is not None:
            bar.update(1)
        if cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0 and done < cfg.iters:
            _save_backbone(teacher, out)
            atomic_save_torch(
                {
                    "student": student.state_dict(),
                    "teacher": teacher.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "center": center.cpu(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "iteration": done,
                    "config": dataclasses.asdict(cfg),
                },
                state_file,
            )
    if bar is not None:
        bar.close()
    _save_backbone(teacher, out)
    if state_file.is_file() and cfg.checkpoint_interval:
        state_file.unlink()  # training finished: the backbone in ``out`` is the product
    return out


def _save_backbone(net: _MultiCropNet, out: Path) -> None:
    state = {k: v.detach().float().cpu().clone() for k, v in net.backbone.state_dict().items()}
    atomic_save_torch(state, out)
