"""In-domain DINO pretraining of an affinity ViT, and a measurement of how meaningful its affinity is.

ECA reads its class-agnostic affinity graph (Eq. (4)) and foreground cue (Eq. (5)) from a frozen DINO ViT
pretrained on ImageNet. In other domains (medical, remote sensing, microscopy) such a ViT may see images
unlike anything it was trained on. This module trains one with DINO self-distillation on the unlabelled
images of any folder (or any dataset that yields images); no label and no mask is ever read.

* :class:`DINOPretrainConfig` -- every knob of the recipe (crops, head, temperatures, schedules, optimiser).
* :func:`pretrain_dino` -- train and write the **teacher** backbone as a plain state dict with timm
  ``VisionTransformer`` key names, loadable by ``DINOAffinity(<variant>, weights=<file>)``.
* Building blocks, each a pure function (plus :class:`DINOHead`): :func:`multi_crop`,
  :func:`dino_loss`, :func:`update_center`, :func:`ema_update`, :func:`cosine_schedule`.
* :func:`affinity_auc` -- ROC AUC of :func:`ecaseg.carm.affinity_graph` values for same-object versus
  different-class patch pairs of ground-truth masks (masks are used for the measurement only), with the
  rank-based :func:`mann_whitney_auc`.
* :func:`main` -- the command line (``python -m ecaseg.engine.dino_pretrain --images DIR --out FILE``).

Layout: engine layer; imports ``ecaseg.data``, ``ecaseg.dino_affinity``, ``ecaseg.carm`` and
``ecaseg.utils``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm
from torch.utils.data import DataLoader, Dataset

from ecaseg.carm import affinity_graph
from ecaseg.data import IMAGE_EXTENSIONS, adjust_hue, denormalize, normalize, read_image
from ecaseg.data.synthetic import SyntheticConfig, SyntheticWSSSDataset, render_sample
from ecaseg.dino_affinity import DINO_VARIANTS, DINOAffinity, build_vit
from ecaseg.errors import CheckpointError, ConfigError, DatasetError, EcasegError
from ecaseg.utils.io import atomic_save_torch

_LOG = logging.getLogger(__name__)

__all__ = [
    "DINOHead",
    "DINOPretrainConfig",
    "ImageFolder",
    "affinity_auc",
    "build_parser",
    "cosine_schedule",
    "dino_loss",
    "ema_update",
    "main",
    "mann_whitney_auc",
    "multi_crop",
    "patch_majority",
    "pretrain_dino",
    "teacher_entropies",
    "update_center",
]


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DINOPretrainConfig:
    """Hyper-parameters of DINO self-distillation; the defaults are the recipe of the packaged synthetic ViT.

    Sizes are in pixels of the loaded images: every image is first cut to a random square (side = its
    shorter side) and resized to ``image_size``; crops are then taken from that square.

    Attributes:
        variant: Architecture, a key of :data:`ecaseg.dino_affinity.DINO_VARIANTS` (its weights are not used).
        image_size: Side of the square each image is loaded at.
        global_size: Side of the two global crops.
        global_scale: Area range of a global crop, as a fraction of the loaded image.
        num_local: Number of local crops (0 disables multi-crop).
        local_size: Side of the local crops.
        local_scale: Area range of a local crop.
        ratio: Aspect-ratio range of the crop boxes (log-uniform).
        hflip_p: Probability of a horizontal flip, per crop.
        brightness: Brightness jitter strength (factor in ``[1 - a, 1 + a]``).
        contrast: Contrast jitter strength.
        saturation: Saturation jitter strength.
        hue: Hue jitter strength (shift in ``[-a, a]`` turns, at most 0.5).
        jitter_p: Probability of the colour jitter, per crop.
        grayscale_p: Probability of converting a crop to grey, per crop.
        blur_p: Probability of a Gaussian blur for (first global, second global, local) crops.
        blur_sigma: Range of the blur's sigma, in pixels of the crop.
        solarize_p: Probability of solarising the second global crop.
        out_dim: Output dimension ``K`` of the DINO head (number of "prototypes").
        hidden_dim: Width of the head's hidden layers.
        bottleneck_dim: Dimension of the L2-normalised bottleneck before the last layer.
        norm_last_layer: Keep the weight-normalised last layer's magnitude fixed to 1.
        freeze_last_layer_iters: The last layer of the head is not updated during these first iterations.
        student_temp: Student softmax temperature.
        teacher_temp: Teacher softmax temperature (sharpening) after its warm-up.
        warmup_teacher_temp: Teacher temperature at iteration 0 (linear warm-up to ``teacher_temp``).
        warmup_teacher_temp_iters: Length of the teacher-temperature warm-up.
        center_momentum: Momentum of the centre (the running mean of teacher outputs).
        teacher_momentum: EMA momentum of the teacher at iteration 0.
        final_teacher_momentum: EMA momentum at the last iteration (cosine schedule between the two).
        lr: Peak AdamW learning rate (reached after ``warmup_iters`` of linear warm-up; cosine decay after).
        min_lr: Learning rate at the last iteration.
        warmup_iters: Learning-rate warm-up length.
        weight_decay: Weight decay at iteration 0 (weights only; biases, norms, tokens and position
            embeddings get none).
        final_weight_decay: Weight decay at the last iteration (cosine schedule).
        clip_grad: Clip the student's gradient norm to this value (0 disables).
        drop_path_rate: Stochastic depth of the student (the teacher has none).
        batch_size: Images per iteration.
        iters: Number of iterations.
        seed: Seed of the initialisation, data order and augmentations.
        num_workers: DataLoader worker processes.
        cache_images: Keep every decoded image in memory after its first read (small datasets; with
            workers, each worker keeps its own cache).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        amp: bf16 autocast on CUDA.
        log_interval: Iterations between loss reports (the loss is read back to the host only then).
        checkpoint_interval: Iterations between checkpoints (0: none). A checkpoint writes the teacher
            backbone to ``out`` and the full training state to ``<out>.resume.pth``.
        resume: Continue from ``<out>.resume.pth`` when it exists.
    """

    variant: str = "vit_nano_p8"
    image_size: int = 128
    global_size: int = 64
    global_scale: tuple[float, float] = (0.25, 1.0)
    num_local: int = 4
    local_size: int = 32
    local_scale: tuple[float, float] = (0.05, 0.25)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    solarize_p: float = 0.2
    out_dim: int = 1024
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    norm_last_layer: bool = True
    freeze_last_layer_iters: int = 50
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_iters: int = 0
    center_momentum: float = 0.9
    teacher_momentum: float = 0.99
    final_teacher_momentum: float = 1.0
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_iters: int = 50
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    clip_grad: float = 3.0
    drop_path_rate: float = 0.0
    batch_size: int = 32
    iters: int = 1500
    seed: int = 0
    num_workers: int = 0
    cache_images: bool = False
    device: str = "auto"
    amp: bool = True
    log_interval: int = 20
    checkpoint_interval: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"DINOPretrainConfig.{name}={getattr(self, name)!r} is invalid: {rule}")

        if self.variant not in DINO_VARIANTS:
            raise ConfigError(
                f"DINOPretrainConfig.variant={self.variant!r} is not a DINO variant; valid names: "
                f"{', '.join(sorted(DINO_VARIANTS))}"
            )
        patch = DINO_VARIANTS[self.variant].patch_size
        for name in ("image_size", "global_size", "local_size", "batch_size", "iters", "out_dim"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be >= 1")
        for name in ("global_size", "local_size"):
            if getattr(self, name) % patch:
                raise bad(name, f"must be a multiple of the patch size {patch} of {self.variant}")
        for name in ("hidden_dim", "bottleneck_dim"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("num_local", "num_workers", "warmup_iters", "warmup_teacher_temp_iters"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        for name in ("freeze_last_layer_iters", "checkpoint_interval"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.log_interval < 1:
            raise bad("log_interval", "must be >= 1")
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise bad(name, "must be (low, high) with 0 < low <= high")
        for name in ("global_scale", "local_scale"):
            if getattr(self, name)[1] > 1:
                raise bad(name, "area fractions must be <= 1")
        if len(self.blur_p) != 3 or not all(0.0 <= p <= 1.0 for p in self.blur_p):
            raise bad("blur_p", "must be three probabilities (global 1, global 2, local)")
        for name in ("hflip_p", "jitter_p", "grayscale_p", "solarize_p", "center_momentum"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be in [0, 1]")
        for name in ("teacher_momentum", "final_teacher_momentum"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be in [0, 1]")
        for name in ("brightness", "contrast", "saturation", "weight_decay", "final_weight_decay"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if not 0.0 <= self.hue <= 0.5:
            raise bad("hue", "must be in [0, 0.5]")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "lr"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be > 0")
        if self.min_lr < 0 or self.clip_grad < 0 or not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(
                f"DINOPretrainConfig: min_lr={self.min_lr}, clip_grad={self.clip_grad} must be >= 0 and "
                f"drop_path_rate={self.drop_path_rate} in [0, 1)"
            )


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------


class ImageFolder(Dataset):
    """Every image file under ``root`` (recursively), sorted by path; items are ``{"image": uint8 HWC RGB}``.

    Args:
        root: Folder to search; files with the extensions of :data:`ecaseg.data.IMAGE_EXTENSIONS` (any case).

    Raises:
        DatasetError: If ``root`` is not a folder or holds no image file. An unreadable file raises
            ``DatasetError`` naming it when its item is read.

    Example:
        >>> import tempfile
        >>> ImageFolder(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        ecaseg.errors.DatasetError: no image files (.jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff) under ...
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"image folder not found: {self.root}")
        self.paths = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not self.paths:
            raise DatasetError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": read_image(self.paths[index])}


