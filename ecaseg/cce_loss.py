"""CAM Correspondence Enhancement (CCE) loss, Eq. (11) of the ECA paper.

Each local view is a box of the global image (``geometry = (y0, x0, h, w, flipped)`` in global pixels),
resized to the local size and possibly flipped horizontally. The centre of every patch of the local CAM
grid is mapped back into the global image and takes the global CAM pseudo-label at that point (nearest
pixel; ``ignore_index`` where uncertain or outside the image). Inside each view, two patches with the same
label form a positive pair, two with different labels a negative pair, and

    L_corr = sum_views [ mean_{(i,j) in R+} (1 - D(M_i, M_j)) + mean_{(i,j) in R-} D(M_i, M_j) ]   (Eq. 11)

where ``M_i`` is the distribution over the C foreground classes made from patch ``i``'s local CAM
(softmax over classes) and ``D`` the Jensen-Shannon divergence divided by ``ln 2`` so that it lies in
``[0, 1]``. The sum over views is averaged over the images of the batch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ecaseg._checks import check_finite, check_multi_hot, shape_str
from ecaseg.geometry import view_sampling_grid

__all__ = ["CCELoss", "cce_loss", "check_view_geometry", "js_divergence", "local_view_labels", "pairwise_js"]

_LN2 = math.log(2.0)
_TINY = 1e-12


def js_divergence(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log) between distributions along ``dim``, in ``[0, ln 2]``.

    ``JS(p, q) = KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2`` and ``0 log 0 = 0``.

    Args:
        p: probabilities (non-negative, summing to 1 along ``dim``).
        q: probabilities broadcastable with ``p``.
        dim: the distribution dimension.

    Returns:
        the divergence with ``dim`` reduced.

    Example:
        >>> js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
        tensor(0.6931)
    """
    p, q = torch.broadcast_tensors(p, q)
    m = 0.5 * (p + q)
    log_m = m.clamp_min(_TINY).log()
    kl_p = (p * (p.clamp_min(_TINY).log() - log_m)).sum(dim)
    kl_q = (q * (q.clamp_min(_TINY).log() - log_m)).sum(dim)
    return (0.5 * (kl_p + kl_q)).clamp(0.0, _LN2)


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(p * p.clamp_min(_TINY).log()).sum(dim)


