"""Classification and segmentation losses of Eq. (12): :math:`\\mathcal{L}_{cls}`, :math:`\\mathcal{L}_{seg}`.

* :func:`classification_loss` — multi-label soft margin loss on the image-level logits (Section 3.4).
* :func:`segmentation_loss` — cross-entropy of the decoder against a pseudo-label, with background and
  foreground pixels averaged as two halves (AFA's balancing, REFERENCE.md), so that the many background
  pixels do not swamp the objects. Ignored pixels (255) do not count. Used for both the CAM pseudo-label
  (:math:`\\mathcal{L}_{seg}`) and the CARM pseudo-label (:math:`\\widetilde{\\mathcal{L}}_{seg}`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SegmentationLoss", "classification_loss", "segmentation_loss"]


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Multi-label soft margin loss :math:`\\mathcal{L}_{cls}` of Eq. (12).

    Args:
        logits: ``[B, C]`` classifier outputs (foreground classes).
        labels: ``[B, C]`` multi-hot image-level labels.

    Returns:
        A scalar loss.

    Example:
        >>> import torch
        >>> classification_loss(torch.tensor([[10.0, -10.0]]), torch.tensor([[1.0, 0.0]])) < 1e-3
        tensor(True)
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must have one shape")
    return F.multilabel_soft_margin_loss(logits.float(), labels.float())


def segmentation_loss(
    logits: Tensor, target: Tensor, ignore_index: int = 255, balanced: bool = True
) -> Tensor:
    """Cross-entropy of segmentation logits against a pseudo-label (:math:`\\mathcal{L}_{seg}`, Eq. (12)).

    Args:
        logits: ``[B, K, h, w]`` decoder logits; resized bilinearly to the target's size if they differ.
        target: ``[B, H, W]`` labels in ``[0, K)`` or ``ignore_index``.
        ignore_index: label value that carries no loss.
        balanced: average the background-pixel and foreground-pixel losses as two halves (AFA); with
            ``False`` a plain pixel-averaged cross-entropy. A half with no pixels contributes zero.

    Returns:
        A scalar loss (zero when every pixel is ignored).

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 3, 2, 2)
        >>> target = torch.tensor([[[0, 1], [2, 255]]])
        >>> round(float(segmentation_loss(logits, target)), 4)  # ln(3)
        1.0986
    """
    if logits.dim() != 4 or target.dim() != 3:
        raise ValueError(
            f"expected logits [B,K,h,w] and target [B,H,W], got {tuple(logits.shape)}, {tuple(target.shape)}"
        )
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    target = target.long()
    pixel = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    if not balanced:
        return pixel.sum() / valid.sum().clamp_min(1)
    bg = valid & (target == 0)
    fg = valid & (target != 0)
    bg_loss = (pixel * bg).sum() / bg.sum().clamp_min(1)
    fg_loss = (pixel * fg).sum() / fg.sum().clamp_min(1)
    return 0.5 * (bg_loss + fg_loss)


class SegmentationLoss(nn.Module):
    """Module form of :func:`segmentation_loss` (one term of Eq. (12)).

    Args:
        ignore_index: label of pixels without supervision.
        balanced: average the background and foreground losses separately (see :func:`segmentation_loss`).

    Example:
        >>> import torch
        >>> SegmentationLoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)).shape
        torch.Size([])
    """

    def __init__(self, ignore_index: int = 255, balanced: bool = True) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.balanced = balanced

    if TYPE_CHECKING:

        def __call__(self, logits: Tensor, target: Tensor) -> Tensor: ...

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy of the decoder's logits against a pseudo-label.

        Args:
            logits: ``[B, num_classes, h, w]`` segmentation logits (background at index 0).
            target: ``[B, H, W]`` long pseudo-label in ``0..num_classes - 1`` or ``ignore_index``.

        Returns:
            Scalar loss.
        """
        return segmentation_loss(logits, target, self.ignore_index, self.balanced)
