"""Segmentation inference: multi-scale + flip probabilities, optional dense CRF, palette output."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Literal, TypeVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ecaseg.crf import (
    CRFBackend,
    CRFParams,
    available_cores,
    crf_batch,
    dense_crf,
    dense_crf_torch,
    resolve_crf_backend,
)
from ecaseg.data import IMAGENET_MEAN, IMAGENET_STD, colorize_mask, denormalize, voc_palette, write_mask
from ecaseg.models import ECANet
from ecaseg.utils.io import atomic_write_bytes
from ecaseg.utils.workers import ignore_sigint

__all__ = [
    "Key",
    "MergeRule",
    "autocast_context",
    "colorize",
    "overlay",
    "predict_batched",
    "predict_labels",
    "predict_logits_max",
    "predict_probs",
    "resize_long_side",
    "to_network_input",
    "write_png",
]


def autocast_context(device: torch.device, amp: str) -> AbstractContextManager[object]:
    """bf16 autocast on CUDA when ``amp == "bf16"``; a no-op elsewhere."""
    if amp == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def to_network_input(image: np.ndarray, device: torch.device) -> Tensor:
    """``[H, W, 3]`` uint8 RGB -> ``[1, 3, H, W]`` ImageNet-normalised float tensor on ``device``."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    return ((tensor - mean) / std)[None]


MergeRule = Literal["max", "mean"]
"""How :func:`predict_probs` merges scales: ``"max"`` (AFA's released test script, the default of the paper
configs) or ``"mean"`` (ecaseg 0.1: softmax probabilities averaged over scales and flips)."""


def resize_long_side(images: Tensor, resize_long: int) -> Tensor:
    """Resize ``[B, 3, H, W]`` so that the long side is ``resize_long`` (bilinear; ``0`` keeps the size).

    The short side is ``int(short * resize_long / long)`` (truncated), as AFA's test script computes it.

    Example:
        >>> resize_long_side(torch.zeros(1, 3, 375, 500), 512).shape
        torch.Size([1, 3, 384, 512])
    """
    if resize_long <= 0:
        return images
    height, width = images.shape[-2:]
    ratio = resize_long / max(height, width)
    size = (max(1, int(height * ratio)), max(1, int(width * ratio)))
    if size == (height, width):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


#: Smallest side fed to the network: MiT's first spatial-reduction convolution (kernel 8 on the stride-4
#: map) needs 32 px; smaller images (or scales) are enlarged to it and the output brought back.
MIN_INPUT_SIDE = 32


def _at_least(size: tuple[int, int]) -> tuple[int, int]:
    short = min(size)
    if short >= MIN_INPUT_SIDE:
        return size
    ratio = MIN_INPUT_SIDE / short
    return max(MIN_INPUT_SIDE, round(size[0] * ratio)), max(MIN_INPUT_SIDE, round(size[1] * ratio))


def _ordered_scales(scales: Sequence[float]) -> list[float]:
    if len(scales) == 0 or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive factors, got {list(scales)}")
    return sorted(scales, key=lambda s: s != 1.0)  # scale 1.0 first: it sets the logit grid


