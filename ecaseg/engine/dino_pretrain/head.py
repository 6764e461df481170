"""The networks of DINO: the projection head (:class:`DINOHead`) and a backbone + head for multi-crop views.

Layout: engine layer; imports torch only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    """Projection head of DINO: MLP (GELU) -> L2-normalised bottleneck -> weight-normalised linear layer.

    Args:
        in_dim: Input dimension (the backbone's embedding size).
        out_dim: Number of outputs ``K``.
        hidden_dim: Width of the hidden layers.
        bottleneck_dim: Dimension of the normalised bottleneck.
        num_layers: Linear layers of the MLP (>= 1; 1 means a single projection to the bottleneck).
        norm_last_layer: Fix the magnitude ``g`` of the last layer's weight normalisation to 1 (not trained).

    Example:
        >>> head = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4)
        >>> head(torch.randn(3, 8)).shape
        torch.Size([3, 16])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        num_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters of the weight-normalised last layer (frozen during the first iterations)."""
        return list(self.last.parameters())

    def forward(self, x: Tensor) -> Tensor:
        """``[M, in_dim] -> [M, out_dim]`` logits."""
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return self.last(z)


class _MultiCropNet(nn.Module):
    """Backbone + head; views of different sizes go through the backbone separately, the head once."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def embed(self, x: Tensor) -> Tensor:
        vit: Any = self.backbone
        return vit.forward_head(vit.forward_features(x), pre_logits=True)

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        return self.head(torch.cat([self.embed(v) for v in views], dim=0))
