"""Segmentation inference: multi-scale + flip probabilities, optional dense CRF, palette output."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ecaseg.crf import CRFParams, crf_batch
from ecaseg.data import IMAGENET_MEAN, IMAGENET_STD, colorize_mask, voc_palette, write_mask
from ecaseg.models import ECANet
from ecaseg.utils.io import atomic_write_bytes

__all__ = [
    "autocast_context",
    "colorize",
    "overlay",
    "predict_labels",
    "predict_probs",
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


@torch.no_grad()
def predict_probs(
    net: ECANet,
    images: Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp: str = "none",
) -> Tensor:
    """Class probabilities averaged over scales (and horizontal flips).

    Args:
        net: the segmentation network.
        images: ``[B, 3, H, W]`` normalised images.
        scales: input rescaling factors (the paper's msc: 0.5, 0.75, 1.0, 1.25, 1.5).
        flip: also run the flipped images.
        amp: ``"bf16"`` for autocast on CUDA.

    Returns:
        ``[B, K, H, W]`` float32 probabilities.
    """
    height, width = images.shape[-2:]
    total = torch.zeros(images.shape[0], net.num_classes, height, width, device=images.device)
    count = 0
    for scale in scales:
        size = (max(round(height * scale), 16), max(round(width * scale), 16))
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
    return total / count


def predict_labels(
    net: ECANet,
    images: Tensor,
    rgb: np.ndarray | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: CRFParams | None = None,
    crf_workers: int = 0,
    amp: str = "none",
) -> Tensor:
    """Label maps ``[B, H, W]``: argmax of :func:`predict_probs`, refined by dense CRF if ``crf`` is given.

    ``rgb`` (``[B, H, W, 3]`` uint8) is the unnormalised image, needed by the CRF.
    """
    probs = predict_probs(net, images, scales=scales, flip=flip, amp=amp)
    if crf is None:
        return probs.argmax(dim=1)
    if rgb is None:
        raise ValueError("dense CRF needs the uint8 RGB images (rgb=...)")
    return crf_batch(rgb, probs.cpu(), params=crf, num_workers=crf_workers).to(images.device)


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