@torch.no_grad()
def predict_logits_max(
    net: ECANet,
    images: Tensor,
    scales: Sequence[float] = (1.0, 0.5, 0.75),
    flip: bool = True,
    resize_long: int = 512,
    amp: str = "none",
) -> Tensor:
    """Segmentation logits merged as AFA's released test script merges them (``eval.merge: max``).

    The images are resized so that the long side is ``resize_long`` (:func:`resize_long_side`). For every
    scale ``s`` (1.0 first) the input is rescaled with ``F.interpolate(x, scale_factor=s)`` (AFA's call),
    the image and its horizontal flip go through the decoder in one batch, both logit maps are resized to
    the decoder grid of the first scale, the flipped one is flipped back and the two are averaged; the
    merged logits are the element-wise **maximum** over scales, resized bilinearly to the input's size.

    Args:
        net: the segmentation network (``forward_seg``).
        images: ``[B, 3, H, W]`` normalised images.
        scales: input scale factors (AFA: 1.0, 0.5, 0.75).
        flip: average each scale's logits with those of the flipped input.
        resize_long: long side the images are resized to first (AFA: 512); 0 keeps their size.
        amp: ``"bf16"`` for autocast on CUDA.

    Returns:
        ``[B, K, H, W]`` float32 logits.
    """
    height, width = images.shape[-2:]
    base = resize_long_side(images, resize_long)
    base_hw = (int(base.shape[-2]), int(base.shape[-1]))
    if _at_least(base_hw) != base_hw:
        base = F.interpolate(base, size=_at_least(base_hw), mode="bilinear", align_corners=False)
    batch = images.shape[0]
    merged: Tensor | None = None
    grid: tuple[int, int] | None = None
    for scale in _ordered_scales(scales):
        if scale == 1.0:
            x = base
        elif min(int(base.shape[-2] * scale), int(base.shape[-1] * scale)) >= MIN_INPUT_SIDE:
            x = F.interpolate(base, scale_factor=scale, mode="bilinear", align_corners=False)  # AFA's call
        else:
            small = (round(base.shape[-2] * scale), round(base.shape[-1] * scale))
            x = F.interpolate(base, size=_at_least(small), mode="bilinear", align_corners=False)
        x = torch.cat([x, x.flip(-1)]) if flip else x
        with autocast_context(images.device, amp):
            logits = net.forward_seg(x).float()
        if grid is None:
            grid = (logits.shape[-2], logits.shape[-1])
        elif (logits.shape[-2], logits.shape[-1]) != grid:
            logits = F.interpolate(logits, size=grid, mode="bilinear", align_corners=False)
        if flip:
            logits = (logits[:batch] + logits[batch:].flip(-1)) / 2
        merged = logits if merged is None else torch.maximum(merged, logits)
    assert merged is not None
    return F.interpolate(merged, size=(height, width), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_probs(
    net: ECANet,
    images: Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp: str = "none",
    merge: MergeRule = "mean",
    resize_long: int = 0,
) -> Tensor:
    """Class probabilities of the segmentation decoder under an inference protocol.

    * ``merge="max"``: softmax of :func:`predict_logits_max` (AFA's test script: long side
      ``resize_long``, flip-averaged logits, maximum over scales);
    * ``merge="mean"``: softmax probabilities averaged over scales and flips (ecaseg 0.1's rule): each
      scale's input is resized to ``round(s * H) x round(s * W)`` (short side at least 32), its
      probabilities are brought back to the input size bilinearly; after a ``resize_long`` resize they are
      resized to the original size.

    Args:
        net: the segmentation network.
        images: ``[B, 3, H, W]`` normalised images.
        scales: input rescaling factors.
        flip: also run the flipped images.
        amp: ``"bf16"`` for autocast on CUDA.
        merge: ``"max"`` or ``"mean"`` (see above).
        resize_long: resize the long side to this first (0: native size).

    Returns:
        ``[B, K, H, W]`` float32 probabilities at the input's size.
    """
    if merge == "max":
        return predict_logits_max(net, images, scales, flip, resize_long, amp).softmax(dim=1)
    if merge != "mean":
        raise ValueError(f"merge must be 'max' or 'mean', got {merge!r}")
    out_hw = images.shape[-2:]
    images = resize_long_side(images, resize_long)
    height, width = images.shape[-2:]
    total = torch.zeros(images.shape[0], net.num_classes, height, width, device=images.device)
    count = 0
    for scale in scales:
        size = _at_least((max(round(height * scale), 16), max(round(width * scale), 16)))
        scaled = images if size == (height, width) else F.interpolate(images, size=size, mode="bilinear")
        batch = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
        with autocast_context(images.device, amp):
            logits = net.forward_seg(batch)
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)
        if flip:
            first, second = probs.chunk(2)
            probs = first + second.flip(-1)
            count += 2
        else:
            count += 1
        total += probs
    probs = total / count
    if probs.shape[-2:] != out_hw:
        probs = F.interpolate(probs, size=out_hw, mode="bilinear", align_corners=False)
    return probs


