"""SegFormer's all-MLP decoder (the segmentation head of AFA and ECA).

Each of the four encoder maps is projected to ``embed_dim`` channels by a per-pixel linear layer, upsampled
bilinearly to the 1/4-resolution grid of stage 1, concatenated (deepest stage first), fused by a 1x1
convolution + BatchNorm + ReLU, and classified by a 1x1 convolution after channel dropout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SegFormerHead", "upsample_concat"]


def upsample_concat(features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
    """Resize maps bilinearly (``align_corners=False``) to ``size`` and concatenate them, last map first.

    Args:
        features: Maps ``[B, C_i, H_i, W_i]``.
        size: Output ``(H, W)``.

    Returns:
        ``[B, sum(C_i), H, W]`` ordered ``features[-1], ..., features[0]`` (SegFormer's order).

    Example:
        >>> maps = [torch.zeros(1, 2, 4, 4), torch.ones(1, 3, 2, 2)]
        >>> out = upsample_concat(maps, (4, 4))
        >>> out.shape, out[0, :3].min().item(), out[0, 3:].max().item()
        (torch.Size([1, 5, 4, 4]), 1.0, 0.0)
    """
    resized = [
        f
        if tuple(f.shape[-2:]) == tuple(size)
        else F.interpolate(f, size, mode="bilinear", align_corners=False)
        for f in features
    ]
    return torch.cat(resized[::-1], dim=1)


class SegFormerHead(nn.Module):
    """All-MLP decoder producing segmentation logits at the resolution of the first map (1/4).

    ``BatchNorm2d`` is used in the fusion layer (AFA used SyncBN); convert with
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU training.

    Args:
        in_channels: Channels of the encoder maps (``backbone.embed_dims``).
        embed_dim: Common projection width (256 in AFA/ECA).
        num_classes: Output classes K (background included).
        dropout: ``Dropout2d`` probability before the classifier.

    Example:
        >>> head = SegFormerHead([8, 16], embed_dim=4, num_classes=3).eval()
        >>> head([torch.zeros(2, 8, 8, 8), torch.zeros(2, 16, 4, 4)]).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(
        self, in_channels: Sequence[int], embed_dim: int = 256, num_classes: int = 21, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.in_channels = [int(c) for c in in_channels]
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        # A per-pixel linear layer is a 1x1 convolution.
        self.linear_c = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in self.in_channels)
        self.linear_fuse = nn.Conv2d(embed_dim * len(self.in_channels), embed_dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Decode the encoder maps into logits ``[B, K, H1, W1]``.

        Args:
            features: The encoder maps, first (highest resolution) first.

        Returns:
            Segmentation logits at the first map's resolution.
        """
        if len(features) != len(self.linear_c):
            raise ValueError(f"SegFormerHead expects {len(self.linear_c)} feature maps, got {len(features)}")
        projected = [proj(f) for proj, f in zip(self.linear_c, features)]
        fused = F.relu(
            self.bn(
                self.linear_fuse(upsample_concat(projected, (features[0].shape[-2], features[0].shape[-1])))
            )
        )
        return self.linear_pred(self.dropout(fused))