def _unit_image(image: Any, index: int) -> Tensor:
    """An item's image as float32 ``[3, H, W]`` RGB in [0, 1] (uint8 HWC array, or normalised CHW tensor)."""
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DatasetError(
                f"item {index}: 'image' must be a uint8 [H, W, 3] array, got {image.dtype} {image.shape}"
            )
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise DatasetError(f"item {index}: an 'image' tensor must be [3, H, W], got {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.float() / 255.0
        return denormalize(image.float())
    raise DatasetError(f"item {index}: 'image' is a {type(image).__name__}, expected a numpy array or tensor")


class _SquareImages(Dataset):
    """Wraps a dataset: item ``i`` -> float32 ``[3, S, S]`` in [0, 1], a random square cut resized to S."""

    def __init__(self, source: Any, size: int, cache: bool = False) -> None:
        self.source = source
        self.size = size
        self.cache: dict[int, Any] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.source)

    def _image(self, index: int) -> Any:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        item = self.source[index]
        if not isinstance(item, Mapping) or "image" not in item:
            raise DatasetError(f"item {index} of {type(self.source).__name__} has no 'image' entry")
        if self.cache is not None:
            self.cache[index] = item["image"]
        return item["image"]

    def __getitem__(self, index: int) -> Tensor:
        image = self._image(index)
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
            h, w = image.shape[:2]
            side = min(h, w)
            y0 = int(torch.randint(0, h - side + 1, ()).item())
            x0 = int(torch.randint(0, w - side + 1, ()).item())
            square = image[y0 : y0 + side, x0 : x0 + side]
            if side != self.size:
                interp = cv2.INTER_AREA if side > self.size else cv2.INTER_LINEAR
                square = cv2.resize(square, (self.size, self.size), interpolation=interp)
            return _unit_image(square, index)
        x = _unit_image(image, index)
        h, w = x.shape[-2:]
        side = min(h, w)
        y0 = int(torch.randint(0, h - side + 1, ()).item())
        x0 = int(torch.randint(0, w - side + 1, ()).item())
        x = x[:, y0 : y0 + side, x0 : x0 + side]
        if side != self.size:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        return x.clamp(0.0, 1.0)


