"""Semantic Affinity Exploitation: class-aware affinity region maps (Section 3.2 of the ECA paper).

* :func:`select_seeds` -- Eq. (3): exclusive top-``k`` CAM seeds per class.
* :func:`affinity_graph` -- Eq. (4): cosine similarity of DINO patch keys.
* :func:`foreground_cue` -- Eq. (5): cosine similarity of the class-token query with the patch keys.
* :func:`contrast_cue` -- an alternative foreground cue (ecaseg extension): how far each key is from the
  image's mean key, for affinity ViTs whose class token does not single out the objects.
* :func:`region_maps` -- Eq. (6)-(7): seed propagation on the thresholded graph, min-max per map.
* :func:`seed_degree` -- Eq. (6)-(7)'s seed degrees from the graph's seed rows only (what
  :class:`CARMGenerator` computes; equal to the dense product).
* :class:`CARMGenerator` -- the whole SAE module (seeds -> graph -> CARM -> prototype calibration,
  Eq. (8)-(10) via :class:`ecaseg.prototypes.MomentumPrototypes`).

All functions are batched over images and classes (no Python loops over classes, seeds or patches) and never
synchronise with the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ecaseg._checks import (
    check_finite,
    check_multi_hot,
    check_normalized_maps,
    check_unit_range,
    fg_count_message,
    shape_str,
)
from ecaseg.cam import _no_autocast, background_cam, minmax_normalize
from ecaseg.dino_features import FG_CUES, CARMSettings, DINOFeatures, FgCue
from ecaseg.prototypes import MomentumPrototypes, _present_classes, calibrate_carm

__all__ = [
    "FG_CUES",
    "CARMGenerator",
    "CARMOutput",
    "CARMSettings",
    "DINOFeatures",
    "FgCue",
    "affinity_graph",
    "contrast_cue",
    "foreground_cue",
    "region_maps",
    "seed_degree",
    "select_seeds",
]


def select_seeds(cams: Tensor, labels: Tensor, k: float) -> Tensor:
    """Exclusive initial CAM seeds, Eq. (3): ``Q_c = Top_k(M_c * 1[argmax_c M = c])``.

    Each patch is first assigned to the class with the highest score among the background (index 0) and the
    image's labelled classes (ties go to the lower index). For the background and each labelled class ``c``,
    let ``n_c`` be the number of patches where the masked activation is non-zero (positive); the seeds are
    the ``ceil(k * n_c)`` of them with the highest activation (ties broken by position). Unlabelled classes
    get no seeds, so two classes never share a seed.

    Implementation: masked activations are sorted per ``(image, class)`` row, each position gets its rank
    ``r``, and a position is kept when its activation is positive and ``r / n_c < k`` (which for an integer
    rank is exactly ``r < ceil(k n_c)``, without rounding trouble in ``ceil(0.3 * 10)``).

    Args:
        cams: ``[B, K, N]`` normalised CAMs with the background (Eq. (2)) at index 0.
        labels: ``[B, K - 1]`` multi-hot foreground labels.
        k: Fraction of the non-zero masked activations kept, in ``(0, 1]`` (paper: 0.3).

    Returns:
        BoolTensor ``[B, K, N]``.

    Example:
        >>> cams = torch.tensor([[[0.1, 0.2, 0.9, 0.8], [0.9, 0.8, 0.1, 0.2]]])
        >>> select_seeds(cams, torch.ones(1, 1), k=0.5).int().tolist()
        [[[0, 0, 1, 0], [1, 0, 0, 0]]]
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    if cams.dim() != 3:
        raise ValueError(f"cams must be [B, K, N] with the background first, got {tuple(cams.shape)}")
    batch, num_classes, n = cams.shape
    present = _present_classes(labels, batch, num_classes)  # [B, K]
    scores = cams.float()
    winner = scores.masked_fill(~present.unsqueeze(-1), float("-inf")).argmax(dim=1)  # [B, N]
    owner = torch.arange(num_classes, device=cams.device).view(1, -1, 1) == winner.unsqueeze(1)
    masked = torch.where(owner & present.unsqueeze(-1), scores, torch.zeros_like(scores))
    positive = masked > 0
    count = positive.sum(dim=-1, keepdim=True).clamp_min(1)  # n_c, [B, K, 1]
    order = masked.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(n, device=cams.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return positive & (rank.float() / count.float() < k)


def affinity_graph(keys: Tensor, eps: float = 1e-8) -> Tensor:
    """Class-agnostic affinity graph, Eq. (4): cosine similarity between all pairs of patch keys.

    Args:
        keys: ``[B, N, D]`` DINO keys of the last block (heads concatenated).
        eps: Norm floor (a zero key has similarity 0).

    Returns:
        ``[B, N, N]`` float32 in ``[-1, 1]``.

    Example:
        >>> affinity_graph(torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])).round(decimals=4)
        tensor([[[1.0000, 0.7071],
                 [0.7071, 1.0000]]])
    """
    if keys.dim() != 3:
        raise ValueError(f"keys must be [B, N, D], got {tuple(keys.shape)}")
    with _no_autocast(keys.device):
        unit = F.normalize(keys.float(), dim=-1, eps=eps)
        return unit @ unit.transpose(1, 2)


def foreground_cue(cls_query: Tensor, keys: Tensor, eps: float = 1e-8) -> Tensor:
    """Foreground-cue map, Eq. (5): cosine similarity of the class-token query with each patch key.

    Args:
        cls_query: ``[B, D]`` query of the class token (heads concatenated).
        keys: ``[B, N, D]`` patch keys.
        eps: Norm floor.

    Returns:
        ``[B, N]`` float32 in ``[-1, 1]``.

    Example:
        >>> foreground_cue(torch.tensor([[1.0, 0.0]]), torch.tensor([[[2.0, 0.0], [0.0, 3.0]]]))
        tensor([[1., 0.]])
    """
    if keys.dim() != 3 or cls_query.dim() != 2 or cls_query.shape != (keys.shape[0], keys.shape[2]):
        raise ValueError(
            f"cls_query must be [B, D] and keys [B, N, D] with the same B and D, got "
            f"{tuple(cls_query.shape)} and {tuple(keys.shape)}"
        )
    with _no_autocast(keys.device):
        q = F.normalize(cls_query.float(), dim=-1, eps=eps)
        kk = F.normalize(keys.float(), dim=-1, eps=eps)
        return torch.einsum("bd,bnd->bn", q, kk)


def contrast_cue(keys: Tensor, eps: float = 1e-8) -> Tensor:
    """Foreground cue from key contrast (ecaseg extension of Eq. (5)), min-max normalised per image.

    ``I_fg(i) = 1 - cos(k_i, k_mean)`` with ``k_mean`` the mean of the image's unit-norm patch keys, then
    scaled to ``[0, 1]`` per image. Background usually covers most of an image and its keys are alike, so the
    mean key sits in the background cluster and object patches are the ones far from it (global-contrast
    saliency on DINO keys). It needs no class token: on the synthetic benchmark the packaged ViT's class
    token does not find the objects (AUC 0.47 for foreground versus background patches) while this cue does
    (0.90); docs, "CARM" page. An image whose keys are all equal gets a zero cue.

    Args:
        keys: ``[B, N, D]`` patch keys.
        eps: Norm floor.

    Returns:
        ``[B, N]`` float32 in ``[0, 1]``.

    Example:
        >>> keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
        >>> contrast_cue(keys)
        tensor([[0., 0., 0., 1.]])
    """
    if keys.dim() != 3:
        raise ValueError(f"keys must be [B, N, D], got {tuple(keys.shape)}")
    with _no_autocast(keys.device):
        unit = F.normalize(keys.float(), dim=-1, eps=eps)
        mean = F.normalize(unit.mean(dim=1), dim=-1, eps=eps)
        cue = 1.0 - torch.einsum("bd,bnd->bn", mean, unit)
        return minmax_normalize(cue.unsqueeze(1), 1e-6).squeeze(1)


def region_maps(
    seeds: Tensor,
    graph: Tensor,
    fg_cue: Tensor | None,
    gamma: float,
    clamp_fg_cue: bool = True,
    eps: float = 1e-5,
) -> Tensor:
    """Class-aware affinity region maps (CARM), Eq. (6) and (7), min-max normalised per map.

    ``A(i) = G(i, :) > gamma`` (Eq. 6); for a foreground class ``CARM_c = (sum_{i in Q_c} A(i)) * I_fg`` and
    for the background ``CARM_0 = sum_{i in Q_0} A(i)`` (Eq. 7), i.e. the degree of every patch towards the
    class's seeds. Computed for all classes at once as ``seeds @ (graph > gamma)``. Each map is then
    min-max normalised to ``[0, 1]``; a class without seeds (or a constant map) is all zero.

    ``fg_cue=None`` drops ``I_fg`` from Eq. (7) (every patch counts as foreground): for affinity ViTs whose
    class token does not single out the objects (see ``CARMGenerator(fg_cue="none")``); :func:`contrast_cue`
    is another cue for them.

    The cosine cue ``I_fg`` can be negative. With ``clamp_fg_cue=True`` (default) it is clamped at 0, so a
    patch the class token finds dissimilar gets a zero foreground score instead of a negative one that the
    min-max would map above the score of unconnected patches; with ``False`` the raw cue is used.

    Args:
        seeds: ``[B, K, N]`` bool seeds (background first), e.g. from :func:`select_seeds`.
        graph: ``[B, N, N]`` affinity graph (:func:`affinity_graph`).
        fg_cue: ``[B, N]`` foreground cue (:func:`foreground_cue` or :func:`contrast_cue`), or None.
        gamma: Graph threshold (paper: 0.15 for DINO ViT-S/8).
        clamp_fg_cue: Clamp the foreground cue at 0.
        eps: Passed to :func:`ecaseg.cam.minmax_normalize`.

    Returns:
        ``[B, K, N]`` float32 in ``[0, 1]``.

    Example:
        >>> graph = torch.tensor([[[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]]])
        >>> seeds = torch.tensor([[[False, False, True], [True, False, False]]])
        >>> region_maps(seeds, graph, torch.tensor([[1.0, 0.5, 0.2]]), gamma=0.15).tolist()
        [[[0.0, 0.0, 1.0], [1.0, 0.5, 0.0]]]
    """
    if seeds.dim() != 3 or graph.dim() != 3:
        raise ValueError(
            f"seeds must be [B, K, N] and graph [B, N, N], got {tuple(seeds.shape)}, {tuple(graph.shape)}"
        )
    batch, _, n = seeds.shape
    if graph.shape != (batch, n, n):
        raise ValueError(f"graph must be [B, N, N] = [{batch}, {n}, {n}], got {tuple(graph.shape)}")
    if fg_cue is not None and fg_cue.shape != (batch, n):
        raise ValueError(f"fg_cue must be [B, N] = [{batch}, {n}], got {tuple(fg_cue.shape)}")
    with _no_autocast(graph.device):
        adjacency = (graph > gamma).float()
        degree = seeds.float() @ adjacency  # [B, K, N]: sum of A(i) over each class's seeds
        return _apply_cue(degree, fg_cue, clamp_fg_cue, eps)


def _apply_cue(degree: Tensor, fg_cue: Tensor | None, clamp_fg_cue: bool, eps: float = 1e-5) -> Tensor:
    """Eq. (7)'s product with the foreground cue (foreground classes only), then min-max per map."""
    with _no_autocast(degree.device):
        if fg_cue is None:
            maps = degree
        else:
            cue = fg_cue.float().clamp_min(0.0) if clamp_fg_cue else fg_cue.float()
            is_fg = (torch.arange(degree.shape[1], device=degree.device) > 0).view(1, -1, 1)
            maps = torch.where(is_fg, degree * cue.unsqueeze(1), degree)
        return minmax_normalize(maps, eps)


def seed_degree(
    seeds: Tensor, keys: Tensor, gamma: float, k: float | None = None, eps: float = 1e-8
) -> Tensor:
    """``seeds @ (affinity_graph(keys) > gamma)`` computed from the seed rows of the graph only.

    Seeds never overlap between classes, so an image has at most ``sum_c ceil(k n_c) <= ceil(k N) + K``
    seed positions (Eq. (3), ``sum_c n_c <= N``). Their indices are gathered with a fixed-size ``topk`` (no
    host synchronisation), only those rows of the cosine graph are computed (``[B, M, N]`` instead of
    ``[B, N, N]``), thresholded, and summed per class. The result is the degree of Eq. (7) before the
    foreground cue, equal to the dense product.

    Args:
        seeds: ``[B, K, N]`` bool exclusive seeds (:func:`select_seeds`).
        keys: ``[B, N, D]`` patch keys.
        gamma: Graph threshold of Eq. (6).
        k: The seed fraction the seeds were drawn with (bounds the row count); ``None`` uses every row
            that holds a seed in some image (a host synchronisation).
        eps: Norm floor of the cosine.

    Returns:
        ``[B, K, N]`` float32 degrees.

    Example:
        >>> keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]])
        >>> seeds = torch.tensor([[[False, False, True], [True, False, False]]])
        >>> seed_degree(seeds, keys, gamma=0.5, k=0.5).tolist()
        [[[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]]
    """
    if seeds.dim() != 3 or keys.dim() != 3 or keys.shape[:2] != (seeds.shape[0], seeds.shape[2]):
        raise ValueError(
            f"seeds must be [B, K, N] and keys [B, N, D] with the same B and N, got {tuple(seeds.shape)} and "
            f"{tuple(keys.shape)}"
        )
    _, num_classes, n = seeds.shape
    seeds = seeds.bool()
    with _no_autocast(keys.device):
        unit = F.normalize(keys.float(), dim=-1, eps=eps)
        is_seed = seeds.any(dim=1)  # [B, N]
        rows = n if k is None else min(n, math.ceil(k * n) + num_classes)
        if k is None:
            rows = max(1, int(is_seed.sum(dim=1).max()))
        score, index = is_seed.float().topk(rows, dim=1)  # seed positions first
        valid = score > 0  # [B, M]
        rows_unit = torch.gather(unit, 1, index.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))  # [B, M, D]
        adjacency = ((rows_unit @ unit.transpose(1, 2)) > gamma) & valid.unsqueeze(-1)  # [B, M, N]
        owner = torch.gather(seeds, 2, index.unsqueeze(1).expand(-1, num_classes, -1))  # [B, K, M]
        return (owner & valid.unsqueeze(1)).float() @ adjacency.float()


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample ``[B, C, h, w]`` to ``size``: area averaging when shrinking, bilinear otherwise."""
    if (x.shape[-2], x.shape[-1]) == tuple(size):
        return x
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@dataclass
class CARMOutput:
    """Result of :class:`CARMGenerator`.

    Attributes:
        carm: ``[B, num_classes, h, w]`` calibrated CARM at the CAM grid, in ``[0, 1]`` (equal to
            ``carm_raw`` when calibration is off); background at index 0, unlabelled classes zero.
        carm_raw: ``[B, num_classes, h, w]`` CARM before calibration (Eq. (7)), at the CAM grid.
        seeds: ``[B, num_classes, hd * wd]`` bool seeds on the DINO grid (Eq. (3)).
    """

    carm: Tensor
    carm_raw: Tensor
    seeds: Tensor


#: How far the aspect ratios of the CAM grid and of the DINO grid may differ (a swapped or foreign grid).
_MAX_ASPECT_RATIO_DIFFERENCE = 1.5


class CARMGenerator(nn.Module):
    """Semantic Affinity Exploitation (SAE): CAM seeds + DINO affinity -> calibrated CARM, Eq. (2)-(10).

    Call it as ``gen(cams, labels, dino, features=None)`` with ``dino = DINOAffinity(...)(images)``. Work is
    done on the DINO patch grid ``(hd, wd)`` and the result is brought back to the CAM grid ``(h, w)``:

    1. the normalised foreground CAM is resampled to the DINO grid (bilinear when upsampling, area average
       when shrinking) and the background CAM is computed there (Eq. (2));
    2. seeds (Eq. (3)), graph (Eq. (4)), foreground cue (Eq. (5)) and CARM (Eq. (6)-(7)) on the DINO grid;
       only the graph's rows at seed positions are computed (:func:`seed_degree`; at most ``ceil(k N) + K``
       of the ``N`` rows), never the whole ``[B, N, N]`` graph;
    3. the prototype tokens are resampled to the DINO grid the same way, so the seeds index tokens directly:
       prototypes are updated with exactly the seed sets ``Q_c`` (Eq. (8)) and the CARM is calibrated there
       (Eq. (9)-(10)). The tokens are ``features`` when given (the trainer passes the segmentation
       backbone's detached stage-4 map), else the DINO patch tokens ``dino.tokens``;
    4. raw and calibrated CARMs are area-averaged (or bilinearly upsampled) to the CAM grid and min-max
       normalised again per map.

    Everything runs under :func:`torch.no_grad`. Prototype updates follow BatchNorm's convention: they
    happen in training mode (``gen.train()``, the default of a new module) and not in eval mode, unless the
    call says otherwise with ``update_prototypes``. With ``calibrate=False`` the prototypes are neither used
    nor updated and no ``features`` are needed.

    The input contract (docs, "Bring your own CAMs"): ``cams`` are *normalised foreground* CAMs in
    ``[0, 1]`` with ``num_classes - 1`` channels (no background channel: it is computed, Eq. (2)), each
    labelled class's map min-max normalised per image (peak 1, or all zero); ``labels`` are 0/1 multi-hot
    ``[B, num_classes - 1]``. With ``validate=True`` (default) values are checked too (finite, in range,
    normalised, 0/1), which reads values back to the host; training loops pass ``validate=False``.

    Args:
        num_classes: ``K``, background included (21 for VOC, 81 for COCO).
        feature_dim: Channels of the prototype tokens: of ``features``, or of ``dino.tokens`` (e.g. 384
            for ViT-S) when no features are passed. Required with ``calibrate=True``.
        k: Seed fraction of Eq. (3) (paper: 0.3).
        gamma: Graph threshold of Eq. (6) (paper: 0.15).
        momentum: Prototype momentum ``tau`` of Eq. (8) (the paper gives none; 0.9).
        calibrate: Apply Eq. (8)-(10); ``False`` is the "w/o calibration" ablation (``carm == carm_raw``).
        clamp_fg_cue: Clamp the foreground cue at 0 (see :func:`region_maps`).
        fg_cue: The foreground cue ``I_fg`` of Eq. (7): ``"cls"``, the class-token cue of Eq. (5) (paper);
            ``"contrast"``, :func:`contrast_cue` (extension, for small in-domain ViTs whose class token does
            not attend to the objects, such as the packaged synthetic ViT; docs, "CARM" page); ``"none"``
            drops it.
        validate: Check input values (see above); shapes are always checked.

    Example:
        >>> from ecaseg.dino_features import DINOFeatures
        >>> gen = CARMGenerator(num_classes=3, feature_dim=6)
        >>> dino = DINOFeatures(keys=torch.randn(1, 16, 6), cls_query=torch.randn(1, 6), grid=(4, 4),
        ...                     tokens=torch.randn(1, 16, 6))
        >>> cams = minmax_normalize(torch.rand(1, 2, 2, 2))  # [B, num_classes - 1, h, w], peak 1 per map
        >>> out = gen(cams, torch.tensor([[1.0, 0.0]]), dino)
        >>> tuple(out.carm.shape), tuple(out.seeds.shape)
        ((1, 3, 2, 2), (1, 3, 16))
    """

    prototypes: MomentumPrototypes | None

    def __init__(
        self,
        num_classes: int,
        feature_dim: int | None = None,
        k: float = 0.3,
        gamma: float = 0.15,
        momentum: float = 0.9,
        calibrate: bool = True,
        clamp_fg_cue: bool = True,
        fg_cue: FgCue = "cls",
        validate: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"num_classes counts the background (21 for VOC) and must be an int >= 2, got {num_classes!r}"
            )
        if not 0.0 < k <= 1.0:
            raise ValueError(f"k must be in (0, 1], got {k}")
        if not (math.isfinite(gamma) and -1.0 <= gamma < 1.0):
            raise ValueError(
                f"gamma thresholds cosine similarities (Eq. (6)) and must be in [-1, 1), got {gamma}; above "
                "any cosine no patch is connected and every CARM is zero (paper: 0.15)"
            )
        if fg_cue not in FG_CUES:
            raise ValueError(f"fg_cue must be one of {FG_CUES}, got {fg_cue!r}")
        if calibrate and feature_dim is None:
            raise ValueError(
                "feature_dim is required with calibrate=True: the channels of the features you pass, or of "
                "the DINO patch tokens (384 for ViT-S) when you pass none"
            )
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.k = k
        self.gamma = gamma
        self.calibrate = calibrate
        self.clamp_fg_cue = clamp_fg_cue
        self.fg_cue: FgCue = fg_cue
        self.validate = validate
        self.prototypes = (
            MomentumPrototypes(num_classes, feature_dim, momentum, validate=validate)
            if feature_dim is not None
            else None
        )

    @classmethod
    def for_affinity(
        cls,
        dino: object,
        num_classes: int,
        *,
        feature_dim: int | None = None,
        momentum: float = 0.9,
        validate: bool = True,
        **overrides: Any,
    ) -> CARMGenerator:
        """The generator with the CARM settings that belong to an affinity ViT (the route for your own CAMs).

        The settings come from ``dino.carm_settings`` (every :class:`~ecaseg.dino_affinity.DINOAffinity`
        has them: the paper's for ``dino_vits8`` and the Table 5 variants, measured ones for the packaged
        synthetic ViT) or from a :class:`~ecaseg.dino_features.CARMSettings` passed directly; keyword
        ``overrides`` (``k``, ``gamma``, ``fg_cue``, ``clamp_fg_cue``, ``calibrate``) replace single fields.

        Calibration (Eq. (8)-(10)) needs the features of a trained segmentation backbone: it runs only when
        ``feature_dim`` is given (then pass ``features`` of that width at every call) and the settings ask
        for it. Without ``feature_dim`` it is off: calibrating with the DINO tokens instead lowered the
        pseudo-labels of CAMs made outside ecaseg (docs/choices.rst, "Offline CARM").

        Args:
            dino: A :class:`~ecaseg.dino_affinity.DINOAffinity` (or any object with ``carm_settings``), or a
                :class:`~ecaseg.dino_features.CARMSettings`.
            num_classes: ``K``, background included.
            feature_dim: Channels of the backbone features passed at each call (enables calibration).
            momentum: Prototype momentum of Eq. (8).
            validate: Check input values at each call.
            **overrides: Fields of :class:`~ecaseg.dino_features.CARMSettings` to change.

        Returns:
            The generator.

        Example:
            >>> from ecaseg.dino_features import CARMSettings
            >>> gen = CARMGenerator.for_affinity(CARMSettings(gamma=0.9, fg_cue="contrast"), num_classes=3)
            >>> gen.gamma, gen.fg_cue, gen.calibrate
            (0.9, 'contrast', False)
        """
        settings = dino if isinstance(dino, CARMSettings) else getattr(dino, "carm_settings", None)
        if not isinstance(settings, CARMSettings):
            raise TypeError(
                "dino must be a DINOAffinity (or have carm_settings) or a CARMSettings, "
                f"got {type(dino).__name__}"
            )
        fields = {"k", "gamma", "fg_cue", "clamp_fg_cue", "calibrate"}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown CARM setting(s) {unknown}; settable: {sorted(fields)}")
        settings = settings.replace(**overrides)
        return cls(
            num_classes,
            feature_dim,
            k=settings.k,
            gamma=settings.gamma,
            momentum=momentum,
            calibrate=settings.calibrate and feature_dim is not None,
            clamp_fg_cue=settings.clamp_fg_cue,
            fg_cue=settings.fg_cue,
            validate=validate,
        )

    if TYPE_CHECKING:

        def __call__(
            self,
            cams: Tensor,
            labels: Tensor,
            dino: DINOFeatures,
            features: Tensor | None = None,
            *,
            update_prototypes: bool | None = None,
        ) -> CARMOutput: ...

    def _check_inputs(
        self, cams: Tensor, labels: Tensor, dino: DINOFeatures, features: Tensor | None
    ) -> None:
        k = self.num_classes
        if not isinstance(cams, Tensor) or cams.dim() != 4:
            raise ValueError(
                f"cams must be [B, num_classes - 1, h, w] = [B, {k - 1}, h, w] normalised foreground CAMs, "
                f"got {shape_str(cams) if isinstance(cams, Tensor) else type(cams).__name__}"
            )
        if cams.shape[1] != k - 1:
            raise ValueError("cams: " + fg_count_message(k, "CAM channels", cams.shape[1]))
        batch = cams.shape[0]
        _present_classes(labels, batch, k)  # the labels' shape
        if not isinstance(dino, DINOFeatures):
            raise TypeError(
                "dino must be the DINOFeatures that DINOAffinity(images) returns, got "
                f"{type(dino).__name__}; with raw tensors use "
                "ecaseg.dino_features.DINOFeatures(keys=..., cls_query=..., grid=(h, w))"
            )
        if dino.batch_size != batch:
            raise ValueError(f"dino holds {dino.batch_size} images but cams hold {batch}")
        if features is not None and (features.dim() != 4 or features.shape[0] != batch):
            raise ValueError(
                f"features must be [B, feature_dim, hf, wf] with B = {batch} (any grid), "
                f"got {shape_str(features)}"
            )
        if features is not None and self.feature_dim is not None and features.shape[1] != self.feature_dim:
            raise ValueError(
                f"features have {features.shape[1]} channels but feature_dim={self.feature_dim} "
                f"(features {shape_str(features)})"
            )
        if not self.validate:
            return
        check_unit_range(cams, "cams", labels=labels)
        check_multi_hot(labels, "labels")
        check_normalized_maps(cams, labels, "cams")
        check_finite(dino.keys, "dino.keys")
        if self.fg_cue == "cls":
            check_finite(dino.cls_query, "dino.cls_query")
        if features is not None:
            check_finite(features, "features")
        (h, w), (hd, wd) = cams.shape[-2:], dino.grid
        if abs(math.log((h / w) / (hd / wd))) > math.log(_MAX_ASPECT_RATIO_DIFFERENCE):
            raise ValueError(
                f"the CAM grid ({h}, {w}) and the DINO grid ({hd}, {wd}) have different aspect ratios; "
                "dino must come from the same images as the CAMs (and grids are (height, width))"
            )

    def _tokens(self, dino: DINOFeatures, features: Tensor | None, grid: tuple[int, int]) -> Tensor:
        """``[B, N, feature_dim]`` prototype tokens on the DINO grid."""
        if features is None:
            if dino.tokens is None:
                raise ValueError(
                    "calibration needs features: pass features=[B, feature_dim, h, w] or a DINOFeatures "
                    "with tokens (DINOAffinity returns them)"
                )
            if dino.tokens.shape[-1] != self.feature_dim:
                raise ValueError(
                    "features=None uses the DINO patch tokens, which have "
                    f"{dino.tokens.shape[-1]} channels, but feature_dim={self.feature_dim}; build "
                    "CARMGenerator(..., "
                    f"feature_dim={dino.tokens.shape[-1]}) or pass features"
                )
            if self.validate:
                check_finite(dino.tokens, "dino.tokens")
            return dino.tokens.detach().float()
        return rearrange(_resize(features.detach().float(), grid), "b c h w -> b (h w) c")

    @torch.no_grad()
    def forward(
        self,
        cams: Tensor,
        labels: Tensor,
        dino: DINOFeatures,
        features: Tensor | None = None,
        *,
        update_prototypes: bool | None = None,
    ) -> CARMOutput:
        """Compute the CARM of a batch.

        Args:
            cams: ``[B, num_classes - 1, h, w]`` normalised foreground CAMs in ``[0, 1]`` (no background
                channel; absent classes are zeroed here anyway).
            labels: ``[B, num_classes - 1]`` multi-hot (0/1) foreground labels.
            dino: :class:`~ecaseg.dino_features.DINOFeatures` of the same images (keys, class query, grid,
                tokens), as ``DINOAffinity(images)`` returns.
            features: ``[B, feature_dim, hf, wf]`` tokens for the prototypes and Eq. (9) (any grid), or
                ``None`` to use ``dino.tokens``; not needed with ``calibrate=False``.
            update_prototypes: Run the Eq. (8) update before calibrating; ``None`` (default) updates in
                training mode only. All-reduced under DDP: every rank must take the same decision.

        Returns:
            :class:`CARMOutput` with ``carm`` and ``carm_raw`` ``[B, num_classes, h, w]`` (background at
            index 0) and ``seeds`` ``[B, num_classes, hd * wd]``.
        """
        self._check_inputs(cams, labels, dino, features)
        batch = cams.shape[0]
        if batch == 0:  # an empty batch: empty maps (no prototype update)
            hd, wd = dino.grid
            empty = cams.new_zeros(0, self.num_classes, *cams.shape[-2:], dtype=torch.float32)
            seeds = torch.zeros(0, self.num_classes, hd * wd, dtype=torch.bool, device=cams.device)
            return CARMOutput(carm=empty, carm_raw=empty, seeds=seeds)
        present = _present_classes(labels, batch, self.num_classes)
        hd, wd = dino.grid
        cam_hw = (cams.shape[-2], cams.shape[-1])
        update = self.training if update_prototypes is None else bool(update_prototypes)
        with _no_autocast(cams.device):
            fg = rearrange(
                _resize(cams.float() * present[:, 1:, None, None].float(), (hd, wd)), "b k h w -> b k (h w)"
            )
            scores = torch.cat([background_cam(fg), fg], dim=1)  # [B, K, N]
            seeds = select_seeds(scores, labels, self.k)
            cue: Tensor | None = None
            if self.fg_cue == "cls":
                cue = foreground_cue(dino.cls_query, dino.keys)
            elif self.fg_cue == "contrast":
                cue = contrast_cue(dino.keys)
            # Eq. (6)-(7) from the graph's seed rows only (seed_degree): the [B, N, N] graph is never built
            degree = seed_degree(seeds, dino.keys, self.gamma, self.k)
            carm_d = _apply_cue(degree, cue, self.clamp_fg_cue)
            carm_raw = minmax_normalize(
                _resize(rearrange(carm_d, "b k (h w) -> b k h w", h=hd, w=wd), cam_hw)
            )
            if not self.calibrate or self.prototypes is None:
                return CARMOutput(carm=carm_raw, carm_raw=carm_raw, seeds=seeds)
            tokens = self._tokens(dino, features, (hd, wd))
            if update:
                self.prototypes.update(tokens, seeds)
            calibrated = calibrate_carm(
                carm_d, tokens, self.prototypes.prototypes, self.prototypes.initialized, labels
            )
            carm = minmax_normalize(
                _resize(rearrange(calibrated, "b k (h w) -> b k h w", h=hd, w=wd), cam_hw)
            )
        return CARMOutput(carm=carm, carm_raw=carm_raw, seeds=seeds)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, k={self.k}, gamma={self.gamma}, calibrate={self.calibrate}, "
            f"fg_cue={self.fg_cue!r}, validate={self.validate}"
        )
