"""SegFormer's all-MLP decoder (the segmentation head of AFA and ECA).

Each of the four encoder maps is projected to ``embed_dim`` channels by a per-pixel linear layer, upsampled
bilinearly to the 1/4-resolution grid of stage 1, concatenated (deepest stage first), fused by a 1x1
convolution + BatchNorm + ReLU, and classified by a 1x1 convolution after channel dropout.

Bilinear resizing is linear and keeps constants, so it commutes with a per-pixel linear map. The head
therefore composes each stage's projection with its slice of the fusion weight (one ``C_i -> embed_dim``
map), applies it at the stage's own resolution and sums the upsampled results: the same function (to
float rounding; ``tests/test_models.py`` checks outputs and gradients against the concatenating form)
without the ``4 * embed_dim -> embed_dim`` convolution at 1/4 resolution, the decoder's largest cost. The
parameters and the checkpoint layout are SegFormer's; ``fold_fuse=False`` runs the concatenating form.
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
        fold_fuse: compute the fusion folded into the per-stage projections (see the module docstring);
            ``False`` concatenates the upsampled projections and fuses them, as SegFormer's code does.

    Example:
        >>> head = SegFormerHead([8, 16], embed_dim=4, num_classes=3).eval()
        >>> head([torch.zeros(2, 8, 8, 8), torch.zeros(2, 16, 4, 4)]).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        embed_dim: int = 256,
        num_classes: int = 21,
        dropout: float = 0.1,
        fold_fuse: bool = True,
    ) -> None:
        super().__init__()
        self.fold_fuse = fold_fuse
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
        size = (features[0].shape[-2], features[0].shape[-1])
        if self.fold_fuse:
            fused = self._folded_fuse(features, size)
        else:
            projected = [proj(f) for proj, f in zip(self.linear_c, features)]
            fused = self.linear_fuse(upsample_concat(projected, size))
        return self.linear_pred(self.dropout(F.relu(self.bn(fused))))

    def _folded_fuse(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """``linear_fuse(concat(up(linear_c_i(f_i))))`` as ``sum_i up((W_fuse_i W_i) f_i + W_fuse_i b_i)``."""
        n, width = len(features), self.embed_dim
        fuse = self.linear_fuse.weight.flatten(1)  # [E, n*E], the deepest stage's slice first
        total: Tensor | None = None
        for i, (proj, f) in enumerate(zip(self.linear_c, features)):
            assert isinstance(proj, nn.Conv2d)
            part = fuse[:, (n - 1 - i) * width : (n - i) * width].float()
            with torch.autocast(f.device.type, enabled=False):  # the composed weights stay in fp32
                weight = (part @ proj.weight.flatten(1).float())[:, :, None, None]
                bias = part @ proj.bias.float() if proj.bias is not None else None
            y = F.conv2d(f, weight.to(f.dtype), None if bias is None else bias.to(f.dtype))
            if (y.shape[-2], y.shape[-1]) != size:
                y = F.interpolate(y, size, mode="bilinear", align_corners=False)
            total = y if total is None else total + y
        assert total is not None
        return total