def _as_dataset(images: str | Path | Dataset | Sequence[dict[str, Any]]) -> Any:
    if isinstance(images, (str, Path)):
        return ImageFolder(images)
    if not hasattr(images, "__getitem__") or not hasattr(images, "__len__"):
        raise DatasetError(f"images must be a folder or a map-style dataset, got {type(images).__name__}")
    if len(images) == 0:  # type: ignore[arg-type]
        raise DatasetError(f"the dataset {type(images).__name__} is empty")
    return images


# ----------------------------------------------------------------------------------------------------------
# Multi-crop augmentation (batched, on the images' device)
# ----------------------------------------------------------------------------------------------------------


def _rand(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(shape, device=like.device, generator=generator, dtype=torch.float32)


def random_resized_crops(
    images: Tensor,
    num: int,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``num`` random resized crops of every image, batched with ``affine_grid`` / ``grid_sample``.

    A box covers a fraction ``a ~ U(scale)`` of the image area with aspect ratio ``r`` log-uniform in
    ``ratio`` (width fraction ``sqrt(a r)``, height fraction ``sqrt(a / r)``, each at most 1), at a uniform
    position inside the image; it is resampled to ``size x size`` (bilinear on a 2x finer grid, then 2x2
    averaging, which limits aliasing when shrinking) and mirrored left-right with probability ``hflip_p``.

    Args:
        images: ``[B, C, H, W]``.
        num: Crops per image.
        size: Output side.
        scale: Area fraction range, ``0 < low <= high <= 1``.
        ratio: Aspect-ratio range.
        hflip_p: Flip probability.
        generator: Random generator on the images' device.

    Returns:
        ``[num * B, C, size, size]``, crop-major (crop ``v`` of image ``b`` at ``v * B + b``).

    Example:
        >>> random_resized_crops(torch.rand(2, 3, 16, 16), num=3, size=8, scale=(0.5, 1.0)).shape
        torch.Size([6, 3, 8, 8])
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    batch, channels = images.shape[:2]
    m = num * batch
    area = scale[0] + (scale[1] - scale[0]) * _rand((m,), images, generator)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand((m,), images, generator)
    aspect = torch.exp(log_r)
    fw = torch.sqrt(area * aspect).clamp(max=1.0)  # width as a fraction of the image width
    fh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (2.0 * _rand((m,), images, generator) - 1.0) * (1.0 - fw)  # box centre, normalised coordinates
    cy = (2.0 * _rand((m,), images, generator) - 1.0) * (1.0 - fh)
    flip = 1.0 - 2.0 * (_rand((m,), images, generator) < hflip_p).float()
    zero = torch.zeros_like(fw)
    theta = torch.stack((torch.stack((fw * flip, zero, cx), -1), torch.stack((zero, fh, cy), -1)), dim=1)
    fine = 2 * size
    grid = F.affine_grid(theta, [m, channels, fine, fine], align_corners=False)
    src = images.float().repeat(num, 1, 1, 1)
    crops = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(crops, 2).to(images.dtype)


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def color_augment(
    x: Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    jitter_p: float,
    grayscale_p: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-image colour jitter (brightness, contrast, saturation, hue, in that order) and random greyscale.

    Args:
        x: ``[M, 3, H, W]`` RGB in [0, 1].
        brightness: Factor range ``[1 - a, 1 + a]``.
        contrast: Factor range around the image's mean grey.
        saturation: Factor range around each pixel's grey.
        hue: Shift range ``[-a, a]`` (turns), via :func:`ecaseg.data.adjust_hue`.
        jitter_p: Probability that an image is jittered at all.
        grayscale_p: Probability that an image becomes grey (after the jitter).
        generator: Random generator on ``x``'s device.

    Returns:
        ``[M, 3, H, W]`` in [0, 1].

    Example:
        >>> x = torch.rand(4, 3, 8, 8)
        >>> torch.equal(color_augment(x, 0.4, 0.4, 0.2, 0.1, jitter_p=0.0, grayscale_p=0.0), x)
        True
    """
    m = x.shape[0]

    def factor(strength: float) -> Tensor:
        return 1.0 + strength * (2.0 * _rand((m, 1, 1, 1), x, generator) - 1.0)

    out = (x * factor(brightness)).clamp(0.0, 1.0)
    mean = _gray(out).mean(dim=(-3, -2, -1), keepdim=True)
    out = ((out - mean) * factor(contrast) + mean).clamp(0.0, 1.0)
    gray = _gray(out)
    out = ((out - gray) * factor(saturation) + gray).clamp(0.0, 1.0)
    if hue > 0:
        out = adjust_hue(out, hue * (2.0 * _rand((m, 1, 1, 1), x, generator) - 1.0))
    out = torch.where(_rand((m, 1, 1, 1), x, generator) < jitter_p, out, x)
    return torch.where(_rand((m, 1, 1, 1), x, generator) < grayscale_p, _gray(out).expand_as(out), out)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Blur each image with its own Gaussian (separable, reflect padding, one grouped convolution per axis).

    Args:
        x: ``[M, C, H, W]``.
        sigma: ``[M]`` standard deviations in pixels (> 0).
        radius: Kernel half-width (kernel ``2 * radius + 1``; less than ``H`` and ``W``).

    Returns:
        ``[M, C, H, W]``.

    Example:
        >>> x = torch.zeros(1, 1, 9, 9); x[0, 0, 4, 4] = 1.0
        >>> y = gaussian_blur(x, torch.tensor([1.0]), radius=2)
        >>> round(float(y.sum()), 4), round(float(y[0, 0, 4, 4]), 4)  # mass kept; centre (1 / 2.4837)^2
        (1.0, 0.1621)
    """
    m, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2.0 * sigma.float()[:, None] ** 2))  # [M, 2r+1]
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [M*C, 2r+1]
    flat = x.float().reshape(1, m * c, h, w)
    flat = F.conv2d(
        F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=m * c
    )
    flat = F.conv2d(
        F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=m * c
    )
    return flat.reshape(m, c, h, w).to(x.dtype)


def _photometric(
    x: Tensor, cfg: DINOPretrainConfig, blur_p: float, solarize_p: float, generator: torch.Generator | None
) -> Tensor:
    m, size = x.shape[0], x.shape[-1]
    x = color_augment(
        x, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, cfg.jitter_p, cfg.grayscale_p, generator
    )
    if blur_p > 0:
        lo, hi = cfg.blur_sigma
        sigma = lo + (hi - lo) * _rand((m,), x, generator)
        radius = min(math.ceil(3.0 * hi), size - 1)
        blurred = gaussian_blur(x, sigma, radius)
        x = torch.where(_rand((m, 1, 1, 1), x, generator) < blur_p, blurred, x)
    if solarize_p > 0:
        solar = torch.where(x >= 0.5, 1.0 - x, x)
        x = torch.where(_rand((m, 1, 1, 1), x, generator) < solarize_p, solar, x)
    return x


def multi_crop(
    images: Tensor, config: DINOPretrainConfig, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor | None]:
    """DINO's multi-crop views of a batch: two global crops and ``config.num_local`` local crops.

    Global crop 1 is always blurred (``blur_p[0]``), global crop 2 rarely (``blur_p[1]``) and sometimes
    solarised, local crops are blurred with ``blur_p[2]``; all crops are flipped, colour-jittered and made
    grey at random (see :class:`DINOPretrainConfig`), then ImageNet-normalised.

    Args:
        images: ``[B, 3, H, W]`` RGB in [0, 1].
        config: Crop sizes, scales and photometric settings.
        generator: Random generator on the images' device.

    Returns:
        ``(globals [2 B, 3, g, g], locals [L B, 3, l, l] | None)``, both view-major and normalised.

    Example:
        >>> cfg = DINOPretrainConfig(global_size=16, local_size=8, num_local=3)
        >>> g, loc = multi_crop(torch.rand(2, 3, 32, 32), cfg)
        >>> g.shape, loc.shape
        (torch.Size([4, 3, 16, 16]), torch.Size([6, 3, 8, 8]))
    """
    batch = images.shape[0]
    gcrops = random_resized_crops(
        images, 2, config.global_size, config.global_scale, config.ratio, config.hflip_p, generator
    )
    first = _photometric(gcrops[:batch], config, config.blur_p[0], 0.0, generator)
    second = _photometric(gcrops[batch:], config, config.blur_p[1], config.solarize_p, generator)
    global_views = normalize(torch.cat((first, second), dim=0))
    if config.num_local == 0:
        return global_views, None
    lcrops = random_resized_crops(
        images,
        config.num_local,
        config.local_size,
        config.local_scale,
        config.ratio,
        config.hflip_p,
        generator,
    )
    local_views = normalize(_photometric(lcrops, config, config.blur_p[2], 0.0, generator))
    return global_views, local_views


# ----------------------------------------------------------------------------------------------------------
# Networks, loss, centre and teacher updates
# ----------------------------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """Projection head of DINO: MLP (GELU) -> L2-normalised bottleneck -> weight-normalised linear layer.

    Args:
        in_dim: Input dimension (the backbone's embedding size).
        out_dim: Number of outputs ``K``.
        hidden_dim: Width of the hidden layers.
        bottleneck_dim: Dimension of the normalised bottleneck.
        num_layers: Linear layers of the MLP (>= 1; 1 means a single projection to the bottleneck).
        norm_last_layer: Fix the magnitude ``g`` of the last layer's weight normalisation to 1 (not trained).

    Example:
        >>> head = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4)
        >>> head(torch.randn(3, 8)).shape
        torch.Size([3, 16])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        num_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters of the weight-normalised last layer (frozen during the first iterations)."""
        return list(self.last.parameters())

    def forward(self, x: Tensor) -> Tensor:
        """``[M, in_dim] -> [M, out_dim]`` logits."""
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return self.last(z)


class _MultiCropNet(nn.Module):
    """Backbone + head; views of different sizes go through the backbone separately, the head once."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def embed(self, x: Tensor) -> Tensor:
        vit: Any = self.backbone
        return vit.forward_head(vit.forward_features(x), pre_logits=True)

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        return self.head(torch.cat([self.embed(v) for v in views], dim=0))


def dino_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
    num_global_views: int = 2,
) -> Tensor:
    """DINO cross-entropy between the sharpened, centred teacher and the student over pairs of views.

    With ``G`` teacher (global) views and ``V >= G`` student views of ``B`` images, the first ``G`` student
    views being the same global crops the teacher saw:
    ``P_t = softmax((t - c) / tau_t)``, ``log P_s = log_softmax(s / tau_s)`` and
    ``L = mean over pairs (g, v), v != g, of mean_b [ - sum_k P_t[g, b, k] log P_s[v, b, k] ]``.
    The teacher is detached (no gradient). Computed in float32.

    Args:
        student_out: ``[V B, K]`` student logits, view-major.
        teacher_out: ``[G B, K]`` teacher logits of the global views, view-major.
        center: ``[K]`` or ``[1, K]`` running centre of the teacher logits.
        student_temp: ``tau_s`` (DINO: 0.1).
        teacher_temp: ``tau_t`` (DINO: 0.04 to 0.07).
        num_global_views: ``G``; ``B`` is the teacher's rows divided by ``G``.

    Returns:
        Scalar loss.

    Example:
        >>> s, t = torch.zeros(6, 4), torch.zeros(4, 4)  # V = 3, G = 2, B = 2, K = 4: uniform distributions
        >>> round(float(dino_loss(s, t, torch.zeros(4), 0.1, 0.04)), 4)  # ln 4
        1.3863
    """
    if student_out.ndim != 2 or teacher_out.ndim != 2 or student_out.shape[1] != teacher_out.shape[1]:
        raise ValueError(
            f"student_out [V B, K] and teacher_out [G B, K] expected, got {tuple(student_out.shape)} and "
            f"{tuple(teacher_out.shape)}"
        )
    k = teacher_out.shape[1]
    num_global = int(num_global_views)
    if num_global < 1 or teacher_out.shape[0] % num_global:
        raise ValueError(f"teacher rows {teacher_out.shape[0]} are not {num_global_views} views of a batch")
    batch = teacher_out.shape[0] // num_global
    num_views = student_out.shape[0] // batch
    if student_out.shape[0] % batch or num_views < num_global:
        raise ValueError(
            f"student rows {student_out.shape[0]} are not >= {num_global} whole views of {batch} images"
        )
    t = F.softmax((teacher_out.detach().float() - center.float().reshape(1, k)) / teacher_temp, dim=-1)
    log_s = F.log_softmax(student_out.float() / student_temp, dim=-1)
    t = t.reshape(num_global, batch, k)
    log_s = log_s.reshape(num_views, batch, k)
    cross = -torch.einsum("gbk,vbk->gv", t, log_s) / batch  # [G, V] batch-mean cross-entropies
    keep = ~torch.eye(num_global, num_views, dtype=torch.bool, device=cross.device)
    num_pairs = num_global * num_views - num_global
    return (cross * keep).sum() / num_pairs