def predict_labels(
    net: ECANet,
    images: Tensor,
    rgb: np.ndarray | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: CRFParams | None = None,
    crf_workers: int = 0,
    amp: str = "none",
    merge: MergeRule = "mean",
    resize_long: int = 0,
    crf_backend: CRFBackend = "auto",
) -> Tensor:
    """Label maps ``[B, H, W]``: argmax of :func:`predict_probs`, refined by dense CRF if ``crf`` is given.

    ``rgb`` (``[B, H, W, 3]`` uint8) is the unnormalised image, needed by the CRF. ``crf_backend`` chooses
    the CRF's implementation (:func:`ecaseg.crf.resolve_crf_backend` for the device of ``images``): with
    ``"torch"`` the probabilities stay on the device; with ``"pydensecrf"`` ``crf_workers`` processes run it
    (``0``: the cores available, ``1``: in this process).
    """
    probs = predict_probs(
        net, images, scales=scales, flip=flip, amp=amp, merge=merge, resize_long=resize_long
    )
    if crf is None:
        return probs.argmax(dim=1)
    if rgb is None:
        raise ValueError("dense CRF needs the uint8 RGB images (rgb=...)")
    if resolve_crf_backend(crf_backend, images.device) == "torch":
        return crf_batch(rgb, probs, params=crf, backend="torch")
    workers = None if crf_workers == 0 else crf_workers
    return crf_batch(rgb, probs.cpu(), params=crf, num_workers=workers, backend="pydensecrf").to(
        images.device
    )


Key = TypeVar("Key")
"""The type of the keys that :func:`predict_batched` passes through with each image (file names, masks...)."""


def _rgb_uint8_tensor(images: Tensor) -> Tensor:
    """``[B, H, W, 3]`` uint8 RGB of normalised ``[B, 3, H, W]`` images, on their device."""
    return denormalize(images.detach().float()).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1)


def _rgb_uint8(images: Tensor) -> np.ndarray:
    return _rgb_uint8_tensor(images).cpu().numpy()


