"""Training and evaluation transforms (numpy/cv2 in the data loader) and ImageNet (de)normalisation.

Training follows the paper (Sec. 4.1) and its baseline AFA: the long side is resized to a random length in
``resize_long``, the image is rescaled by a random factor in ``scale_range``, flipped horizontally with
probability 1/2 and randomly cropped to ``crop_size`` with padding where the image is smaller; padded
mask pixels are ``ignore_index`` and padded image pixels are 0 after normalisation (the mean colour).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from ecaseg.data.classes import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "EvalTransform",
    "TrainTransform",
    "denormalize",
    "normalize",
    "normalize_crops",
    "normalize_image",
    "worker_init",
]


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of ecaseg's data loaders: OpenCV single-threaded in each worker process.

    The workers already run in parallel; OpenCV's own thread pool in every one of them oversubscribes
    the cores (N workers x all cores threads for every resize).
    """
    cv2.setNumThreads(0)


def _affine_constants(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(scale, shift)`` of ``(x - shift) / scale`` on 0-255 values (one place, so that the
    loader's and the device's normalisation use the very same constants)."""
    return np.asarray(std, dtype=np.float32) * 255.0, np.asarray(mean, dtype=np.float32) * 255.0


def _check_image(image: np.ndarray, mask: np.ndarray | None) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape [H, W, 3], got {image.shape}")
    if mask is not None and mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image size {image.shape[:2]}")


def normalize_image(
    image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """uint8 ``[H, W, 3]`` RGB array -> normalised float32 tensor ``[3, H, W]``: ``(x / 255 - mean) / std``.

    Example:
        >>> half = (0.5, 0.5, 0.5)
        >>> normalize_image(np.full((1, 1, 3), 255, np.uint8), half, half).flatten().tolist()
        [1.0, 1.0, 1.0]
    """
    scale, shift = _affine_constants(mean, std)
    out = (image.astype(np.float32) - shift) / scale
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def _channel_affine(x: Tensor, scale: Sequence[float], shift: Sequence[float]) -> Tensor:
    """``x[..., c, :, :] * scale[c] + shift[c]`` with Python scalars (no host-to-device copy, no sync)."""
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"images must have shape [..., 3, H, W], got {tuple(x.shape)}")
    return torch.stack([c * a + b for c, a, b in zip(x.unbind(-3), scale, shift)], dim=-3)


def denormalize(
    images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """Undo ImageNet normalisation: ``clamp(x * std + mean, 0, 1)``.

    Args:
        images: ``[..., 3, H, W]`` normalised images on any device.
        mean: per-channel mean.
        std: per-channel standard deviation.

    Returns:
        Tensor of the same shape, dtype and device, values in [0, 1].

    Example:
        >>> denormalize(torch.zeros(1, 3, 1, 1)).flatten()
        tensor([0.4850, 0.4560, 0.4060])
    """
    return _channel_affine(images, std, mean).clamp(0.0, 1.0)


def normalize(
    images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """ImageNet-normalise images in [0, 1]: ``(x - mean) / std`` (``[..., 3, H, W]``, any device).

    Example:
        >>> x = torch.rand(2, 3, 4, 4)
        >>> torch.allclose(denormalize(normalize(x)), x, atol=1e-6)
        True
    """
    return _channel_affine(images, [1.0 / s for s in std], [-m / s for m, s in zip(mean, std)])


def normalize_crops(
    images: Tensor,
    crop_box: Tensor | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """uint8 crops ``[B, 3, S, S]`` (:class:`TrainTransform` with ``uint8=True``) -> the normalised float32
    batch that the float path gives, on the crops' device (send the uint8 batch to the GPU, 4x fewer bytes,
    and normalise there).

    The same float32 operations as :func:`normalize_image`, so the result is bitwise equal; pixels outside
    ``crop_box`` (``[B, 4]`` as ``(y0, y1, x0, x1)``, the padding) are 0, the normalised mean colour.

    Example:
        >>> t8 = TrainTransform(crop_size=8, resize_long=None, scale_range=None, hflip=False, uint8=True)
        >>> tf = TrainTransform(crop_size=8, resize_long=None, scale_range=None, hflip=False)
        >>> image = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
        >>> a = t8(image, generator=torch.Generator().manual_seed(0))  # the same crop and padding
        >>> b = tf(image, generator=torch.Generator().manual_seed(0))
        >>> x = normalize_crops(a["image"][None], a["crop_box"][None])[0]
        >>> a["image"].dtype, torch.equal(x, b["image"])
        (torch.uint8, True)
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    scale, shift = _affine_constants(mean, std)
    x = images.float()
    out = torch.stack([(x[:, c] - float(shift[c])) / float(scale[c]) for c in range(3)], dim=1)
    if crop_box is None:
        return out
    box = crop_box.to(images.device)
    ys = torch.arange(images.shape[-2], device=images.device)
    xs = torch.arange(images.shape[-1], device=images.device)
    inside_y = (ys[None] >= box[:, 0:1]) & (ys[None] < box[:, 1:2])
    inside_x = (xs[None] >= box[:, 2:3]) & (xs[None] < box[:, 3:4])
    inside = inside_y[:, :, None] & inside_x[:, None, :]
    return out.masked_fill(~inside[:, None], 0.0)