@torch.no_grad()
def teacher_entropies(teacher_out: Tensor, center: Tensor, teacher_temp: float) -> tuple[float, float]:
    """Collapse diagnostics: mean entropy of the teacher's per-image distributions, and entropy of their mean.

    Uniform collapse: the first tends to ``ln K`` (every image gets the flat distribution). Collapse to one
    dimension: the second tends to 0 (every image gets the same peaked distribution). A healthy run has a
    low first value and a high second one. Reads values back to the host (call at log intervals only).

    Args:
        teacher_out: ``[M, K]`` teacher logits.
        center: ``[1, K]`` centre.
        teacher_temp: Teacher temperature.

    Returns:
        ``(mean per-image entropy, entropy of the batch-mean distribution)`` in nats.

    Example:
        >>> h, hm = teacher_entropies(torch.zeros(2, 4), torch.zeros(1, 4), 0.04)
        >>> round(h, 4), round(hm, 4)  # flat outputs: both ln 4
        (1.3863, 1.3863)
    """
    probs = F.softmax((teacher_out.float() - center.float().reshape(1, -1)) / teacher_temp, dim=-1)
    per_image = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1).mean()
    mean = probs.mean(dim=0)
    of_mean = -(mean * torch.log(mean.clamp_min(1e-12))).sum()
    return float(per_image), float(of_mean)


