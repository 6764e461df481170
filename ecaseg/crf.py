"""Dense CRF post-processing (Krähenbühl & Koltun, NIPS 2011) with two backends.

The unary is ``-log(p)`` of the class probabilities clipped to ``[clip, 1]`` (pydensecrf's
``unary_from_softmax``); the pairwise terms are a Gaussian (smoothness) kernel over the pixel positions and a
bilateral (appearance) kernel over positions and RGB values, each with a Potts compatibility; inference is
mean field (``Q = softmax(-unary + sum_k w_k * K_k Q)``, every kernel applied to the same ``Q``).

Backends (``backend=``):

* ``"torch"``: the permutohedral-lattice filtering of Adams et al. (Eurographics 2010) written in tensor ops
  on the device of the inputs (:func:`permutohedral_filter`): the lattice vertices come from sorting packed
  integer keys (``torch.unique``), splat and slice are scatter-adds and gathers, the blur is ``d + 1`` gathers
  over precomputed neighbour indices; the images of a batch share one lattice (the image index is part of the
  key). It reproduces pydensecrf's arithmetic: the lattice's scale factors and rounding, the symmetric kernel
  normalisation ``D^-1/2 K D^-1/2`` (``NORMALIZE_SYMMETRIC``) and the update order.
* ``"pydensecrf"``: the C++ library through ``pydensecrf`` (``pip install ecaseg[pydensecrf]``), one image
  at a time on the CPU; it holds the GIL during inference (measured: two threads are no faster than one), so
  batches run in worker processes.
* ``"auto"`` (default): ``"torch"`` on CUDA; on the CPU ``"pydensecrf"`` when it is installed, else
  ``"torch"``.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ecaseg.errors import ConfigError, MissingDependencyError
from ecaseg.utils.workers import ignore_sigint

__all__ = [
    "CRF_BACKENDS",
    "CRFBackend",
    "CRFParams",
    "DenseCRF",
    "available_cores",
    "crf_batch",
    "dense_crf",
    "dense_crf_torch",
    "permutohedral_filter",
    "pydensecrf_available",
    "resolve_crf_backend",
]

CRFBackend = Literal["torch", "pydensecrf", "auto"]
"""Which implementation runs the dense CRF: ``"torch"``, ``"pydensecrf"`` or ``"auto"`` (see the module)."""
#: The valid values of ``backend`` (and of the config key ``eval.crf_backend``).
CRF_BACKENDS: tuple[str, ...] = ("torch", "pydensecrf", "auto")

PYDENSECRF_MISSING = (
    "the 'pydensecrf' dense-CRF backend needs pydensecrf, which is not installed: "
    "pip install ecaseg[pydensecrf] (or use the 'torch' backend, eval.crf_backend=torch)"
)


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


# --- backend choice ------------------------------------------------------------------------------------


def pydensecrf_available() -> bool:
    """Whether ``pydensecrf`` can be imported (the ``pydensecrf`` extra is installed)."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def resolve_crf_backend(
    backend: str, device: torch.device | str | None = None
) -> Literal["torch", "pydensecrf"]:
    """The backend that ``backend`` means for inputs on ``device``.

    ``"auto"`` is ``"torch"`` on CUDA and, on the CPU, ``"pydensecrf"`` when it is installed, else
    ``"torch"``. An explicit ``"pydensecrf"`` that cannot be imported raises
    :class:`~ecaseg.errors.MissingDependencyError` whose message is the install command.

    Example:
        >>> resolve_crf_backend("torch", "cpu")
        'torch'
        >>> resolve_crf_backend("auto", "cpu") == ("pydensecrf" if pydensecrf_available() else "torch")
        True
    """
    if backend not in CRF_BACKENDS:
        raise ConfigError(
            f"invalid dense-CRF backend {backend!r} (eval.crf_backend); "
            f"valid choices: {', '.join(CRF_BACKENDS)}"
        )
    device_type = torch.device(device).type if device is not None else "cpu"
    if backend == "torch" or (backend == "auto" and device_type == "cuda"):
        return "torch"
    if pydensecrf_available():
        return "pydensecrf"
    if backend == "auto":
        return "torch"
    raise MissingDependencyError(PYDENSECRF_MISSING)


