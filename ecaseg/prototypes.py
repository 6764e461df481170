"""Momentum class prototypes and CARM calibration (Section 3.2 of the ECA paper, Eq. (8)-(10)).

* :func:`prototype_momentum_update` -- Eq. (8): ``P_c <- tau P_c + (1 - tau) mean_{i in Q_c} t_i``.
* :func:`prototype_similarity` -- Eq. (9): ``S_c(i) = max(cos(P_c, F_i), 0)``.
* :func:`calibrate_carm` -- Eq. (10): ``min-max(CARM_c * S_c^2)``.
* :class:`MomentumPrototypes` -- the stateful module (buffers ``prototypes`` and ``initialized``).

Which tokens: ``t_i`` (Eq. 8) and ``F`` (Eq. 9) are whatever the caller passes. :class:`ecaseg.CARMGenerator`
is called by the trainer with the segmentation backbone's stage-4 features (detached), used for both: Eq. (9)
names them ``F``, the notation of Section 3.1 for the backbone's feature map, and using the same tokens for
the prototypes keeps ``P_c`` and ``F`` in one embedding space (a cosine between two spaces would be
meaningless). Called without features, :class:`ecaseg.CARMGenerator` uses the DINO patch tokens for both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ecaseg._checks import check_finite, fg_count_message
from ecaseg.cam import _no_autocast, minmax_normalize
from ecaseg.utils.dist import all_reduce_sum

__all__ = [
    "MomentumPrototypes",
    "calibrate_carm",
    "prototype_momentum_update",
    "prototype_similarity",
]


def _present_classes(labels: Tensor, batch: int, num_classes: int) -> Tensor:
    """``[B, K - 1]`` multi-hot -> ``[B, K]`` bool with background (index 0) always present."""
    if labels.dim() != 2 or labels.shape[0] != batch:
        raise ValueError(
            f"labels must be [B, num_classes - 1] = [{batch}, {num_classes - 1}] multi-hot foreground "
            f"labels, got {tuple(labels.shape)}"
        )
    if labels.shape[1] != num_classes - 1:
        raise ValueError("labels: " + fg_count_message(num_classes, "label columns", labels.shape[1]))
    bg = torch.ones(batch, 1, dtype=torch.bool, device=labels.device)
    return torch.cat([bg, labels > 0], dim=1)


def prototype_momentum_update(
    prototypes: Tensor,
    initialized: Tensor,
    tokens: Tensor,
    seeds: Tensor,
    momentum: float,
    sync: bool = True,
) -> tuple[Tensor, Tensor]:
    """Momentum update of class prototypes from the tokens at the seeds, Eq. (8).

    For every class ``c`` with at least one seed in the batch, the mean token over all its seeds in all
    images of the batch (a batch-level mean, each seed weighing the same) replaces ``P_c`` by
    ``tau P_c + (1 - tau) mean``. A class's first update (``initialized[c]`` False) sets ``P_c`` to the mean
    (starting from zeros would only shrink the first estimate). Classes without seeds are unchanged. With
    ``sync=True`` and torch.distributed initialised, per-class sums and counts are summed over processes
    first, so every rank computes identical prototypes. No host synchronisation.

    State cannot be poisoned: a class whose seeds fall on a non-finite token (NaN or inf), on any process,
    is left unchanged for this update (decided on the device, no host synchronisation); the other classes
    are updated as usual.

    Args:
        prototypes: ``[K, D]`` current prototypes.
        initialized: ``[K]`` bool, whether each prototype has been set.
        tokens: ``[B, N, D]`` patch tokens ``t_i``.
        seeds: ``[B, K, N]`` bool seed masks (e.g. from :func:`ecaseg.carm.select_seeds`).
        momentum: ``tau`` in ``[0, 1)``.
        sync: All-reduce the sums and counts across processes.

    Returns:
        ``(new_prototypes [K, D] float32, new_initialized [K] bool)``.

    Example:
        >>> p, init = prototype_momentum_update(
        ...     torch.zeros(2, 1), torch.tensor([False, True]), torch.tensor([[[2.0], [4.0]]]),
        ...     torch.tensor([[[True, True], [True, False]]]), momentum=0.5)
        >>> p.flatten().tolist(), init.tolist()
        ([3.0, 1.0], [True, True])
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if prototypes.dim() != 2 or initialized.shape != prototypes.shape[:1]:
        raise ValueError(
            f"prototypes must be [K, D] and initialized [K], got {tuple(prototypes.shape)} and "
            f"{tuple(initialized.shape)}"
        )
    num_classes, dim = prototypes.shape
    if tokens.dim() != 3 or tokens.shape[-1] != dim:
        raise ValueError(f"tokens must be [B, N, {dim}], got {tuple(tokens.shape)}")
    batch, n = tokens.shape[:2]
    if seeds.shape != (batch, num_classes, n):
        raise ValueError(f"seeds must be [B, K, N] = [{batch}, {num_classes}, {n}], got {tuple(seeds.shape)}")
    if seeds.dtype != torch.bool:
        raise TypeError(
            f"seeds must be a bool mask [B, K, N], got {seeds.dtype}; a float map would weight the tokens by "
            "its values (and 0.5 is not a seed): pass the bool seeds of ecaseg.carm.select_seeds, or "
            "scores > threshold"
        )
    with _no_autocast(tokens.device):
        s = seeds.float()
        t = tokens.detach().float()
        finite = torch.isfinite(t).all(dim=-1)  # [B, N]
        t = torch.where(finite.unsqueeze(-1), t, torch.zeros_like(t))  # a NaN must not leak through 0 * NaN
        bad = torch.einsum("bkn,bn->k", s, (~finite).float())  # seeds of each class on non-finite tokens
        stats = torch.cat(
            [torch.einsum("bkn,bnd->kd", s, t), s.sum(dim=(0, 2)).unsqueeze(1), bad.unsqueeze(1)], dim=1
        )
        if sync:
            all_reduce_sum(stats)  # every rank then skips the same classes
        sums, counts, bad = stats[:, :dim], stats[:, dim], stats[:, dim + 1]
        mean = sums / counts.clamp_min(1.0).unsqueeze(1)
        has = (counts > 0) & (bad == 0) & torch.isfinite(mean).all(dim=1)
        old = prototypes.float()
        moved = torch.where(initialized.unsqueeze(1), momentum * old + (1.0 - momentum) * mean, mean)
        new = torch.where(has.unsqueeze(1), moved, old)
    return new, initialized | has