@torch.no_grad()
def update_center(center: Tensor, teacher_out: Tensor, momentum: float) -> Tensor:
    """New centre ``c <- m c + (1 - m) mean_rows(teacher_out)`` (float32, no gradient).

    Args:
        center: ``[1, K]`` (or ``[K]``) current centre.
        teacher_out: ``[M, K]`` teacher logits of the step.
        momentum: ``m`` (DINO: 0.9).

    Returns:
        The updated centre, shaped like ``center``.

    Example:
        >>> update_center(torch.zeros(1, 2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 0.9)
        tensor([[0.2000, 0.3000]])
    """
    batch_mean = teacher_out.float().mean(dim=0).reshape(center.shape)
    return center.float() * momentum + batch_mean * (1.0 - momentum)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place ``theta_t <- m theta_t + (1 - m) theta_s`` for every parameter (same architecture).

    Args:
        teacher: Updated module.
        student: Source module (parameters in the same order).
        momentum: ``m``.

    Example:
        >>> t, s = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        >>> _ = t.weight.data.fill_(1.0), s.weight.data.fill_(3.0)
        >>> ema_update(t, s, 0.75); t.weight.item()
        1.5
    """
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different numbers of parameters")
    t_data = [p.data for p in t_params]
    torch._foreach_mul_(t_data, momentum)
    torch._foreach_add_(t_data, [p.data for p in s_params], alpha=1.0 - momentum)


def cosine_schedule(
    base: float, final: float, total_iters: int, warmup_iters: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Per-iteration values: linear warm-up ``warmup_start -> base``, then a half cosine ``base -> final``.

    Args:
        base: Value at the end of the warm-up.
        final: Value at the last iteration.
        total_iters: Length of the schedule.
        warmup_iters: Warm-up length (clipped to ``total_iters``).
        warmup_start: Value at iteration 0 when there is a warm-up.

    Returns:
        float64 array of ``total_iters`` values.

    Example:
        >>> cosine_schedule(1.0, 0.0, 5, warmup_iters=2).round(4).tolist()
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    warm = min(max(warmup_iters, 0), total_iters)
    ramp = np.linspace(warmup_start, base, warm, endpoint=False) if warm else np.zeros(0)
    rest = total_iters - warm
    if rest == 1:
        decay = np.array([base], dtype=np.float64)
    else:
        steps = np.arange(rest, dtype=np.float64) / max(rest - 1, 1)
        decay = final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * steps))
    return np.concatenate((ramp, decay)).astype(np.float64)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"DINOPretrainConfig.device={name!r} is not a device: {err}") from None


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

    Returns:
        ``out`` as a ``Path``.

    Raises:
        DatasetError: Empty or missing folder, unreadable image (named), malformed dataset item.
        EcasegError: The loss became non-finite (lower ``lr`` or raise ``teacher_temp``).

    Example:
        >>> import tempfile
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
    source = _as_dataset(images)
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


# ----------------------------------------------------------------------------------------------------------
# Affinity evaluation
# ----------------------------------------------------------------------------------------------------------


def mann_whitney_auc(positives: Tensor, negatives: Tensor) -> Tensor:
    """ROC AUC from ranks (Mann-Whitney U): ``P(score_pos > score_neg) + 0.5 P(equal)``.

    All scores are ranked together, tied values get the mean of their ranks, and
    ``AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` with ``R_pos`` the sum of the positives' ranks.

    Args:
        positives: ``[P]`` scores of positive pairs (P >= 1).
        negatives: ``[Q]`` scores of negative pairs (Q >= 1).

    Returns:
        0-dim float64 tensor in [0, 1].

    Example:
        >>> mann_whitney_auc(torch.tensor([0.9, 0.5]), torch.tensor([0.5, 0.1])).item()
        0.875
    """
    if positives.numel() == 0 or negatives.numel() == 0:
        raise ValueError("mann_whitney_auc needs at least one positive and one negative score")
    scores = torch.cat((positives.reshape(-1), negatives.reshape(-1))).double()
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    before = torch.cumsum(counts, 0) - counts  # scores strictly below each distinct value
    mean_rank = before.double() + (counts.double() + 1.0) / 2.0  # 1-based average rank of each value
    n_pos, n_neg = positives.numel(), negatives.numel()
    rank_sum = mean_rank[inverse[:n_pos]].sum()
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def patch_majority(labels: Tensor, patch: int, ignore_index: int = 255) -> Tensor:
    """Majority label of every ``patch x patch`` cell of a label map (ties: the smallest label).

    Args:
        labels: ``[H, W]`` integer map with H and W multiples of ``patch``.
        patch: Cell side.
        ignore_index: Label not counted; a cell holding only it gets -1.

    Returns:
        ``[h * w]`` long, row-major, -1 for fully ignored cells.

    Example:
        >>> patch_majority(torch.tensor([[1, 1, 0, 0], [1, 2, 0, 255]]), 2).tolist()
        [1, 0]
    """
    if labels.ndim != 2 or labels.shape[0] % patch or labels.shape[1] % patch:
        raise ValueError(f"labels must be [H, W] with sides multiple of {patch}, got {tuple(labels.shape)}")
    lab = labels.long()
    valid = lab != ignore_index
    lab = torch.where(valid, lab, torch.zeros_like(lab))
    num = int(lab.max()) + 1
    onehot = F.one_hot(lab, num).permute(2, 0, 1).float() * valid.float()
    counts = F.avg_pool2d(onehot[None], patch)[0].flatten(1)  # [num, N]
    best = counts.argmax(dim=0)
    return torch.where(counts.sum(dim=0) > 0, best, torch.full_like(best, -1))


def _item_arrays(item: dict[str, Any], index: int) -> tuple[Tensor, Tensor]:
    if "mask" not in item:
        raise DatasetError(f"item {index} has no 'mask'; affinity_auc needs ground-truth masks")
    image = _unit_image(item["image"], index)
    mask = item["mask"]
    mask_t = torch.from_numpy(np.asarray(mask)) if isinstance(mask, np.ndarray) else torch.as_tensor(mask)
    if mask_t.shape != image.shape[-2:]:
        raise DatasetError(f"item {index}: mask {tuple(mask_t.shape)} and image {tuple(image.shape)} differ")
    return normalize(image), mask_t.long()


def _instances(dataset: Any, item: dict[str, Any], index: int) -> Tensor | None:
    """The item's instance map: its ``"instances"`` entry, else the synthetic generator's, else None."""
    if "instances" in item:
        inst = item["instances"]
        return torch.from_numpy(np.asarray(inst)).long() if isinstance(inst, np.ndarray) else inst.long()
    if isinstance(dataset, SyntheticWSSSDataset) and isinstance(dataset.config, SyntheticConfig):
        return torch.from_numpy(render_sample(dataset.config, dataset.split, index).instances).long()
    return None


@torch.no_grad()
def affinity_auc(
    dino: DINOAffinity,
    dataset: Any,
    num_images: int = 50,
    max_pairs_per_image: int = 2000,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """How well the affinity graph of Eq. (4) separates same-object from different-class patch pairs.

    For each of the first ``num_images`` items: the image goes through ``dino`` and
    :func:`ecaseg.carm.affinity_graph` gives the cosine similarity of every pair of patch keys. Every patch
    gets the majority class of its pixels in the ground-truth mask (and the majority object of the instance
    map, see below); over the unordered pairs ``i < j``:

    * **positives**: both patches in the same object -- same non-zero majority instance of an instance map
      (the item's ``"instances"`` entry if it has one, else, for
      :class:`~ecaseg.data.synthetic.SyntheticWSSSDataset`, the generator's map from
      :func:`ecaseg.data.synthetic.render_sample`), otherwise the same foreground class; two objects of the
      same class form neither positives nor negatives;
    * **negatives**: the patches' majority classes differ -- both foreground (``auc_fg``) or one background
      (``auc_bg``); ``auc`` uses both kinds together.

    At most ``max_pairs_per_image`` positives and as many negatives per image are drawn at random (without
    replacement); the AUC is :func:`mann_whitney_auc` over the pooled pairs of all images (0.5 = chance).

    Args:
        dino: The frozen ViT (its device is used).
        dataset: Items with ``"image"`` (uint8 ``[H, W, 3]`` or a normalised ``[3, H, W]`` tensor),
            ``"mask"`` (``[H, W]``, ``ignore_index`` for unlabelled pixels) and optionally ``"instances"``
            (``[H, W]`` integer object ids, 0 = no object).
        num_images: How many items, from the first.
        max_pairs_per_image: Cap on positives and on negatives per image.
        generator: CPU generator of the pair sampling (``None``: seeded with 0).
        ignore_index: Mask value of unlabelled pixels; fully ignored patches take part in no pair.

    Returns:
        ``{"auc", "auc_fg", "auc_bg"}`` (floats, NaN when a kind has no pairs), ``"mean_positive"``,
        ``"mean_negative"`` (mean similarities), ``"num_positive"``, ``"num_negative"``,
        ``"num_negative_fg"``, ``"num_images"`` and ``"positives"`` (``"same object"`` or ``"same class"``).

    Example:
        >>> from ecaseg.data.synthetic import SyntheticConfig, SyntheticWSSSDataset
        >>> ds = SyntheticWSSSDataset("val", SyntheticConfig(image_size=64, num_val=2))
        >>> dino = DINOAffinity("vit_nano_p8", allow_random_init=True)
        >>> res = affinity_auc(dino, ds, num_images=2, max_pairs_per_image=100)
        >>> res["positives"], 0.0 <= res["auc"] <= 1.0
        ('same object', True)
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = dino.vit.patch_embed.proj.weight.device
    patch = dino.patch_size
    pos_all: list[Tensor] = []
    neg_all: list[Tensor] = []
    neg_fg_all: list[Tensor] = []
    count = min(num_images, len(dataset))
    if count < 1:
        raise DatasetError("affinity_auc needs at least one image")
    kind = "same class"
    for index in range(count):
        item = dataset[index]
        image, mask = _item_arrays(item, index)
        inst = _instances(dataset, item, index)
        if inst is not None and inst.shape != mask.shape:
            raise DatasetError(
                f"item {index}: instances {tuple(inst.shape)} and mask {tuple(mask.shape)} differ"
            )
        feats = dino(image[None].to(device))
        h, w = feats.grid
        size = (h * patch, w * patch)
        if tuple(mask.shape) != size:
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
            if inst is not None:
                inst = F.interpolate(inst[None, None].float(), size=size, mode="nearest")[0, 0].long()
        cls = patch_majority(mask, patch, ignore_index)
        graph = affinity_graph(feats.keys)[0].cpu()
        i, j = torch.triu_indices(h * w, h * w, offset=1)
        ci, cj = cls[i], cls[j]
        labelled = (ci >= 0) & (cj >= 0)
        if inst is not None:
            kind = "same object"
            obj = patch_majority(inst, patch, ignore_index=-1)
            positive = (obj[i] == obj[j]) & (obj[i] > 0) & (ci > 0) & (cj > 0)
        else:
            positive = (ci == cj) & (ci > 0)
        negative = labelled & (ci != cj) & ~positive
        values = graph[i, j]
        pos_idx = torch.nonzero(positive).flatten()
        neg_idx = torch.nonzero(negative).flatten()
        if pos_idx.numel() > max_pairs_per_image:
            pos_idx = pos_idx[torch.randperm(pos_idx.numel(), generator=gen)[:max_pairs_per_image]]
        if neg_idx.numel() > max_pairs_per_image:
            neg_idx = neg_idx[torch.randperm(neg_idx.numel(), generator=gen)[:max_pairs_per_image]]
        both_fg = (ci[neg_idx] > 0) & (cj[neg_idx] > 0)
        pos_all.append(values[pos_idx])
        neg_all.append(values[neg_idx])
        neg_fg_all.append(both_fg)
    pos = torch.cat(pos_all)
    neg = torch.cat(neg_all)
    fg = torch.cat(neg_fg_all)

    def auc(p: Tensor, n: Tensor) -> float:
        return float(mann_whitney_auc(p, n)) if p.numel() and n.numel() else float("nan")

    return {
        "auc": auc(pos, neg),
        "auc_fg": auc(pos, neg[fg]),
        "auc_bg": auc(pos, neg[~fg]),
        "mean_positive": float(pos.mean()) if pos.numel() else float("nan"),
        "mean_negative": float(neg.mean()) if neg.numel() else float("nan"),
        "num_positive": int(pos.numel()),
        "num_negative": int(neg.numel()),
        "num_negative_fg": int(fg.sum()),
        "num_images": count,
        "positives": kind,
    }


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _parse_field(text: str, default: Any) -> Any:
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


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The command line of :func:`main` (every :class:`DINOPretrainConfig` field is an option).

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
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    for f in dataclasses.fields(DINOPretrainConfig):
        default = getattr(DINOPretrainConfig, f.name)

        def convert(text: str, _default: Any = default) -> Any:
            return _parse_field(text, _default)

        convert.__name__ = type(default).__name__
        shown = ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else default
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f"cfg_{f.name}", type=convert, default=None,
                            metavar=type(default).__name__.upper(), help=f"(default: {shown})")  # fmt: skip
    return parser


def _config_from_args(args: argparse.Namespace) -> DINOPretrainConfig:
    values = {
        f.name: getattr(args, f"cfg_{f.name}")
        for f in dataclasses.fields(DINOPretrainConfig)
        if getattr(args, f"cfg_{f.name}", None) is not None
    }
    return DINOPretrainConfig(**values)


def run_from_args(args: argparse.Namespace) -> Path:
    """Run :func:`pretrain_dino` for parsed arguments of :func:`build_parser`; returns the output file."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = _config_from_args(args)
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
    return pretrain_dino(images, args.out, cfg, progress=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m ecaseg.engine.dino_pretrain (--images DIR | --synthetic) --out FILE ...``.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0, or 2 after a one-line error message for bad user input.
    """
    args = build_parser().parse_args(argv)
    if args.no_progress:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        out = run_from_args(args)
    except EcasegError as err:
        print(f"dino-pretrain: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
