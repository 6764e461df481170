"""Refine CAMs made anywhere into pixel pseudo-labels: threshold, CRF, PAR, random walk, CARM (+ PAR / CRF).

The multi-stage route of WSSS: a classifier's CAMs (yours, IRN's, AMN's, Grad-CAM's) become pixel
pseudo-labels, which then train a segmentation network. This module puts the refinements that are usually
applied to such CAMs behind one call, so they can be compared on the same CAMs and the best one plugged in:

* ``"threshold"``: the CAM with a constant background score ``alpha`` (:func:`ecaseg.cam.cam_to_label`);
* ``"crf"``: the dense CRF of :mod:`ecaseg.crf` on :func:`ecaseg.cam.cam_probabilities`;
* ``"par"``: AFA's pixel-adaptive refinement (:mod:`ecaseg.par`) of the thresholded CAM;
* ``"random_walk"``: a random walk of the CAM on the affinity ViT's key cosines clamped at 0
  (:func:`ecaseg.affinity.random_walk`, ``A^16``, 2 steps), each map divided by its maximum (IRN), then
  thresholded like the CAM;
* ``"carm"``: ECA's class-aware affinity region maps (Eq. (3)-(7), :class:`ecaseg.carm.CARMGenerator`,
  with the ViT's own settings, :meth:`~ecaseg.carm.CARMGenerator.for_affinity`), thresholded like the CAM;
* ``"carm_par"`` / ``"carm_crf"``: the CARM, then PAR or the CRF (:data:`DEFAULT_METHOD`, chosen from the
  recorded benchmark ``benchmarks/results/refine-*.json``, is ``"carm_par"``).

:func:`search_carm_settings` measures the CARM settings (graph threshold, foreground cue) of an affinity
ViT of your own on a few labelled images.

Conventions: ``images`` are RGB in ``[0, 1]`` ``[B, 3, H, W]`` (ImageNet normalisation for the ViT is done
here, with :func:`ecaseg.data.normalize`); ``cams`` are normalised foreground CAMs ``[B, C, h, w]`` in
``[0, 1]`` at any grid (each labelled class's map peaks at 1, e.g. :func:`ecaseg.cam.minmax_normalize` of
ReLU'd CAMs); ``labels`` are 0/1 ``[B, C]``; ``num_classes = C + 1`` counts the background.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecaseg._checks import check_multi_hot, check_unit_range
from ecaseg.affinity import cosine_affinity, random_walk
from ecaseg.cam import cam_probabilities
from ecaseg.carm import CARMGenerator
from ecaseg.crf import CRFParams, crf_batch
from ecaseg.data.transforms import normalize
from ecaseg.dino_features import FG_CUES, CARMSettings, DINOFeatures, FgCue
from ecaseg.metrics import SegmentationMetric
from ecaseg.par import PAR

__all__ = [
    "DEFAULT_METHOD",
    "REFINE_METHODS",
    "CAMRefiner",
    "RefineMethod",
    "RefineOutput",
    "crf_params_for_size",
    "refine_cams",
    "search_carm_settings",
]

RefineMethod = Literal["threshold", "crf", "par", "random_walk", "carm", "carm_par", "carm_crf"]
"""How :class:`CAMRefiner` turns CAMs into a pseudo-label (see the module docstring)."""

REFINE_METHODS: tuple[RefineMethod, ...] = get_args(RefineMethod)
"""The values of :data:`RefineMethod`."""

DEFAULT_METHOD: RefineMethod = "carm_par"
"""The method with the highest mean pseudo-label mIoU over every CAM source and seed of the recorded
benchmark (``benchmarks/refine.py``; docs, "Bring your own CAMs")."""

_NEEDS_DINO = frozenset({"random_walk", "carm", "carm_par", "carm_crf"})


def crf_params_for_size(
    height: int, width: int, base: CRFParams | None = None, reference: int = 500
) -> CRFParams:
    """Scale the spatial standard deviations of ``base`` (AFA's VOC values) to an image's size.

    :class:`~ecaseg.crf.CRFParams`' defaults were set for VOC images (long side about 500 px); on a 128 px
    image their bilateral ``sxy = 64`` spans half the image. The smoothness and appearance ``sxy`` are
    multiplied by ``max(height, width) / reference`` (never below 1 px); colour std, weights and iterations
    are kept.

    Example:
        >>> crf_params_for_size(125, 100).bilateral_sxy
        16.0
    """
    base = base or CRFParams()
    scale = max(height, width) / float(reference)
    return CRFParams(
        iterations=base.iterations,
        gaussian_sxy=max(1.0, base.gaussian_sxy * scale),
        gaussian_compat=base.gaussian_compat,
        bilateral_sxy=max(1.0, base.bilateral_sxy * scale),
        bilateral_srgb=base.bilateral_srgb,
        bilateral_compat=base.bilateral_compat,
        clip=base.clip,
    )


@dataclass
class RefineOutput:
    """Result of :class:`CAMRefiner`.

    Attributes:
        label: ``[B, H, W]`` long pseudo-label at the image size (0 = background, ``1..C``).
        scores: ``[B, C + 1, H, W]`` float32 maps whose argmax over the background and the labelled classes
            is ``label`` (for ``"crf"`` / ``"carm_crf"``: the probabilities the CRF started from).
        carm: ``[B, C + 1, h, w]`` the CARM (methods ``carm*``), else ``None``.
    """

    label: Tensor
    scores: Tensor
    carm: Tensor | None = None


def _argmax_present(maps: Tensor, labels: Tensor) -> Tensor:
    present = torch.cat([torch.ones_like(labels[:, :1], dtype=torch.bool), labels > 0], dim=1)
    return maps.masked_fill(~present[:, :, None, None], float("-inf")).argmax(dim=1)


def _with_bg(fg: Tensor, labels: Tensor, alpha: float) -> Tensor:
    fg = fg.float() * (labels > 0).float()[:, :, None, None]
    return torch.cat([torch.full_like(fg[:, :1], alpha), fg], dim=1)


def _to_size(x: Tensor, size: tuple[int, int]) -> Tensor:
    if (x.shape[-2], x.shape[-1]) == size:
        return x.float()
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)


class CAMRefiner(nn.Module):
    """CAMs (any source) + images + image labels -> pixel pseudo-labels, with one refinement method.

    Args:
        num_classes: ``K = C + 1``, background included.
        method: One of :data:`REFINE_METHODS` (default :data:`DEFAULT_METHOD`).
        dino: The frozen affinity ViT (:class:`~ecaseg.dino_affinity.DINOAffinity`); needed by
            ``random_walk`` and the ``carm*`` methods.
        alpha: Background score of the thresholded maps (CAM or CARM), in ``(0, 1]``.
        carm: The CARM generator; ``None`` builds ``CARMGenerator.for_affinity(dino, num_classes)``, the
            settings that belong to the ViT.
        par: The PAR module; ``None`` builds AFA's (dilations 1-24, 10 iterations).
        crf_params: Dense CRF parameters; ``None`` scales AFA's VOC values to each batch's image size
            (:func:`crf_params_for_size`).
        crf_workers: CPU processes of the CRF (``None``: one per image up to the cores).
        rw_power: Exponent of the random walk's affinity. On the classifier CAMs of benchmark seed 0 with the
            packaged ViT, powers 1, 4 and 16 with 1, 4 and 16 steps gave 12-48 %, power 16 the best (48.3 % at
            one step, 48.1 % at four); 16 with 2 steps gave 49.8 % in the recorded benchmark.
        rw_iterations: Steps of the random walk.
        validate: Check input values (ranges, 0/1 labels); shapes are always checked.

    Example:
        >>> refiner = CAMRefiner(num_classes=3, method="threshold")
        >>> out = refiner(torch.rand(1, 3, 8, 8), torch.tensor([[[[1.0, 0.2]], [[0.0, 0.0]]]]),
        ...               torch.tensor([[1.0, 0.0]]))
        >>> out.label.shape, out.label[0, 0, 0].item(), out.label[0, 0, -1].item()
        (torch.Size([1, 8, 8]), 1, 0)
    """

    def __init__(
        self,
        num_classes: int,
        method: RefineMethod = DEFAULT_METHOD,
        dino: Callable[[torch.Tensor], DINOFeatures] | None = None,
        *,
        alpha: float = 0.5,
        carm: CARMGenerator | None = None,
        par: torch.nn.Module | None = None,
        crf_params: CRFParams | None = None,
        crf_workers: int | None = None,
        rw_power: float = 16.0,
        rw_iterations: int = 2,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"num_classes counts the background and must be an int >= 2, got {num_classes!r}"
            )
        if method not in REFINE_METHODS:
            raise ValueError(f"method must be one of {REFINE_METHODS}, got {method!r}")
        if method in _NEEDS_DINO and dino is None:
            raise ValueError(f"method {method!r} needs the affinity ViT: pass dino=DINOAffinity(...)")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.num_classes = num_classes
        self.method: RefineMethod = method
        self.alpha = float(alpha)
        self.dino = dino
        if method.startswith("carm") and carm is None:
            carm = CARMGenerator.for_affinity(dino, num_classes, validate=validate)
        if carm is not None and carm.num_classes != num_classes:
            raise ValueError(f"carm.num_classes is {carm.num_classes} but num_classes is {num_classes}")
        self.carm = carm
        self.par = par if par is not None else (PAR() if method in ("par", "carm_par") else None)
        self.crf_params = crf_params
        self.crf_workers = crf_workers
        self.rw_power = rw_power
        self.rw_iterations = rw_iterations
        self.validate = validate

    if TYPE_CHECKING:

        def __call__(self, images: Tensor, cams: Tensor, labels: Tensor) -> RefineOutput: ...

    def _check(self, images: Tensor, cams: Tensor, labels: Tensor) -> None:
        c = self.num_classes - 1
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] RGB in [0, 1], got {tuple(images.shape)}")
        if cams.dim() != 4 or cams.shape[:2] != (images.shape[0], c):
            raise ValueError(
                f"cams must be [B, C, h, w] = [{images.shape[0]}, {c}, h, w] normalised foreground CAMs "
                f"(num_classes={self.num_classes} counts the background), got {tuple(cams.shape)}"
            )
        if labels.shape != (images.shape[0], c):
            raise ValueError(f"labels must be [B, C] = [{images.shape[0]}, {c}], got {tuple(labels.shape)}")
        if self.validate:
            check_unit_range(images, "images", hint="pass RGB images scaled to [0, 1]")
            check_unit_range(cams, "cams", labels=labels)
            check_multi_hot(labels, "labels")

    def _crf(self, images: Tensor, probs: Tensor) -> Tensor:
        params = self.crf_params or crf_params_for_size(images.shape[-2], images.shape[-1])
        return crf_batch(images, probs, params, num_workers=self.crf_workers).to(images.device)

    @torch.no_grad()
    def forward(self, images: Tensor, cams: Tensor, labels: Tensor) -> RefineOutput:
        """Refine a batch of same-size images.

        Args:
            images: ``[B, 3, H, W]`` RGB in ``[0, 1]``.
            cams: ``[B, C, h, w]`` normalised foreground CAMs in ``[0, 1]`` (any grid).
            labels: ``[B, C]`` 0/1 image labels.

        Returns:
            :class:`RefineOutput` at the image size.
        """
        self._check(images, cams, labels)
        size = (images.shape[-2], images.shape[-1])
        method = self.method
        labels = labels.to(cams.device)
        carm_out: Tensor | None = None
        if method.startswith("carm"):
            assert self.carm is not None and self.dino is not None
            feats = self.dino(normalize(images))
            carm_out = self.carm(cams.float(), labels.float(), feats).carm
            fg = carm_out[:, 1:]
        else:
            fg = cams.float()
        if method in ("threshold", "carm"):
            scores = _with_bg(_to_size(fg, size), labels, self.alpha)
            return RefineOutput(_argmax_present(scores, labels), scores, carm_out)
        if method in ("par", "carm_par"):
            assert self.par is not None
            scores = self.par(images.float(), _with_bg(_to_size(fg, size), labels, self.alpha))
            return RefineOutput(_argmax_present(scores, labels), scores, carm_out)
        if method in ("crf", "carm_crf"):
            probs = cam_probabilities(_to_size(fg, size), labels, self.alpha)
            return RefineOutput(self._crf(images, probs), probs, carm_out)
        # random walk of the foreground scores on the ViT's clamped key cosines, on its patch grid; each
        # walked map is divided by its maximum (IRN), then thresholded like the CAM
        assert self.dino is not None
        feats = self.dino(normalize(images))
        fg = _to_size(fg, feats.grid) * (labels > 0).float()[:, :, None, None]
        walked = random_walk(
            fg, cosine_affinity(feats.keys), self.rw_power, self.rw_iterations, validate=False
        )
        walked = walked / walked.flatten(2).amax(dim=-1).clamp_min(1e-5)[:, :, None, None]
        scores = _with_bg(_to_size(walked, size), labels, self.alpha)
        return RefineOutput(_argmax_present(scores, labels), scores, None)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, method={self.method!r}, alpha={self.alpha}"


def refine_cams(
    images: Tensor,
    cams: Tensor,
    labels: Tensor,
    method: RefineMethod = DEFAULT_METHOD,
    dino: Callable[[torch.Tensor], DINOFeatures] | None = None,
    **kwargs: Any,
) -> RefineOutput:
    """Functional form of :class:`CAMRefiner` (``num_classes`` from the CAMs: ``C + 1``).

    Example:
        >>> out = refine_cams(torch.rand(1, 3, 4, 4), torch.ones(1, 1, 2, 2), torch.ones(1, 1), "threshold")
        >>> out.label.unique().tolist()
        [1]
    """
    return CAMRefiner(cams.shape[1] + 1, method, dino, **kwargs)(images, cams, labels)


def search_carm_settings(
    dino: Callable[[torch.Tensor], DINOFeatures],
    images: Sequence[Tensor] | Tensor,
    cams: Sequence[Tensor] | Tensor,
    labels: Sequence[Tensor] | Tensor,
    masks: Sequence[Tensor] | Tensor,
    *,
    gammas: Sequence[float] = (0.0, 0.15, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95),
    fg_cues: Sequence[FgCue] = FG_CUES,
    ks: Sequence[float] = (0.3,),
    alpha: float = 0.5,
    base: CARMSettings | None = None,
) -> tuple[CARMSettings, list[dict[str, Any]]]:
    """Measure the CARM settings of an affinity ViT on a few labelled images (a grid search).

    For each combination of graph threshold, foreground cue and seed fraction, the CARMs of all images are
    thresholded at ``alpha`` (method ``"carm"``) and scored against the masks; the ViT runs once per batch.
    Use the returned settings with ``DINOAffinity.from_model(vit, carm_settings=best)`` or
    ``CARMGenerator.for_affinity(best, num_classes)``. How many images it needs: docs, "Bring your own
    CAMs" (on the synthetic benchmark, 20 images chose as 100 did on one seed, a neighbouring gamma on the
    other).

    Args:
        dino: The affinity ViT.
        images: Batches (or one batch) of ``[B, 3, H, W]`` RGB in ``[0, 1]``.
        cams: Matching ``[B, C, h, w]`` normalised foreground CAMs.
        labels: Matching ``[B, C]`` 0/1 image labels.
        masks: Matching ``[B, H, W]`` ground-truth masks (255 ignored).
        gammas: Graph thresholds to try.
        fg_cues: Foreground cues to try.
        ks: Seed fractions to try.
        alpha: Background score of the thresholded CARM.
        base: Settings whose other fields are kept (default: the paper's).

    Returns:
        ``(best settings, rows)``; each row holds ``gamma``, ``fg_cue``, ``k`` and ``miou``, best first.

    Example:
        >>> from ecaseg.dino_affinity import DINOAffinity
        >>> dino = DINOAffinity("vit_nano_p8", allow_random_init=True)
        >>> masks = torch.zeros(1, 16, 16, dtype=torch.long); masks[:, 4:12, 4:12] = 1
        >>> cams = torch.zeros(1, 1, 16, 16); cams[..., 5:11, 5:11] = 1.0
        >>> best, rows = search_carm_settings(dino, torch.rand(1, 3, 16, 16), cams, torch.ones(1, 1), masks,
        ...                                   gammas=(0.5, 0.9), fg_cues=("none",))
        >>> len(rows), best.fg_cue
        (2, 'none')
    """
    batches = [images] if isinstance(images, Tensor) else list(images)
    cam_b = [cams] if isinstance(cams, Tensor) else list(cams)
    lab_b = [labels] if isinstance(labels, Tensor) else list(labels)
    mask_b = [masks] if isinstance(masks, Tensor) else list(masks)
    if not (len(batches) == len(cam_b) == len(lab_b) == len(mask_b)) or not batches:
        raise ValueError("images, cams, labels and masks must be the same number of (non-empty) batches")
    base = base or CARMSettings()
    num_classes = cam_b[0].shape[1] + 1
    feats = [dino(normalize(img)) for img in batches]
    rows: list[dict[str, Any]] = []
    for gamma, cue, k in itertools.product(gammas, fg_cues, ks):
        settings = base.replace(gamma=float(gamma), fg_cue=cue, k=float(k), calibrate=False)
        gen = CARMGenerator.for_affinity(settings, num_classes)
        metric = SegmentationMetric(num_classes)
        for img, cam, lab, mask, feat in zip(batches, cam_b, lab_b, mask_b, feats):
            carm = gen(cam.float(), lab.float(), feat).carm
            scores = _with_bg(_to_size(carm[:, 1:], (img.shape[-2], img.shape[-1])), lab, alpha)
            metric.update(_argmax_present(scores, lab), mask.long())
        rows.append({"gamma": float(gamma), "fg_cue": cue, "k": float(k), "miou": metric.compute()["miou"]})
    rows.sort(key=lambda r: -r["miou"])
    best = rows[0]
    return base.replace(
        gamma=best["gamma"], fg_cue=best["fg_cue"], k=best["k"], source="search_carm_settings"
    ), rows
