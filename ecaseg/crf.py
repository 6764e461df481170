"""Dense CRF post-processing (Krähenbühl & Koltun) through ``pydensecrf``.

The unary is ``-log(p)`` of the class probabilities (``pydensecrf.utils.unary_from_softmax``), the pairwise
terms are a Gaussian (smoothness) kernel and a bilateral (appearance) kernel. ``pydensecrf`` holds the GIL
during inference (measured: two threads are no faster than one), so batches run in worker processes.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ecaseg.utils.workers import ignore_sigint

__all__ = ["CRFParams", "DenseCRF", "crf_batch", "dense_crf"]


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF parameters; the defaults are those of AFA's test script (VOC, images at full size).

    Attributes:
        iterations: mean-field iterations.
        gaussian_sxy: spatial std of the smoothness kernel (pixels).
        gaussian_compat: weight of the smoothness kernel (Potts).
        bilateral_sxy: spatial std of the appearance kernel (pixels).
        bilateral_srgb: colour std of the appearance kernel (0..255 units).
        bilateral_compat: weight of the appearance kernel (Potts).
        clip: probabilities are clipped to at least this before the log.
    """

    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 64.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 4.0
    clip: float = 1e-5


def _check(image: np.ndarray, probs: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3] uint8, got shape {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be [K, H, W] with H, W = {image.shape[:2]}, got shape {probs.shape}")


def _crf_probs(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, k)
    unary = unary_from_softmax(probs.astype(np.float32), clip=params.clip)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.ascontiguousarray(image, dtype=np.uint8),
        compat=params.bilateral_compat,
    )
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(k, h, w)


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None) -> np.ndarray:
    """Run a dense CRF on one image and return the label map.

    Args:
        image: ``[H, W, 3]`` uint8 RGB image.
        probs: ``[K, H, W]`` float class probabilities (summing to 1 over K).
        params: CRF parameters (default :class:`CRFParams`).

    Returns:
        ``[H, W]`` int64 label map (argmax of the CRF marginals).

    Example:
        >>> img = np.zeros((4, 4, 3), np.uint8)
        >>> p = np.stack([np.full((4, 4), 0.7), np.full((4, 4), 0.3)]).astype(np.float32)
        >>> dense_crf(img, p).tolist()[0]
        [0, 0, 0, 0]
    """
    image = np.asarray(image)
    probs = np.asarray(probs)
    _check(image, probs)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    return _crf_probs(image, probs, params or CRFParams()).argmax(axis=0).astype(np.int64)