@torch.no_grad()
def predict_batched(
    net: ECANet,
    items: Iterable[tuple[Key, Tensor]],
    *,
    device: torch.device,
    batch_size: int = 0,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    merge: MergeRule = "mean",
    resize_long: int = 0,
    amp: str = "none",
    crf: CRFParams | None = None,
    crf_workers: int = 0,
    max_buffered: int | None = None,
    crf_backend: CRFBackend = "auto",
) -> Iterator[tuple[Key, Tensor]]:
    """Label maps of a stream of images, batched: what ``ecaseg evaluate`` and ``ecaseg predict`` run.

    Images of the same size are grouped into batches of up to ``batch_size`` (``0``: 8 on a GPU, 1 on the
    CPU, where larger batches were slower: 8 images of 256 x 256 with five scales and flip, MiT-B1, two
    threads, took 6.4 s one at a time and 9.8 s in one batch) and each batch goes through
    :func:`predict_probs` (one forward per scale, the flips in the same batch); the labels are the
    per-image results of :func:`predict_labels`, the same protocol image by image. With ``crf`` and the
    torch CRF backend the whole batch goes through :func:`ecaseg.crf.dense_crf_torch` on ``device`` (the
    probabilities never leave it); with the pydensecrf backend a pool of ``crf_workers`` processes (``0``: as
    many as the cores available, ``1``: none, in this process) runs the CRF of finished batches while the
    network runs the next ones.

    At most ``max_buffered`` images (default ``4 * batch_size``) wait for their size group to fill; beyond
    that the largest group runs as it is, so a stream of all-different sizes costs memory of a few batches.

    Args:
        net: the segmentation network (in eval mode).
        items: ``(key, image)`` pairs, ``image`` a normalised ``[3, H, W]`` tensor (any device); the key
            comes back with the image's label (a file name, the ground truth...).
        device: where the network runs.
        batch_size: images per forward (of one size); ``0`` chooses by device (see above).
        scales, flip, merge, resize_long, amp: the protocol of :func:`predict_probs`.
        crf: dense-CRF parameters, or ``None`` for the argmax.
        crf_workers: pydensecrf worker processes (``0``: the cores available; the torch backend uses none).
        max_buffered: images held back while waiting for a size group to fill.
        crf_backend: ``"torch"``, ``"pydensecrf"`` or ``"auto"`` (:func:`ecaseg.crf.resolve_crf_backend`
            for ``device``).

    Yields:
        ``(key, label)`` with ``label`` a ``[H, W]`` long tensor (on ``device``, except with the pydensecrf
        CRF: on the CPU), in the order the batches finish (not the input order).
    """
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0 (0: by device), got {batch_size}")
    if batch_size == 0:
        batch_size = 8 if device.type == "cuda" else 1
    limit = 4 * batch_size if max_buffered is None else max(batch_size, max_buffered)
    groups: dict[tuple[int, int], list[tuple[Key, Tensor]]] = {}
    if crf_workers < 0:
        raise ValueError(f"crf_workers must be >= 0 (0: the cores available), got {crf_workers}")
    backend = resolve_crf_backend(crf_backend, device) if crf is not None else "torch"
    workers = (crf_workers or available_cores()) if backend == "pydensecrf" else 1
    pool = (
        ProcessPoolExecutor(max_workers=workers, initializer=ignore_sigint)
        if crf is not None and workers > 1
        else None
    )
    pending: deque[tuple[Key, Future[np.ndarray]]] = deque()

    def run(group: list[tuple[Key, Tensor]]) -> Iterator[tuple[Key, Tensor]]:
        images = torch.stack([image for _, image in group]).to(device, non_blocking=True)
        probs = predict_probs(
            net, images, scales=scales, flip=flip, amp=amp, merge=merge, resize_long=resize_long
        )
        if crf is None:
            yield from zip((key for key, _ in group), probs.argmax(dim=1))
            return
        if backend == "torch":
            labels = dense_crf_torch(_rgb_uint8_tensor(images), probs, crf).argmax(dim=1)
            yield from zip((key for key, _ in group), labels)
            return
        rgb, host = _rgb_uint8(images), probs.cpu().numpy()
        for i, (key, _) in enumerate(group):
            if pool is None:
                yield key, torch.from_numpy(dense_crf(rgb[i], host[i], crf))
            else:
                pending.append((key, pool.submit(dense_crf, rgb[i], host[i], crf)))
        while len(pending) > 2 * workers or (pending and pending[0][1].done()):
            key, future = pending.popleft()
            yield key, torch.from_numpy(future.result())

    try:
        buffered = 0
        for key, image in items:
            if image.dim() != 3:
                raise ValueError(f"images must be [3, H, W], got {tuple(image.shape)} for {key!r}")
            size = (int(image.shape[-2]), int(image.shape[-1]))
            groups.setdefault(size, []).append((key, image))
            buffered += 1
            if len(groups[size]) >= batch_size:
                buffered -= len(groups[size])
                yield from run(groups.pop(size))
            elif buffered > limit:
                largest = max(groups, key=lambda k: len(groups[k]))
                buffered -= len(groups[largest])
                yield from run(groups.pop(largest))
        for size in list(groups):
            yield from run(groups.pop(size))
        while pending:
            key, future = pending.popleft()
            yield key, torch.from_numpy(future.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def colorize(label: np.ndarray) -> np.ndarray:
    """``[H, W]`` label map -> ``[H, W, 3]`` uint8 RGB with the VOC palette (values above 255 wrap)."""
    return colorize_mask(np.asarray(label).astype(np.int64) % 256)


def overlay(image: np.ndarray, label: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """Blend the coloured label map over the RGB image (background left as is)."""
    color = colorize(label).astype(np.float32)
    out = image.astype(np.float32)
    mask = (label > 0) & (label != 255)
    out[mask] = (1 - opacity) * out[mask] + opacity * color[mask]
    return out.clip(0, 255).astype(np.uint8)


def write_png(path: str | Path, array: np.ndarray, palette: bool = False) -> None:
    """Write a PNG atomically: an RGB image, or a label map (``palette=True``: an indexed PNG whose pixel
    values are the class ids, shown with the VOC colours, as VOC's own ``SegmentationClass`` files)."""
    if palette:
        write_mask(path, array, palette=voc_palette())
        return
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    atomic_write_bytes(path, buffer.tobytes())
