"""The container of what a frozen affinity ViT returns (imports torch only).

:class:`DINOFeatures` travels from :class:`ecaseg.dino_affinity.DINOAffinity` to
:class:`ecaseg.carm.CARMGenerator`: keys, class query and patch grid are one object, so they cannot disagree.
It lives apart from :mod:`ecaseg.dino_affinity` (which needs timm) so that ``import ecaseg.carm`` stays light.

:class:`CARMSettings` lives here for the same reason: each affinity ViT carries the CARM settings that suit
it (the ``carm`` field of :class:`ecaseg.dino_affinity.DINOVariant`), and
:meth:`ecaseg.carm.CARMGenerator.for_affinity`
builds the generator from them.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, Literal, get_args

from torch import Tensor

__all__ = ["FG_CUES", "PAPER_CARM_SETTINGS", "CARMSettings", "DINOFeatures", "FgCue"]

FgCue = Literal["cls", "contrast", "none"]
"""Which foreground cue multiplies the CARM in Eq. 7.

``"cls"`` is the class-token cue of Eq. 5 (the paper), ``"contrast"`` the key contrast, ``"none"`` no cue.
"""

FG_CUES: tuple[FgCue, ...] = get_args(FgCue)
"""The values of :data:`FgCue`."""


@dataclass(frozen=True)
class CARMSettings:
    """The CARM settings that belong to one affinity ViT (Eq. (3)-(10)).

    A ViT's affinity distribution decides its graph threshold ``gamma`` (the paper's 0.15 suits DINO ViT-S/8,
    whose key cosines between unrelated patches are low; a small in-domain ViT needs about 0.9), and whether
    its class token finds the objects decides the foreground cue. Each registered variant carries its own
    (the ``carm`` field of :class:`ecaseg.dino_affinity.DINOVariant`);
    :meth:`ecaseg.carm.CARMGenerator.for_affinity` uses
    them unless the caller overrides a field. For a ViT of your own, measure them with
    :func:`ecaseg.refine.search_carm_settings` on a few labelled images (docs, "Bring your own CAMs").

    Attributes:
        k: Seed fraction of Eq. (3).
        gamma: Graph threshold of Eq. (6), in ``[-1, 1)`` (a cosine).
        fg_cue: Foreground cue of Eq. (7) (see :class:`ecaseg.carm.CARMGenerator`).
        clamp_fg_cue: Clamp the cue at 0 (see :func:`ecaseg.carm.region_maps`).
        calibrate: Prototype calibration (Eq. (8)-(10)) when the generator is given the features of a
            trained segmentation backbone (the training loop). Offline, with no backbone features,
            :meth:`~ecaseg.carm.CARMGenerator.for_affinity` never calibrates (measured: docs/choices.rst).
        source: Where the values come from (shown in docs and ``repr``).

    Example:
        >>> CARMSettings().gamma, CARMSettings(gamma=0.9, fg_cue="contrast").fg_cue
        (0.15, 'contrast')
        >>> CARMSettings(gamma=5.0)
        Traceback (most recent call last):
        ...
        ValueError: CARMSettings: gamma must be a cosine threshold in [-1, 1), got 5.0
    """

    k: float = 0.3
    gamma: float = 0.15
    fg_cue: FgCue = "cls"
    clamp_fg_cue: bool = True
    calibrate: bool = True
    source: str = "paper (Sec. 4.1: k 0.3, gamma 0.15, Eq. (5) cue, calibration)"

    def __post_init__(self) -> None:
        if not (isinstance(self.k, (int, float)) and 0.0 < self.k <= 1.0):
            raise ValueError(f"CARMSettings: k must be in (0, 1], got {self.k!r}")
        if not (
            isinstance(self.gamma, (int, float)) and math.isfinite(self.gamma) and -1.0 <= self.gamma < 1.0
        ):
            raise ValueError(f"CARMSettings: gamma must be a cosine threshold in [-1, 1), got {self.gamma!r}")
        if self.fg_cue not in FG_CUES:
            raise ValueError(f"CARMSettings: fg_cue must be one of {FG_CUES}, got {self.fg_cue!r}")

    def replace(self, **changes: Any) -> CARMSettings:
        """A copy with ``changes`` applied (checked like the constructor)."""
        return dataclasses.replace(self, **changes)


PAPER_CARM_SETTINGS = CARMSettings()
"""The paper's settings (VOC; COCO uses ``k = 0.15``), those of ``dino_vits8`` and the Table 5 variants."""


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