def _worker(args: tuple[np.ndarray, np.ndarray, CRFParams]) -> np.ndarray:
    """Top-level (picklable) worker for process pools."""
    image, probs, params = args
    return dense_crf(image, probs, params)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.is_meta:
            raise ValueError(f"a meta tensor {tuple(x.shape)} holds no values (a shape only); pass real data")
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _images_hwc_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """``[B, H, W, 3]`` uint8 from ``[B, H, W, 3]`` uint8 or ``[B, 3, H, W]`` (uint8, or float in [0, 1])."""
    imgs = _to_numpy(images)
    if imgs.ndim != 4 or 3 not in (imgs.shape[1], imgs.shape[3]):
        raise ValueError(
            f"images must be [B, 3, H, W] (uint8, or float in [0, 1]) or [B, H, W, 3] uint8 RGB, "
            f"got shape {imgs.shape}"
        )
    channels_first = imgs.shape[1] == 3 and (imgs.shape[3] != 3 or imgs.dtype != np.uint8)
    if channels_first:
        if imgs.dtype != np.uint8:
            if not np.issubdtype(imgs.dtype, np.floating):
                raise ValueError(f"images must be uint8 or float in [0, 1], got {imgs.dtype}")
            if imgs.size and (not np.isfinite(imgs).all() or imgs.min() < -1e-3 or imgs.max() > 1.0 + 1e-3):
                raise ValueError(
                    "float images must be RGB in [0, 1] (denormalise ImageNet-normalised images first, "
                    f"e.g. ecaseg.data.denormalize), got values in [{imgs.min():.4g}, {imgs.max():.4g}]"
                )
            imgs = np.clip(np.rint(imgs * 255.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(imgs.transpose(0, 2, 3, 1))
    if imgs.dtype != np.uint8:
        raise ValueError(f"[B, H, W, 3] images must be uint8, got {imgs.dtype}")
    return imgs


def crf_batch(
    images: np.ndarray | torch.Tensor,
    probs: np.ndarray | torch.Tensor,
    params: CRFParams | None = None,
    num_workers: int | None = None,
    executor: Executor | None = None,
) -> torch.Tensor:
    """Dense CRF over a batch, images in parallel on CPU processes.

    Args:
        images: RGB images, numpy array or tensor: ``[B, 3, H, W]`` (uint8, or float in ``[0, 1]``), like
            every other block, or ``[B, H, W, 3]`` uint8. A ``[B, 3, H, 3]`` uint8 array is read as
            ``[B, H, W, 3]``.
        probs: ``[B, K, H, W]`` class probabilities (tensor on any device, or numpy), finite, in
            ``[0, 1]``.
        params: CRF parameters (default :class:`CRFParams`).
        num_workers: worker processes; ``None`` = ``min(B, cpu_count)``; ``0`` or ``1`` runs in-process.
        executor: an existing executor to submit to (e.g. a long-lived pool); overrides ``num_workers``.

    Returns:
        ``[B, H, W]`` long label maps (CPU).

    Example:
        >>> imgs = np.zeros((2, 3, 3, 3), np.uint8)
        >>> p = torch.tensor([0.2, 0.8]).view(1, 2, 1, 1).expand(2, 2, 3, 3)
        >>> crf_batch(imgs, p, num_workers=0).sum().item()
        18
    """
    imgs = _images_hwc_uint8(images)
    prb = _to_numpy(probs).astype(np.float32, copy=False)
    if prb.ndim != 4 or prb.shape[0] != imgs.shape[0] or prb.shape[2:] != imgs.shape[1:3]:
        raise ValueError(
            f"probs must be [B, K, H, W] with B, H, W = {imgs.shape[0]}, {imgs.shape[1]}, {imgs.shape[2]} "
            f"(the images'), got shape {prb.shape}"
        )
    if prb.size and (not np.isfinite(prb).all() or prb.min() < -1e-3 or prb.max() > 1.0 + 1e-3):
        raise ValueError("probs must be finite class probabilities in [0, 1] (softmax the logits first)")
    params = params or CRFParams()
    jobs = [(imgs[i], prb[i], params) for i in range(imgs.shape[0])]
    if executor is not None:
        results = list(executor.map(_worker, jobs))
    else:
        workers = min(len(jobs), multiprocessing.cpu_count()) if num_workers is None else num_workers
        if workers <= 1 or len(jobs) <= 1:
            results = [_worker(j) for j in jobs]
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=ignore_sigint) as pool:
                results = list(pool.map(_worker, jobs))
    if not results:
        return torch.zeros(0, *imgs.shape[1:3], dtype=torch.long)
    return torch.from_numpy(np.stack(results)).long()


class DenseCRF(nn.Module):
    """Module wrapper of :func:`crf_batch` (no parameters; runs on the CPU).

    Args:
        params: CRF parameters.
        num_workers: worker processes (see :func:`crf_batch`).

    Example:
        >>> crf = DenseCRF(num_workers=0)
        >>> probs = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
        >>> crf(np.zeros((1, 2, 2, 3), np.uint8), probs)
        tensor([[[0, 0],
                 [0, 0]]])
    """

    def __init__(self, params: CRFParams | None = None, num_workers: int | None = None) -> None:
        super().__init__()
        self.params = params or CRFParams()
        self.num_workers = num_workers

    if TYPE_CHECKING:

        def __call__(
            self, images: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor
        ) -> torch.Tensor: ...

    def forward(self, images: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Dense CRF label maps (see :func:`crf_batch`).

        Args:
            images: ``[B, 3, H, W]`` RGB (uint8, or float in ``[0, 1]``) or ``[B, H, W, 3]`` uint8.
            probs: ``[B, K, H, W]`` class probabilities.

        Returns:
            ``[B, H, W]`` long label maps on the CPU.
        """
        return crf_batch(images, probs, self.params, self.num_workers)

    def extra_repr(self) -> str:
        return f"params={self.params}, num_workers={self.num_workers}"
