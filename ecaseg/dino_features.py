"""The container of what a frozen affinity ViT returns (imports torch only).

:class:`DINOFeatures` travels from :class:`ecaseg.dino_affinity.DINOAffinity` to
:class:`ecaseg.carm.CARMGenerator`: keys, class query and patch grid are one object, so they cannot disagree.
It lives apart from :mod:`ecaseg.dino_affinity` (which needs timm) so that ``import ecaseg.carm`` stays light.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from torch import Tensor

__all__ = ["DINOFeatures"]


@dataclass
class DINOFeatures:
    """Keys, class query, patch grid and (optionally) patch tokens of a frozen ViT for a batch.

    Build it with :class:`ecaseg.dino_affinity.DINOAffinity` (``dino(images)``), or yourself from any ViT;
    the shapes are checked on construction.

    Attributes:
        keys: ``[B, N, D]`` keys of the N patches in the last block, all heads concatenated (Eq. (4)),
            patches in row-major order of ``grid``.
        cls_query: ``[B, D]`` query of the class token in the last block, heads concatenated (Eq. (5)).
        grid: ``(h, w)`` patch grid, ``N = h * w``.
        tokens: ``[B, N, Dt]`` final normalised patch tokens (the ViT's last norm), or ``None``.
            :class:`~ecaseg.carm.CARMGenerator` uses them for the prototypes when it is given no
            ``features``.

    Example:
        >>> import torch
        >>> feats = DINOFeatures(keys=torch.zeros(2, 6, 8), cls_query=torch.zeros(2, 8), grid=(2, 3))
        >>> feats.batch_size, feats.num_patches
        (2, 6)
        >>> DINOFeatures(keys=torch.zeros(2, 6, 8), cls_query=torch.zeros(2, 8), grid=(3, 3))
        Traceback (most recent call last):
        ...
        ValueError: DINOFeatures: grid (3, 3) has 9 patches but keys [B, N, D] = (2, 6, 8) have N = 6
    """

    keys: Tensor
    cls_query: Tensor
    grid: tuple[int, int]
    tokens: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.keys, Tensor) or self.keys.dim() != 3:
            raise ValueError(f"DINOFeatures: keys must be a [B, N, D] tensor, got {_describe(self.keys)}")
        batch, n, dim = self.keys.shape
        if not isinstance(self.cls_query, Tensor) or tuple(self.cls_query.shape) != (batch, dim):
            raise ValueError(
                f"DINOFeatures: cls_query must be [B, D] = ({batch}, {dim}) like the keys, "
                f"got {_describe(self.cls_query)}"
            )
        try:
            h, w = (_grid_int(v) for v in self.grid)
        except (TypeError, ValueError):
            raise ValueError(f"DINOFeatures: grid must be (h, w) of integers, got {self.grid!r}") from None
        if h < 1 or w < 1:
            raise ValueError(f"DINOFeatures: grid must be positive, got {self.grid!r}")
        if h * w != n:
            raise ValueError(
                f"DINOFeatures: grid ({h}, {w}) has {h * w} patches but keys [B, N, D] = "
                f"{tuple(self.keys.shape)} have N = {n}"
            )
        self.grid = (h, w)
        if self.tokens is not None and (
            not isinstance(self.tokens, Tensor)
            or self.tokens.dim() != 3
            or self.tokens.shape[:2] != (batch, n)
        ):
            raise ValueError(
                f"DINOFeatures: tokens must be [B, N, Dt] with B, N = ({batch}, {n}), "
                f"got {_describe(self.tokens)}"
            )

    @property
    def batch_size(self) -> int:
        """``B``."""
        return int(self.keys.shape[0])

    @property
    def num_patches(self) -> int:
        """``N = h * w``."""
        return int(self.keys.shape[1])


def _grid_int(v: object) -> int:
    """A grid side: an int (Python or an integer-valued 0-d tensor), never a float that would be truncated."""
    if isinstance(v, bool):
        raise TypeError("grid side")
    return operator.index(v)  # type: ignore[arg-type]  # TypeError for floats is the point


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)}"
    return type(x).__name__