def _resize(image: np.ndarray, mask: np.ndarray | None, size_hw: tuple[int, int]) -> tuple[np.ndarray, Any]:
    h, w = size_hw
    if (h, w) == image.shape[:2]:
        return image, mask
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    if mask is not None:
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return image, mask


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] (inclusive) from torch's RNG."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator).item())


class TrainTransform:
    """Random resize, rescale, flip and crop with ignore padding, then ImageNet normalisation.

    Random numbers come from torch's (CPU) RNG, or ``generator`` when passed to the call, so
    ``torch.manual_seed`` and DataLoader worker seeding make it reproducible. The two random resizes are
    done as one ``cv2.resize`` (bilinear for the image, nearest for the mask) with the product of the
    factors: a long side uniform in ``resize_long`` (integers), times a factor uniform in ``scale_range``.
    Then a horizontal flip (probability 1/2 when ``hflip``), then a ``crop_size`` square crop: along each
    axis longer than the crop a uniformly random window; along a shorter axis the whole image placed at a
    uniformly random offset inside the crop, the rest being padding.

    Args:
        crop_size: S, the output side.
        resize_long: range of the long side before rescaling, or None to skip.
        scale_range: range of the random rescale factor, or None to skip.
        hflip: random horizontal flip.
        mean: normalisation mean.
        std: normalisation std.
        ignore_index: mask value of padded pixels.
        uint8: return the crop as ``uint8 [3, S, S]`` (padding 0), normalised later on the device by
            :func:`normalize_crops` (bitwise the same floats; the loader skips the float conversion and
            sends a quarter of the bytes).

    Returns (of a call ``transform(image, mask=None, generator=None)``):
        ``{"image": FloatTensor[3, S, S], "crop_box": LongTensor[4], "mask": LongTensor[S, S]}`` where
        ``crop_box = (y0, y1, x0, x1)`` bounds the image content inside the crop (padding outside) and
        ``"mask"`` is present only if a mask was given.

    Example:
        >>> t = TrainTransform(crop_size=8, resize_long=None, scale_range=None, hflip=False)
        >>> out = t(np.zeros((4, 6, 3), np.uint8), np.ones((4, 6), np.uint8))
        >>> out["image"].shape, out["mask"].shape, (out["mask"] == 1).sum().item()
        (torch.Size([3, 8, 8]), torch.Size([8, 8]), 24)
    """

    def __init__(
        self,
        crop_size: int = 512,
        resize_long: tuple[int, int] | None = (512, 2048),
        scale_range: tuple[float, float] | None = (0.5, 2.0),
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = 255,
        uint8: bool = False,
    ) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if resize_long is not None and not 1 <= resize_long[0] <= resize_long[1]:
            raise ValueError(f"resize_long must be (low, high) with 1 <= low <= high, got {resize_long}")
        if scale_range is not None and not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        self.crop_size = int(crop_size)
        self.resize_long = None if resize_long is None else (int(resize_long[0]), int(resize_long[1]))
        self.scale_range = None if scale_range is None else (float(scale_range[0]), float(scale_range[1]))
        self.hflip = hflip
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.ignore_index = ignore_index
        self.uint8 = uint8

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        _check_image(image, mask)
        h, w = image.shape[:2]
        factor = 1.0
        if self.resize_long is not None:
            factor = _randint(*self.resize_long, generator) / max(h, w)
        if self.scale_range is not None:
            factor *= _uniform(*self.scale_range, generator)
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        image, mask = _resize(image, mask, size)
        if self.hflip and torch.rand((), generator=generator).item() < 0.5:
            image = image[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]

        s = self.crop_size
        src, dst = [], []
        for n in image.shape[:2]:
            m = min(n, s)
            src.append(_randint(0, n - m, generator) if n > s else 0)
            dst.append(_randint(0, s - m, generator) if n < s else 0)
        sy, sx = src
        dy, dx = dst
        ch, cw = min(image.shape[0], s), min(image.shape[1], s)

        crop = image[sy : sy + ch, sx : sx + cw]
        if self.uint8:
            out_image = torch.zeros(3, s, s, dtype=torch.uint8)
            out_image[:, dy : dy + ch, dx : dx + cw] = torch.from_numpy(crop.transpose(2, 0, 1).copy())
        else:
            out_image = torch.zeros(3, s, s, dtype=torch.float32)
            out_image[:, dy : dy + ch, dx : dx + cw] = normalize_image(crop, self.mean, self.std)
        out: dict[str, Any] = {
            "image": out_image,
            "crop_box": torch.tensor([dy, dy + ch, dx, dx + cw], dtype=torch.long),
        }
        if mask is not None:
            out_mask = torch.full((s, s), self.ignore_index, dtype=torch.long)
            out_mask[dy : dy + ch, dx : dx + cw] = torch.from_numpy(
                np.ascontiguousarray(mask[sy : sy + ch, sx : sx + cw]).astype(np.int64)
            )
            out["mask"] = out_mask
        return out

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, resize_long={self.resize_long}, "
            f"scale_range={self.scale_range}, hflip={self.hflip})"
        )