def prototype_similarity(features: Tensor, prototypes: Tensor, eps: float = 1e-8) -> Tensor:
    """Rectified cosine similarity between every prototype and every token, Eq. (9).

    ``S_c(i) = max(P_c . F_i / (||P_c|| ||F_i||), 0)``.

    Args:
        features: ``[B, N, D]`` tokens ``F``.
        prototypes: ``[K, D]``.
        eps: Norm floor (a zero vector has similarity 0).

    Returns:
        ``[B, K, N]`` float32 in ``[0, 1]``.

    Example:
        >>> prototype_similarity(torch.tensor([[[1.0, 0.0], [-1.0, 1.0]]]), torch.tensor([[2.0, 0.0]]))
        tensor([[[1., 0.]]])
    """
    if features.dim() != 3 or prototypes.dim() != 2 or features.shape[-1] != prototypes.shape[-1]:
        raise ValueError(
            f"features must be [B, N, D] and prototypes [K, D] with the same D, got {tuple(features.shape)} "
            f"and {tuple(prototypes.shape)}"
        )
    with _no_autocast(features.device):
        f = nn.functional.normalize(features.float(), dim=-1, eps=eps)
        p = nn.functional.normalize(prototypes.float(), dim=-1, eps=eps)
        return torch.einsum("kd,bnd->bkn", p, f).clamp_min(0.0)


def calibrate_carm(
    carm: Tensor,
    features: Tensor,
    prototypes: Tensor,
    initialized: Tensor,
    labels: Tensor,
    eps: float = 1e-5,
) -> Tensor:
    """Calibrate class-aware affinity region maps with the prototypes, Eq. (9) and (10).

    ``CARM_c <- min-max(CARM_c * S_c^2)`` per image and class, for the background and every labelled class.
    Classes whose prototype is not initialised yet use ``S = 1`` (left uncalibrated: there is nothing to
    compare with); unlabelled classes are all zero.

    Args:
        carm: ``[B, K, N]`` CARMs (background at index 0).
        features: ``[B, N, D]`` tokens ``F`` on the same ``N`` positions.
        prototypes: ``[K, D]``.
        initialized: ``[K]`` bool.
        labels: ``[B, K - 1]`` multi-hot foreground labels.
        eps: Passed to :func:`ecaseg.cam.minmax_normalize`.

    Returns:
        ``[B, K, N]`` float32 in ``[0, 1]``.

    Example:
        >>> carm = torch.tensor([[[1.0, 1.0], [1.0, 0.5]]])
        >>> feats = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
        >>> protos = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> out = calibrate_carm(carm, feats, protos, torch.tensor([False, True]), torch.tensor([[1.0]]))
        >>> out[0, 1].tolist()
        [1.0, 0.0]
    """
    if carm.dim() != 3:
        raise ValueError(f"carm must be [B, K, N], got {tuple(carm.shape)}")
    batch, num_classes, n = carm.shape
    if features.dim() != 3 or features.shape[:2] != (batch, n):
        raise ValueError(f"features must be [B, N, D] = [{batch}, {n}, D], got {tuple(features.shape)}")
    if prototypes.shape[0] != num_classes or initialized.shape != (num_classes,):
        raise ValueError(
            f"prototypes must be [{num_classes}, D] and initialized [{num_classes}], got "
            f"{tuple(prototypes.shape)} and {tuple(initialized.shape)}"
        )
    present = _present_classes(labels, batch, num_classes)
    sim = prototype_similarity(features, prototypes)
    sim = torch.where(initialized.view(1, -1, 1), sim, torch.ones_like(sim))
    out = minmax_normalize(carm.float() * sim.square(), eps)
    return out * present.unsqueeze(-1).float()