def pairwise_js(p: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between all pairs of rows: ``[..., M, C] -> [..., M, M]`` in ``[0, ln 2]``.

    Uses ``JS(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2`` so only one ``[..., M, M, C]`` temporary is built.

    Example:
        >>> pairwise_js(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        tensor([[0.0000, 0.6931],
                [0.6931, 0.0000]])
    """
    h = _entropy(p)
    h_mix = _entropy(0.5 * (p.unsqueeze(-2) + p.unsqueeze(-3)))
    return (h_mix - 0.5 * (h.unsqueeze(-1) + h.unsqueeze(-2))).clamp(0.0, _LN2)


def local_view_labels(
    global_label: torch.Tensor,
    geometry: torch.Tensor,
    out_hw: tuple[int, int],
    global_hw: tuple[int, int] | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Global pseudo-label at the centre of every local-view patch (nearest pixel).

    Args:
        global_label: ``[B, Hl, Wl]`` long label of the global view (may be at another resolution than
            the global image, e.g. the CAM grid).
        geometry: ``[B, V, 5]`` view boxes ``(y0, x0, h, w, flipped)`` in global-image pixels.
        out_hw: ``(h, w)`` of the local CAM grid.
        global_hw: ``(H, W)`` of the global image in which ``geometry`` is expressed (default: the label's
            size).
        ignore_index: label of uncertain pixels, also given to patches falling outside the image.

    Returns:
        ``[B, V, h * w]`` long labels in row-major patch order.

    Example:
        >>> lab = torch.tensor([[[1, 2], [3, 4]]])
        >>> geo = torch.tensor([[[0.0, 0.0, 2.0, 2.0, 1.0]]])  # whole image, flipped
        >>> local_view_labels(lab, geo, (2, 2))
        tensor([[[2, 1, 4, 3]]])
    """
    if global_label.dim() != 3:
        raise ValueError(f"global_label must be [B, H, W], got {tuple(global_label.shape)}")
    b, hl, wl = global_label.shape
    if geometry.dim() != 3 or geometry.shape[0] != b or geometry.shape[2] != 5:
        raise ValueError(f"geometry must be [B={b}, V, 5], got {tuple(geometry.shape)}")
    ghw = (hl, wl) if global_hw is None else (int(global_hw[0]), int(global_hw[1]))
    grid = view_sampling_grid(geometry, out_hw, ghw)
    grid = grid.to(torch.float32)
    ix = torch.floor((grid[..., 0] + 1.0) * (0.5 * wl)).long()
    iy = torch.floor((grid[..., 1] + 1.0) * (0.5 * hl)).long()
    inside = (ix >= 0) & (ix < wl) & (iy >= 0) & (iy < hl)
    flat = (iy.clamp(0, hl - 1) * wl + ix.clamp(0, wl - 1)).flatten(1)  # [B, V*h*w]
    picked = torch.gather(global_label.reshape(b, -1).long(), 1, flat).view_as(ix)
    picked = torch.where(inside, picked, torch.full_like(picked, ignore_index))
    return picked.flatten(2)


def check_view_geometry(geometry: torch.Tensor, global_hw: tuple[int, int], tol: float = 1.0) -> None:
    """Raise ``ValueError`` unless every view box lies inside the global image (one host synchronisation).

    Catches the silent failure of a pseudo-label at CAM resolution with ``global_hw`` left out: the boxes,
    in image pixels, then fall outside the label's small grid and every patch would be ignored.

    Args:
        geometry: ``[B, V, 5]`` boxes ``(y0, x0, h, w, flipped)`` in global-image pixels.
        global_hw: ``(H, W)`` the boxes refer to.
        tol: Tolerance in pixels.

    Example:
        >>> check_view_geometry(torch.tensor([[[0.0, 0.0, 8.0, 8.0, 0.0]]]), (4, 4))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: geometry: view boxes reach (y, x) = (8, 8) from (0, 0) but global_hw is (4, 4) ...
    """
    if geometry.numel() == 0:
        return
    geo = geometry.detach().double()
    y0, x0, bh, bw, flipped = geo.unbind(-1)
    stats = torch.stack(
        [
            y0.min(),
            x0.min(),
            (y0 + bh).max(),
            (x0 + bw).max(),
            torch.minimum(bh, bw).min(),
            ((flipped != 0) & (flipped != 1)).sum().double(),
        ]
    ).tolist()
    ymin, xmin, ymax, xmax, side, bad_flip = stats
    if side <= 0:
        raise ValueError(f"geometry: view boxes need a positive height and width, got a side of {side:.4g}")
    if bad_flip:
        raise ValueError("geometry: the 5th value of each box (flipped) must be 0 or 1")
    if ymin < -tol or xmin < -tol or ymax > global_hw[0] + tol or xmax > global_hw[1] + tol:
        raise ValueError(
            f"geometry: view boxes reach (y, x) = ({ymax:.4g}, {xmax:.4g}) from ({ymin:.4g}, {xmin:.4g}) but "
            f"global_hw is ({global_hw[0]}, {global_hw[1]}) (default: global_label's size); pass "
            "global_hw=(H, W), the size of the global image the boxes are expressed in"
        )


def cce_loss(
    local_cams: torch.Tensor,
    geometry: torch.Tensor,
    global_label: torch.Tensor,
    *,
    global_hw: tuple[int, int] | None = None,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_patches: int = 256,
    ignore_index: int = 255,
    temperature: float = 1.0,
    validate: bool = True,
) -> torch.Tensor:
    """CAM correspondence loss, Eq. (11).

    Patch distributions are ``softmax(cam / temperature)`` over the C foreground classes of each local
    patch (with ``labels`` given, absent classes' activations are zeroed first, as for normalised CAMs).
    At most ``max_patches`` patches with a valid label are drawn per view (uniformly, without replacement,
    via random scores + top-k on the CAM's device); all unordered pairs ``i < j`` among them are used.
    A view without positive (or negative) pairs contributes only the other term; a view without any
    valid patch contributes 0. No host synchronisation with ``validate=False``.

    Everything after ``global_label`` is keyword-only, in the same order as :class:`CCELoss`'s call.

    Args:
        local_cams: ``[B, V, C, h, w]`` raw CAMs of the local views (with grad), C = num_classes - 1
            foreground classes.
        geometry: ``[B, V, 5]`` view boxes ``(y0, x0, h, w, flipped)`` in global-image pixels.
        global_label: ``[B, Hl, Wl]`` long CAM pseudo-label of the global view, values in ``0..C``
            (0 = background) or ``ignore_index`` (uncertain); any resolution.
        global_hw: ``(H, W)`` of the global image the geometry refers to (default: ``global_label``'s
            size). Required when the label is at another resolution than the image (e.g. the CAM grid).
        labels: optional ``[B, C]`` multi-hot image-level labels.
        generator: optional ``torch.Generator`` (on the CAMs' device) for the patch sampling.
        max_patches: maximum number of patches per view entering the pairs (cost ``O(max_patches^2 C)``).
        ignore_index: label of uncertain pixels.
        temperature: softmax temperature of the patch distributions.
        validate: check values (finite CAMs, 0/1 labels, label values, boxes inside ``global_hw``); this
            reads values back to the host. Shapes are always checked.

    Returns:
        scalar loss (float32): the sum over views of Eq. (11)'s per-view terms, averaged over the batch
        (0 for an empty batch).

    Example:
        >>> cams = torch.zeros(1, 1, 2, 1, 2)
        >>> cams[0, 0, 0, 0, 0] = 50.0  # left patch: class 1, right patch: uniform
        >>> geo = torch.tensor([[[0.0, 0.0, 1.0, 2.0, 0.0]]])
        >>> round(float(cce_loss(cams, geo, torch.tensor([[[1, 0]]]))), 4)  # one negative pair
        0.3113
    """
    if local_cams.dim() != 5:
        raise ValueError(f"local_cams must be [B, V, C, h, w], got {tuple(local_cams.shape)}")
    b, v, c, h, w = local_cams.shape
    if geometry.shape != (b, v, 5):
        raise ValueError(f"geometry must be [B={b}, V={v}, 5], got {tuple(geometry.shape)}")
    if not isinstance(global_label, torch.Tensor) or global_label.dim() != 3 or global_label.shape[0] != b:
        got = (
            shape_str(global_label) if isinstance(global_label, torch.Tensor) else type(global_label).__name__
        )
        raise ValueError(f"global_label must be a [B={b}, H, W] label map, got {got}")
    if global_label.is_floating_point():
        raise ValueError(
            f"global_label must hold integer class indices (0..{c}, {ignore_index}), "
            f"got {global_label.dtype}; pass the pseudo-label map, not scores"
        )
    if labels is not None and labels.shape != (b, c):
        raise ValueError(
            f"labels must be [B={b}, C={c}] multi-hot foreground labels, got {tuple(labels.shape)}"
        )
    if global_hw is not None and (len(global_hw) != 2 or min(int(global_hw[0]), int(global_hw[1])) < 1):
        raise ValueError(f"global_hw must be (H, W) with positive sides, got {global_hw!r}")
    ghw = (global_label.shape[1], global_label.shape[2]) if global_hw is None else global_hw
    if validate:
        check_finite(local_cams, "local_cams")
        if labels is not None:
            check_multi_hot(labels, "labels")
        bad = (global_label != ignore_index) & ((global_label < 0) | (global_label > c))
        if bool(bad.any()):
            raise ValueError(
                f"global_label holds values outside 0..{c} and ignore_index={ignore_index}, e.g. "
                f"{int(global_label[bad][0])}; with C={c} foreground classes, 0 is the background"
            )
        check_view_geometry(geometry, (int(ghw[0]), int(ghw[1])))
    if max_patches < 2:
        raise ValueError(f"max_patches must be >= 2, got {max_patches}")
    if (
        b == 0
    ):  # an empty batch contributes nothing (a zero that keeps the graph, not the NaN of an empty mean)
        return local_cams.float().sum() * 0.0
    n = h * w
    cams = local_cams.float()
    if labels is not None:
        cams = cams * labels.to(cams)[:, None, :, None, None]
    prob = (cams / temperature).softmax(dim=2).flatten(3).transpose(2, 3)  # [B, V, N, C]
    lab = local_view_labels(global_label, geometry, (h, w), ghw, ignore_index).to(cams.device)
    valid = lab != ignore_index
    if max_patches < n:
        scores = torch.rand(b, v, n, device=cams.device, generator=generator)
        scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
        top_scores, idx = scores.topk(max_patches, dim=-1)
        prob = torch.gather(prob, 2, idx.unsqueeze(-1).expand(-1, -1, -1, c))
        lab = torch.gather(lab, 2, idx)
        valid = top_scores >= 0
    m = lab.shape[-1]
    d = pairwise_js(prob) / _LN2  # [B, V, M, M] in [0, 1]
    upper = torch.ones(m, m, dtype=torch.bool, device=cams.device).triu(diagonal=1)
    pair_ok = valid.unsqueeze(-1) & valid.unsqueeze(-2) & upper
    same = lab.unsqueeze(-1) == lab.unsqueeze(-2)
    pos = (pair_ok & same).float()
    neg = (pair_ok & ~same).float()
    pos_term = (pos * (1.0 - d)).sum((-2, -1)) / pos.sum((-2, -1)).clamp_min(1.0)
    neg_term = (neg * d).sum((-2, -1)) / neg.sum((-2, -1)).clamp_min(1.0)
    return (pos_term + neg_term).sum(dim=1).mean()


class CCELoss(nn.Module):
    """Module form of :func:`cce_loss` (Eq. (11)); the call takes the same arguments in the same order.

    Args:
        max_patches: maximum number of patches per view entering the pairs.
        ignore_index: label of uncertain pixels.
        temperature: softmax temperature of the patch distributions.
        validate: check input values (see :func:`cce_loss`).

    Example:
        >>> loss = CCELoss(max_patches=16)
        >>> cams = torch.rand(2, 2, 3, 4, 4, requires_grad=True)
        >>> geo = torch.tensor([[0.0, 0.0, 8.0, 8.0, 0.0]]).repeat(2, 2, 1)
        >>> loss(cams, geo, torch.randint(0, 3, (2, 8, 8))).dim()
        0
    """

    def __init__(
        self, max_patches: int = 256, ignore_index: int = 255, temperature: float = 1.0, validate: bool = True
    ) -> None:
        super().__init__()
        if max_patches < 2:
            raise ValueError(f"max_patches must be >= 2, got {max_patches}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.max_patches = max_patches
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.validate = validate

    if TYPE_CHECKING:

        def __call__(
            self,
            local_cams: torch.Tensor,
            geometry: torch.Tensor,
            global_label: torch.Tensor,
            *,
            global_hw: tuple[int, int] | None = None,
            labels: torch.Tensor | None = None,
            generator: torch.Generator | None = None,
        ) -> torch.Tensor: ...

    def forward(
        self,
        local_cams: torch.Tensor,
        geometry: torch.Tensor,
        global_label: torch.Tensor,
        *,
        global_hw: tuple[int, int] | None = None,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Eq. (11) for a batch of local views (see :func:`cce_loss`).

        Args:
            local_cams: ``[B, V, C, h, w]`` raw CAMs of the local views, C = num_classes - 1.
            geometry: ``[B, V, 5]`` view boxes ``(y0, x0, h, w, flipped)`` in global-image pixels.
            global_label: ``[B, Hl, Wl]`` long pseudo-label of the global view (``ignore_index`` uncertain).
            global_hw: ``(H, W)`` of the global image (default: ``global_label``'s size).
            labels: optional ``[B, C]`` multi-hot labels.
            generator: optional ``torch.Generator`` for the patch sampling.

        Returns:
            Scalar loss.
        """
        return cce_loss(
            local_cams,
            geometry,
            global_label,
            global_hw=global_hw,
            labels=labels,
            generator=generator,
            max_patches=self.max_patches,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        fields = (
            f"max_patches={self.max_patches}",
            f"ignore_index={self.ignore_index}",
            f"temperature={self.temperature}",
        )
        return ", ".join(fields)