class EvalTransform:
    """Evaluation transform: optional resize of the long side, ImageNet normalisation.

    Args:
        mean: normalisation mean.
        std: normalisation std.
        resize_long: if given, resize so that the long side has this length (bilinear image, nearest mask);
            by default images keep their size, which is what benchmark numbers use.

    Returns (of a call ``transform(image, mask=None)``):
        ``{"image": FloatTensor[3, H, W], "mask": LongTensor[H, W] (if given), "orig_hw": LongTensor[2]}``
        with ``orig_hw`` the image size before any resize.

    Example:
        >>> out = EvalTransform()(np.zeros((4, 6, 3), np.uint8), np.zeros((4, 6), np.uint8))
        >>> out["image"].shape, out["mask"].dtype, out["orig_hw"].tolist()
        (torch.Size([3, 4, 6]), torch.int64, [4, 6])
    """

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resize_long: int | None = None,
    ) -> None:
        if resize_long is not None and resize_long < 1:
            raise ValueError(f"resize_long must be positive, got {resize_long}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resize_long = resize_long

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Any]:
        _check_image(image, mask)
        h, w = image.shape[:2]
        if self.resize_long is not None:
            factor = self.resize_long / max(h, w)
            image, mask = _resize(image, mask, (max(1, round(h * factor)), max(1, round(w * factor))))
        out: dict[str, Any] = {
            "image": normalize_image(image, self.mean, self.std),
            "orig_hw": torch.tensor([h, w], dtype=torch.long),
        }
        if mask is not None:
            out["mask"] = torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))
        return out

    def __repr__(self) -> str:
        return f"EvalTransform(resize_long={self.resize_long})"