# --- permutohedral lattice (torch backend) -------------------------------------------------------------

#: Packed keys use at most this many values (int64 with room to spare); beyond it the lattice falls back to
#: ``torch.unique(dim=0)`` over the key rows.
_PACK_LIMIT = 2**62


def _scale_factors(d: int) -> list[float]:
    """The diagonal of the elevation matrix ``E`` (Adams et al. p. 5) times the inverse std, as pydensecrf
    computes it (a float ``inv_std_dev``, the product in double, stored as float)."""
    inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    return [float(np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev)) for i in range(d)]


class _Lattice:
    """A permutohedral lattice over ``[P, d]`` features: per point the ``d + 1`` enclosing vertices and their
    barycentric weights, per vertex its two neighbours along each of the ``d + 1`` lattice axes."""

    def __init__(self, features: Tensor, groups: Tensor | None = None) -> None:
        f = features.float()
        num_points, d = f.shape
        device = f.device
        self.d = d
        # Elevate onto the hyperplane x_0 + ... + x_d = 0 (pydensecrf's loop, in its float order).
        scale = _scale_factors(d)
        elevated = f.new_empty(num_points, d + 1)
        running = f.new_zeros(num_points)
        for j in range(d, 0, -1):
            cf = f[:, j - 1] * scale[j - 1]
            elevated[:, j] = running - float(j) * cf
            running = running + cf
        elevated[:, 0] = running
        # The closest remainder-0 point (round half to even, as SSE does), then the simplex (the ranks).
        inv = float(np.float32(1.0 / (d + 1)))
        v = torch.round(elevated * inv)
        rem0 = v * float(d + 1)
        total = v.sum(dim=1).long()
        diff = elevated - rem0
        idx = torch.arange(d + 1, device=device)
        less = diff[:, :, None] < diff[:, None, :]  # [P, i, j]: diff_i < diff_j
        after = idx[None, :] > idx[:, None]  # j > i
        rank = (less & after).sum(dim=2) + (~less.transpose(1, 2) & after.T).sum(dim=2)
        rank = rank + total[:, None]
        wrap = (rank < 0).long() - (rank > d).long()
        rank = rank + wrap * (d + 1)
        rem0 = rem0 + (wrap * (d + 1)).float()
        # Barycentric weights (p. 10).
        bv = (elevated - rem0) * inv
        bary = f.new_zeros(num_points, d + 2)
        bary.scatter_add_(1, d - rank, bv)
        bary.scatter_add_(1, d - rank + 1, -bv)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        self.weights = bary[:, : d + 1].contiguous()
        # Vertex keys (first d coordinates; the last one is implied): rem0 + canonical[remainder, rank].
        # canonical[r, k] = r if k <= d - r else r - (d + 1)  (the canonical simplex)
        r = idx.view(1, d + 1, 1)
        low = rank[:, None, :d]
        keys = rem0.long()[:, None, :d] + r - (d + 1) * (low > d - r).long()  # [P, d+1, d]
        if groups is not None:
            keys = torch.cat([groups.long().view(-1, 1, 1).expand(-1, d + 1, 1), keys], dim=2)
        offset, order, neighbours, m = _hash_vertices(keys.reshape(-1, keys.shape[-1]), d)
        self.num_vertices = m
        # Splat and slice as sparse CSR matrices (one SpMM each, on the CPU and CUDA alike); the lattice
        # holds M + 1 rows, the last one always zero (where absent neighbours point).
        alpha = 1.0 / (1.0 + 2.0 ** (-d))  # pydensecrf's "magic scaling constant" of the slice
        weights = self.weights.reshape(-1)
        counts = torch.bincount(offset, minlength=m + 1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            self.slice = torch.sparse_csr_tensor(
                torch.arange(0, num_points * (d + 1) + 1, d + 1, device=device),
                offset,
                weights * alpha,
                size=(num_points, m + 1),
            )
            self.splat = torch.sparse_csr_tensor(
                torch.cat([offset.new_zeros(1), counts.cumsum(0)]),
                torch.div(order, d + 1, rounding_mode="floor"),
                weights[order],
                size=(m + 1, num_points),
            )
        self.neighbours = neighbours  # [d + 1, 2, M + 1]

    def filter(self, values: Tensor, splat: Tensor | None = None, slice_: Tensor | None = None) -> Tensor:
        """Splat ``[P, C]`` values onto the lattice, blur each axis with ``[1/2, 1, 1/2]``, slice back (with
        other splat / slice matrices of the same pattern if given)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            lattice = (self.splat if splat is None else splat) @ values
            for n1, n2 in self.neighbours:  # new = old + (old[n1] + old[n2]) / 2, axis after axis
                lattice = torch.add(
                    lattice, lattice.index_select(0, n1).add_(lattice.index_select(0, n2)), alpha=0.5
                )
            return (self.slice if slice_ is None else slice_) @ lattice


def _hash_vertices(rows: Tensor, d: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Unique vertices of the integer key ``rows`` ``[R, c]`` (the last ``d`` columns are lattice
    coordinates).

    Returns:
        the vertex index of each row; a permutation that sorts the rows by vertex; the ``[d + 1, 2, M + 1]``
        blur neighbours of each vertex along each axis (``M`` where absent, and for the padding row ``M``);
        ``M``.
    """
    cols = rows.shape[1]
    device = rows.device
    lat = cols - d  # leading group columns
    # Neighbour along axis j: every coordinate -1 and coordinate j +d (n1), or the opposite (n2); axis d
    # moves all coordinates by -1 / +1.
    deltas = torch.full((d + 1, cols), -1, dtype=torch.long, device=device)
    deltas[:, :lat] = 0
    axes = torch.arange(d, device=device)
    deltas[axes, lat + axes] = d
    lo = rows.amin(dim=0) - (d + 1)
    radix = (rows.amax(dim=0) + (d + 1) - lo + 1).tolist()
    if math.prod(radix) < _PACK_LIMIT:
        mult_list = [math.prod(radix[c + 1 :]) for c in range(cols)]
        mult = torch.tensor(mult_list, dtype=torch.long, device=device)
        codes = ((rows - lo) * mult).sum(dim=1)
        sorted_codes, order = torch.sort(codes)
        first = torch.ones_like(sorted_codes, dtype=torch.bool)
        first[1:] = sorted_codes[1:] != sorted_codes[:-1]
        verts = sorted_codes[first]
        m = verts.numel()
        offset = torch.empty_like(order)
        offset[order] = first.cumsum(0) - 1
        step = (deltas * mult).sum(dim=1)  # [d+1]
        query = torch.stack([verts[None, :] + step[:, None], verts[None, :] - step[:, None]], dim=1)
        pos = torch.searchsorted(verts, query).clamp_(max=m - 1)
        neighbours = torch.where(verts[pos] == query, pos, torch.full_like(pos, m))
    else:
        verts_rows, offset = torch.unique(rows, dim=0, return_inverse=True)
        order = torch.argsort(offset, stable=True)
        m = verts_rows.shape[0]
        query_rows = torch.stack(
            [verts_rows[None] + deltas[:, None], verts_rows[None] - deltas[:, None]], dim=1
        )  # [d+1, 2, M, c]
        everything = torch.cat([verts_rows, query_rows.reshape(-1, cols)])
        _, inverse = torch.unique(everything, dim=0, return_inverse=True)
        lookup = torch.full((int(inverse.max()) + 1,), m, dtype=torch.long, device=device)
        lookup[inverse[:m]] = torch.arange(m, device=device)
        neighbours = lookup[inverse[m:]].view(d + 1, 2, m)
    pad = torch.full((d + 1, 2, 1), m, dtype=torch.long, device=device)
    return offset, order, torch.cat([neighbours, pad], dim=2), m


def permutohedral_filter(features: Tensor, values: Tensor, groups: Tensor | None = None) -> Tensor:
    """Gaussian filtering ``out_i ≈ c * sum_j exp(-|f_i - f_j|^2 / 2) v_j`` on a permutohedral lattice.

    The lattice of Adams et al. (2010) as pydensecrf builds it (same scale factors, rounding, blur kernel
    ``[1/2, 1, 1/2]`` per axis and ``alpha``); ``c`` is a constant of the lattice (it cancels in the CRF's
    normalised kernels). The filter is an approximation of the exact Gaussian sum; its error against the
    brute-force sum is measured in ``tests/test_crf.py``.

    Args:
        features: ``[N, d]`` float positions (already divided by the kernel's standard deviations).
        values: ``[N, C]`` float values to filter.
        groups: optional ``[N]`` integer group of each point (e.g. the image index); points of different
            groups never interact.

    Returns:
        ``[N, C]`` filtered values (float32, on the inputs' device).

    Example:
        >>> f = torch.tensor([[0.0], [0.1], [50.0]])
        >>> out = permutohedral_filter(f, torch.ones(3, 1))
        >>> bool(out[0] > out[2]) and bool(out[2] > 0)
        True
    """
    if features.dim() != 2 or values.dim() != 2 or values.shape[0] != features.shape[0]:
        raise ValueError(
            f"features must be [N, d] and values [N, C] with the same N, got {tuple(features.shape)} "
            f"and {tuple(values.shape)}"
        )
    if features.shape[1] < 1:
        raise ValueError(f"features must have at least one dimension (d >= 1), got {tuple(features.shape)}")
    if groups is not None and groups.shape != features.shape[:1]:
        raise ValueError(f"groups must be [N] = [{features.shape[0]}], got {tuple(groups.shape)}")
    if features.shape[0] == 0:
        return values.new_zeros(values.shape, dtype=torch.float32)
    return _Lattice(features, groups).filter(values.float())


class _NormalisedKernel:
    """``weight * D^-1/2 K D^-1/2``, ``D = K 1``: a lattice kernel with pydensecrf's symmetric normalisation
    (``NORMALIZE_SYMMETRIC``) and a Potts weight, both folded into the splat and slice matrices."""

    def __init__(self, features: Tensor, groups: Tensor | None = None, weight: float = 1.0) -> None:
        lat = self.lattice = _Lattice(features, groups)
        norm = (lat.filter(features.new_ones(features.shape[0], 1)) + 1e-20).rsqrt().view(-1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            cols = lat.splat.col_indices()
            self.splat = torch.sparse_csr_tensor(
                lat.splat.crow_indices(), cols, lat.splat.values() * norm[cols], size=lat.splat.shape
            )
            scaled = lat.slice.values().view(len(norm), -1) * (norm * weight)[:, None]
            self.slice = torch.sparse_csr_tensor(
                lat.slice.crow_indices(), lat.slice.col_indices(), scaled.reshape(-1), size=lat.slice.shape
            )

    def __call__(self, values: Tensor) -> Tensor:
        return self.lattice.filter(values, self.splat, self.slice)


@functools.lru_cache(maxsize=4)
def _smoothness_kernel(
    height: int, width: int, sxy: float, weight: float, device: torch.device
) -> _NormalisedKernel:
    """The Gaussian (position-only) kernel of an image size; cached, since it depends on nothing else."""
    return _NormalisedKernel(_positions(height, width, device) / sxy, weight=weight)


def _positions(height: int, width: int, device: torch.device) -> Tensor:
    """``[H * W, 2]`` (column, row) of each pixel, row-major, as pydensecrf's features."""
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def _images_rgb(images: np.ndarray | Tensor, device: torch.device | None = None) -> Tensor:
    """``[B, H, W, 3]`` uint8 tensor from ``[B, H, W, 3]`` uint8 or ``[B, 3, H, W]`` (uint8, or float in
    [0, 1]); values checked, kept on the input's device (or moved to ``device``)."""
    imgs = images if isinstance(images, Tensor) else torch.from_numpy(np.asarray(images))
    if device is not None:
        imgs = imgs.to(device)
    if imgs.dim() != 4 or 3 not in (imgs.shape[1], imgs.shape[3]):
        raise ValueError(
            f"images must be [B, 3, H, W] (uint8, or float in [0, 1]) or [B, H, W, 3] uint8 RGB, "
            f"got shape {tuple(imgs.shape)}"
        )
    channels_first = imgs.shape[1] == 3 and (imgs.shape[3] != 3 or imgs.dtype != torch.uint8)
    if channels_first:
        if imgs.dtype != torch.uint8:
            if not imgs.is_floating_point():
                raise ValueError(f"images must be uint8 or float in [0, 1], got {imgs.dtype}")
            if imgs.numel():
                lo, hi = float(imgs.min()), float(imgs.max())
                if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-3 or hi > 1.0 + 1e-3:
                    raise ValueError(
                        "float images must be RGB in [0, 1] (denormalise ImageNet-normalised images first, "
                        f"e.g. ecaseg.data.denormalize), got values in [{lo:.4g}, {hi:.4g}]"
                    )
            imgs = torch.round(imgs.float() * 255.0).clamp(0, 255).to(torch.uint8)
        return imgs.permute(0, 2, 3, 1).contiguous()
    if imgs.dtype != torch.uint8:
        raise ValueError(f"[B, H, W, 3] images must be uint8, got {imgs.dtype}")
    return imgs


def _check_probs(prb: Tensor, batch: int, height: int, width: int) -> None:
    if prb.dim() != 4 or prb.shape[0] != batch or tuple(prb.shape[2:]) != (height, width):
        raise ValueError(
            f"probs must be [B, K, H, W] with B, H, W = {batch}, {height}, {width} "
            f"(the images'), got shape {tuple(prb.shape)}"
        )
    if prb.numel():
        lo, hi = float(prb.min()), float(prb.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError("probs must be finite class probabilities in [0, 1] (softmax the logits first)")


def dense_crf_torch(
    images: np.ndarray | Tensor, probs: np.ndarray | Tensor, params: CRFParams | None = None
) -> Tensor:
    """Mean-field marginals of the dense CRF in tensor ops (the ``"torch"`` backend), batched.

    Args:
        images: RGB images ``[B, 3, H, W]`` (uint8, or float in ``[0, 1]``) or ``[B, H, W, 3]`` uint8.
        probs: ``[B, K, H, W]`` class probabilities; the computation runs on their device.
        params: CRF parameters (default :class:`CRFParams`).

    Returns:
        ``[B, K, H, W]`` float32 marginals ``Q`` after ``params.iterations`` mean-field updates (their argmax
        is the label map), on the device of ``probs``.

    Example:
        >>> imgs = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
        >>> p = torch.tensor([0.3, 0.7]).view(1, 2, 1, 1).expand(1, 2, 4, 4)
        >>> dense_crf_torch(imgs, p).argmax(1).unique().tolist()
        [1]
    """
    params = params or CRFParams()
    prb = probs if isinstance(probs, Tensor) else torch.from_numpy(np.asarray(probs))
    prb = prb.float()
    rgb = _images_rgb(images, prb.device)
    batch, height, width = rgb.shape[:3]
    _check_probs(prb, batch, height, width)
    k = prb.shape[1]
    n = height * width
    if prb.numel() == 0:
        return prb.clone()
    if prb.device.type == "cpu" and batch > 1:
        # on the CPU one image at a time: it is memory-bound, and a batch of 4 images of 500 x 375 took
        # 1.8x as long as the same images one by one (one thread)
        return torch.cat([dense_crf_torch(rgb[i : i + 1], prb[i : i + 1], params) for i in range(batch)])
    device = prb.device
    unary = -prb.clamp(params.clip, 1.0).log().permute(0, 2, 3, 1).reshape(batch, n, k)  # [B, N, K]
    q = torch.softmax(-unary, dim=-1)
    if params.iterations <= 0 or (params.gaussian_compat == 0 and params.bilateral_compat == 0):
        return q.view(batch, height, width, k).permute(0, 3, 1, 2).contiguous()
    smooth = None
    if params.gaussian_compat != 0:
        smooth = _smoothness_kernel(
            height, width, float(params.gaussian_sxy), float(params.gaussian_compat), device
        )
    appearance = None
    if params.bilateral_compat != 0:
        pos = (_positions(height, width, device) / float(params.bilateral_sxy)).expand(batch, n, 2)
        colour = rgb.reshape(batch, n, 3).float() / float(params.bilateral_srgb)
        feats = torch.cat([pos, colour], dim=2).reshape(batch * n, 5)
        groups = torch.arange(batch, device=device).repeat_interleave(n)
        appearance = _NormalisedKernel(feats, groups, weight=float(params.bilateral_compat))
    for _ in range(params.iterations):
        energy = -unary
        if smooth is not None:  # one lattice for the whole batch: the images are channels
            filtered = smooth(q.transpose(0, 1).reshape(n, batch * k)).view(n, batch, k).transpose(0, 1)
            energy = energy + filtered
        if appearance is not None:
            energy = energy + appearance(q.reshape(batch * n, k)).view(batch, n, k)
        q = torch.softmax(energy, dim=-1)
    return q.view(batch, height, width, k).permute(0, 3, 1, 2).contiguous()


# --- pydensecrf backend ---------------------------------------------------------------------------------


def _check(image: np.ndarray, probs: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3] uint8, got shape {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be [K, H, W] with H, W = {image.shape[:2]}, got shape {probs.shape}")


def _crf_probs(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as err:
        raise MissingDependencyError(PYDENSECRF_MISSING) from err

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


def dense_crf(
    image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None, backend: CRFBackend = "auto"
) -> np.ndarray:
    """Run a dense CRF on one image (on the CPU) and return the label map.

    Args:
        image: ``[H, W, 3]`` uint8 RGB image.
        probs: ``[K, H, W]`` float class probabilities (summing to 1 over K).
        params: CRF parameters (default :class:`CRFParams`).
        backend: ``"torch"``, ``"pydensecrf"`` or ``"auto"`` (pydensecrf when installed; see the module).

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
    params = params or CRFParams()
    if resolve_crf_backend(backend, "cpu") == "torch":
        q = dense_crf_torch(image[None], torch.from_numpy(probs.astype(np.float32))[None], params)
        return q[0].argmax(dim=0).numpy().astype(np.int64)
    return _crf_probs(image, probs, params).argmax(axis=0).astype(np.int64)


def _worker(args: tuple[np.ndarray, np.ndarray, CRFParams]) -> np.ndarray:
    """Top-level (picklable) worker for process pools (the pydensecrf backend)."""
    image, probs, params = args
    return dense_crf(image, probs, params, backend="pydensecrf")


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
    if isinstance(images, Tensor):
        images = images.detach().cpu()
    return _images_rgb(images).numpy()


def crf_batch(
    images: np.ndarray | torch.Tensor,
    probs: np.ndarray | torch.Tensor,
    params: CRFParams | None = None,
    num_workers: int | None = None,
    executor: Executor | None = None,
    backend: CRFBackend = "auto",
) -> torch.Tensor:
    """Dense CRF over a batch: in tensor ops on the device of ``probs``, or with pydensecrf in CPU processes.

    Args:
        images: RGB images, numpy array or tensor: ``[B, 3, H, W]`` (uint8, or float in ``[0, 1]``), like
            every other block, or ``[B, H, W, 3]`` uint8. A ``[B, 3, H, 3]`` uint8 array is read as
            ``[B, H, W, 3]``.
        probs: ``[B, K, H, W]`` class probabilities (tensor on any device, or numpy), finite, in
            ``[0, 1]``.
        params: CRF parameters (default :class:`CRFParams`).
        num_workers: pydensecrf worker processes; ``None`` = ``min(B, cores available)``; ``0`` or ``1`` runs
            in-process. The torch backend ignores it.
        executor: an existing executor to submit pydensecrf jobs to (e.g. a long-lived pool); overrides
            ``num_workers``.
        backend: ``"torch"``, ``"pydensecrf"`` or ``"auto"`` (see the module; ``"auto"`` looks at the device
            of ``probs``).

    Returns:
        ``[B, H, W]`` long label maps: on the CPU with pydensecrf, on the device of ``probs`` with torch.

    Example:
        >>> imgs = np.zeros((2, 3, 3, 3), np.uint8)
        >>> p = torch.tensor([0.2, 0.8]).view(1, 2, 1, 1).expand(2, 2, 3, 3)
        >>> crf_batch(imgs, p, num_workers=0).sum().item()
        18
        >>> crf_batch(imgs, p, backend="torch").sum().item()
        18
    """
    device = probs.device if isinstance(probs, Tensor) else torch.device("cpu")
    params = params or CRFParams()
    if resolve_crf_backend(backend, device) == "torch":
        return dense_crf_torch(images, probs, params).argmax(dim=1)
    imgs = _images_hwc_uint8(images)
    prb = _to_numpy(probs).astype(np.float32, copy=False)
    _check_probs(torch.from_numpy(prb), imgs.shape[0], imgs.shape[1], imgs.shape[2])
    jobs = [(imgs[i], prb[i], params) for i in range(imgs.shape[0])]
    if executor is not None:
        results = list(executor.map(_worker, jobs))
    else:
        workers = min(len(jobs), available_cores()) if num_workers is None else num_workers
        if workers <= 1 or len(jobs) <= 1:
            results = [_worker(j) for j in jobs]
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=ignore_sigint) as pool:
                results = list(pool.map(_worker, jobs))
    if not results:
        return torch.zeros(0, *imgs.shape[1:3], dtype=torch.long)
    return torch.from_numpy(np.stack(results)).long()


class DenseCRF(nn.Module):
    """Module wrapper of :func:`crf_batch` (no parameters).

    Args:
        params: CRF parameters.
        num_workers: pydensecrf worker processes (see :func:`crf_batch`).
        backend: ``"torch"``, ``"pydensecrf"`` or ``"auto"`` (see the module).

    Example:
        >>> crf = DenseCRF(num_workers=0)
        >>> probs = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
        >>> crf(np.zeros((1, 2, 2, 3), np.uint8), probs)
        tensor([[[0, 0],
                 [0, 0]]])
    """

    def __init__(
        self, params: CRFParams | None = None, num_workers: int | None = None, backend: CRFBackend = "auto"
    ) -> None:
        super().__init__()
        if backend not in CRF_BACKENDS:
            resolve_crf_backend(backend)  # raises the error naming the choices
        self.params = params or CRFParams()
        self.num_workers = num_workers
        self.backend = backend

    if TYPE_CHECKING:

        def __call__(
            self, images: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor
        ) -> torch.Tensor: ...

    def forward(self, images: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Dense CRF label maps (:func:`crf_batch`).

        Args:
            images: ``[B, 3, H, W]`` RGB (uint8, or float in ``[0, 1]``) or ``[B, H, W, 3]`` uint8.
            probs: ``[B, K, H, W]`` class probabilities.

        Returns:
            ``[B, H, W]`` long label maps (on the CPU with pydensecrf, on the device of ``probs`` with torch).
        """
        return crf_batch(images, probs, self.params, self.num_workers, backend=self.backend)

    def extra_repr(self) -> str:
        return f"params={self.params}, num_workers={self.num_workers}, backend={self.backend!r}"