class MomentumPrototypes(nn.Module):
    """One momentum prototype per class (background included) with CARM calibration, Eq. (8)-(10).

    State lives in buffers (saved in ``state_dict``): ``prototypes`` ``[K, dim]`` float32 and
    ``initialized`` ``[K]`` bool. :meth:`update` all-reduces per-class sums and counts under
    torch.distributed, so all ranks hold identical prototypes. The state cannot be poisoned: a non-finite
    token never reaches it (see :func:`prototype_momentum_update`), and ``load_state_dict`` refuses
    non-finite prototypes.

    Args:
        num_classes: ``K``, background included (21 for VOC).
        dim: Token dimension.
        momentum: ``tau`` of Eq. (8); the paper gives no value, 0.9 is the default (see the docs).
        validate: Check the values of the inputs of :meth:`calibrate` (finite features); ``False`` skips
            the checks that synchronise with the host (shapes are always checked).

    Example:
        >>> protos = MomentumPrototypes(num_classes=3, dim=4)
        >>> seeds = torch.zeros(1, 3, 5, dtype=torch.bool)
        >>> seeds[0, 0, 0] = True
        >>> protos.update(torch.randn(1, 5, 4), seeds)
        >>> protos.initialized.tolist()
        [True, False, False]
    """

    prototypes: Tensor
    initialized: Tensor

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.9, validate: bool = True) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_classes = num_classes
        self.dim = dim
        self.momentum = momentum
        self.validate = validate
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    if TYPE_CHECKING:

        def __call__(self, carm: Tensor, features: Tensor, labels: Tensor) -> Tensor: ...

    @torch.no_grad()
    def update(self, tokens: Tensor, seeds: Tensor) -> None:
        """In-place Eq. (8) update (see :func:`prototype_momentum_update`).

        Args:
            tokens: ``[B, N, dim]`` tokens ``t_i``.
            seeds: ``[B, num_classes, N]`` bool seed masks (background first).
        """
        new, init = prototype_momentum_update(
            self.prototypes, self.initialized, tokens, seeds, self.momentum, sync=True
        )
        self.prototypes.copy_(new)
        self.initialized.copy_(init)

    def calibrate(self, carm: Tensor, features: Tensor, labels: Tensor) -> Tensor:
        """Calibrated CARM, Eq. (9)-(10) (see :func:`calibrate_carm`).

        Args:
            carm: ``[B, num_classes, N]`` CARMs, background at index 0.
            features: ``[B, N, dim]`` tokens ``F`` on the same ``N`` positions.
            labels: ``[B, num_classes - 1]`` multi-hot foreground labels.

        Returns:
            ``[B, num_classes, N]`` float32 in ``[0, 1]``.
        """
        if self.validate:
            check_finite(features, "features")
            check_finite(carm, "carm")
        return calibrate_carm(carm, features, self.prototypes, self.initialized, labels)

    def forward(self, carm: Tensor, features: Tensor, labels: Tensor) -> Tensor:
        """Same as :meth:`calibrate`.

        Args:
            carm: ``[B, num_classes, N]`` CARMs, background at index 0.
            features: ``[B, N, dim]`` tokens.
            labels: ``[B, num_classes - 1]`` multi-hot foreground labels.

        Returns:
            ``[B, num_classes, N]`` calibrated CARMs.
        """
        return self.calibrate(carm, features, labels)

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        value = state_dict.get(prefix + "prototypes")
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"state_dict key {prefix}prototypes holds non-finite values (NaN or inf); "
                "refusing to load poisoned prototypes"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, momentum={self.momentum}"
