"""Pseudo-labels from foreground score maps (CAM or CARM), with optional PAR refinement.

:func:`refine_pseudo_label` is the single thresholding + refinement path the trainer uses for both the CAM
pseudo-label and the CARM pseudo-label (ECA supervises the decoder with both, Eq. (12)). The background
score is one of:

* a constant ``alpha`` (ECA's hard threshold, the default);
* the two thresholds of an uncertain band ``(low, high)`` (AFA): the maps are refined twice, once with the
  background at ``high`` and once at ``low``; a pixel is the foreground class the ``high`` refinement gives
  if that is foreground, background if both refinements say background, and ``ignore_index`` otherwise;
* an explicit background map ``bg_scores`` (e.g. the calibrated background CARM ``carm[:, :1]``).

The refiner is any callable ``(images [B,3,H,W], maps [B,K,H,W]) -> maps`` such as :class:`ecaseg.par.PAR`,
or ``None`` (plain argmax). Without a refiner the band and ``alpha`` paths give exactly
:func:`ecaseg.cam.cam_to_label` on the upsampled scores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecaseg._checks import check_multi_hot, check_unit_range
from ecaseg.cam import _no_autocast, crop_box_mask

__all__ = ["PseudoLabeler", "Refiner", "refine_pseudo_label"]

Refiner = Callable[[Tensor, Tensor], Tensor]
"""``(images [B,3,H,W], maps [B,K,H,W]) -> refined maps [B,K,H,W]``."""


def _upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    if (x.shape[-2], x.shape[-1]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _argmax_labelled(maps: Tensor, present: Tensor) -> Tensor:
    """Argmax over background + labelled classes of ``[B, K, H, W]`` (ties -> lowest index)."""
    return maps.masked_fill(~present[:, :, None, None], float("-inf")).argmax(dim=1)


def _masked_softmax(maps: Tensor, present: Tensor) -> Tensor:
    """Softmax over the background and the labelled classes of ``[B, K, H, W]``; other classes get 0."""
    logits = maps.masked_fill(~present[:, :, None, None], float("-inf"))
    return logits.softmax(dim=1)


def refine_pseudo_label(
    par: Refiner | None,
    images_denorm: Tensor,
    scores: Tensor,
    labels: Tensor,
    alpha: float = 0.5,
    band: tuple[float, float] | None = None,
    crop_box: Tensor | None = None,
    ignore_index: int = 255,
    bg_scores: Tensor | None = None,
    validate: bool = True,
    softmax: bool = False,
    out_size: tuple[int, int] | None = None,
) -> Tensor:
    """Pixel pseudo-label from normalised foreground scores, background threshold and PAR refinement.

    Steps: upsample ``scores`` (and ``bg_scores``) bilinearly to the image size, zero absent classes, put the
    background score in front (constant ``alpha``, band thresholds, or ``bg_scores``), refine with ``par``,
    take the argmax over the background and the labelled classes only, and set pixels outside ``crop_box``
    to ``ignore_index``.

    The refinement runs on the whole (padded) crop in one batched call; AFA refines each image inside its
    crop box separately. The difference is confined to pixels next to the padding, which is ignored anyway.

    Args:
        par: Refiner ``(images, maps [B,K,H,W]) -> maps`` (e.g. :class:`ecaseg.par.PAR`) or ``None``.
        images_denorm: ``[B, 3, H, W]`` images in ``[0, 1]`` (what PAR expects); sets the output size.
        scores: ``[B, C, h, w]`` normalised foreground scores in ``[0, 1]`` (CAM, or CARM without its
            background channel), C = num_classes - 1.
        labels: ``[B, C]`` multi-hot (0/1) labels.
        alpha: Constant background score (used when ``band`` and ``bg_scores`` are None).
        band: ``(low, high)`` uncertain band (AFA: 0.35, 0.55); excludes ``bg_scores``.
        crop_box: Optional ``[B, 4]`` ``(y0, y1, x0, x1)`` half-open boxes in image pixels.
        ignore_index: Label of ignored pixels.
        bg_scores: Optional background map ``[B, 1, h', w']`` or ``[B, h', w']`` in ``[0, 1]``.
        validate: Check values (finite scores in ``[0, 1]``, 0/1 labels, finite images); reads values back
            to the host. Shapes are always checked.
        softmax: Turn ``[background, labelled classes]`` into probabilities with a softmax before the
            refinement (unlabelled classes get probability 0), as AFA's ``refine_cams_with_bkg_v2`` does;
            ``False`` refines the scores themselves.
        out_size: Bring the refined maps bilinearly to this size before the argmax (AFA's
            ``_refine_cams`` does, after refining at half the image size); ``crop_box`` is then in its
            pixel grid. ``None`` labels at the size of ``images_denorm``.

    Returns:
        LongTensor ``[B, H, W]`` with values in ``{0..C, ignore_index}``.

    Example:
        >>> scores = torch.tensor([[[[0.9, 0.2]], [[0.3, 0.4]]]])
        >>> refine_pseudo_label(None, torch.zeros(1, 3, 1, 2), scores, torch.tensor([[1.0, 1.0]])).tolist()
        [[[1, 0]]]
    """
    if images_denorm.dim() != 4:
        raise ValueError(f"images_denorm must be [B, 3, H, W], got {tuple(images_denorm.shape)}")
    if scores.dim() != 4 or scores.shape[0] != images_denorm.shape[0]:
        raise ValueError(
            f"scores must be [B, C, h, w] with B = {images_denorm.shape[0]}, got {tuple(scores.shape)}"
        )
    batch, num_fg = scores.shape[:2]
    if labels.shape != (batch, num_fg):
        raise ValueError(f"labels must be [B, C] = [{batch}, {num_fg}], got {tuple(labels.shape)}")
    if band is not None and bg_scores is not None:
        raise ValueError(
            "pass either band or bg_scores, not both: bg_scores replaces the band's background thresholds "
            "(a PseudoLabeler built with band=(low, high) takes no bg_scores; build it with band=None)"
        )
    if band is not None and band[0] > band[1]:
        raise ValueError(f"band must be (low, high) with low <= high, got {band}")
    if validate:
        check_unit_range(scores, "scores", labels=labels)
        check_multi_hot(labels, "labels")
        check_unit_range(
            images_denorm,
            "images_denorm",
            hint="pass RGB images scaled to [0, 1] (e.g. ecaseg.data.denormalize)",
        )
        if bg_scores is not None:
            check_unit_range(bg_scores, "bg_scores")
    size = (images_denorm.shape[-2], images_denorm.shape[-1])
    fg_present = labels > 0
    present = torch.cat([torch.ones_like(fg_present[:, :1]), fg_present], dim=1)  # [B, K]

    with _no_autocast(scores.device):
        fg = _upsample(scores.float(), size) * fg_present[:, :, None, None].float()
        if band is None:
            if bg_scores is None:
                bg = torch.full_like(fg[:, :1], alpha)
            else:
                bg_map = bg_scores.unsqueeze(1) if bg_scores.dim() == 3 else bg_scores
                if bg_map.dim() != 4 or bg_map.shape[:2] != (batch, 1):
                    raise ValueError(
                        f"bg_scores must be [B, 1, h, w] or [B, h, w], got {tuple(bg_scores.shape)}"
                    )
                bg = _upsample(bg_map.float(), size)
            maps = torch.cat([bg, fg], dim=1)
            if softmax:
                maps = _masked_softmax(maps, present)
            if par is not None:
                maps = par(images_denorm, maps)
            if out_size is not None:
                maps = _upsample(maps, out_size)
            label = _argmax_labelled(maps, present)
        else:
            low, high = band
            maps = torch.cat(
                [
                    torch.cat([torch.full_like(fg[:, :1], high), fg], dim=1),
                    torch.cat([torch.full_like(fg[:, :1], low), fg], dim=1),
                ],
                dim=0,
            )
            if softmax:
                maps = _masked_softmax(maps, torch.cat([present, present], dim=0))
            if par is not None:
                maps = par(torch.cat([images_denorm, images_denorm], dim=0), maps)
            if out_size is not None:
                maps = _upsample(maps, out_size)
            both = _argmax_labelled(maps, torch.cat([present, present], dim=0))
            label_high, label_low = both[:batch], both[batch:]
            label = torch.where(
                label_low == 0, torch.zeros_like(label_high), torch.full_like(label_high, ignore_index)
            )
            label = torch.where(label_high > 0, label_high, label)
    if crop_box is not None:
        inside = crop_box_mask(crop_box.to(label.device), size if out_size is None else out_size)
        label = torch.where(inside, label, torch.full_like(label, ignore_index))
    return label


class PseudoLabeler(nn.Module):
    """Module form of :func:`refine_pseudo_label` holding the refiner and the thresholds.

    The rules are the function's: the background is ``alpha``, the ``band``, or ``bg_scores`` passed to
    the call; a labeler built with a ``band`` refuses ``bg_scores`` (build it with ``band=None`` for that).

    Args:
        par: Refiner module/callable or ``None``. If it is an ``nn.Module`` it becomes a submodule.
        alpha: Hard background threshold.
        band: Optional ``(low, high)`` uncertain band.
        ignore_index: Label of ignored pixels.
        validate: Check input values (see :func:`refine_pseudo_label`).

    Example:
        >>> labeler = PseudoLabeler(None, alpha=0.5)
        >>> labeler(torch.zeros(1, 3, 2, 2), torch.ones(1, 1, 1, 1), torch.ones(1, 1)).tolist()
        [[[1, 1], [1, 1]]]
    """

    def __init__(
        self,
        par: Refiner | None = None,
        alpha: float = 0.5,
        band: tuple[float, float] | None = None,
        ignore_index: int = 255,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if band is not None and band[0] > band[1]:
            raise ValueError(f"band must be (low, high) with low <= high, got {band}")
        self.par = par
        self.alpha = alpha
        self.band = band
        self.ignore_index = ignore_index
        self.validate = validate

    if TYPE_CHECKING:

        def __call__(
            self,
            images_denorm: Tensor,
            scores: Tensor,
            labels: Tensor,
            crop_box: Tensor | None = None,
            bg_scores: Tensor | None = None,
        ) -> Tensor: ...

    def forward(
        self,
        images_denorm: Tensor,
        scores: Tensor,
        labels: Tensor,
        crop_box: Tensor | None = None,
        bg_scores: Tensor | None = None,
    ) -> Tensor:
        """Pseudo-label a batch (see :func:`refine_pseudo_label`).

        Args:
            images_denorm: ``[B, 3, H, W]`` images in ``[0, 1]``; sets the output size.
            scores: ``[B, C, h, w]`` normalised foreground scores in ``[0, 1]``, C = num_classes - 1.
            labels: ``[B, C]`` multi-hot labels.
            crop_box: Optional ``[B, 4]`` ``(y0, y1, x0, x1)`` half-open boxes in image pixels.
            bg_scores: Optional background map ``[B, 1, h', w']`` (only with ``band=None``).

        Returns:
            LongTensor ``[B, H, W]`` in ``{0..C, ignore_index}``.
        """
        return refine_pseudo_label(
            self.par,
            images_denorm,
            scores,
            labels,
            alpha=self.alpha,
            band=self.band,
            crop_box=crop_box,
            ignore_index=self.ignore_index,
            bg_scores=bg_scores,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, band={self.band}, ignore_index={self.ignore_index}"
