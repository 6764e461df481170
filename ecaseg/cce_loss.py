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

import torch
from torch import nn

from ecaseg.data import view_sampling_grid

__all__ = ["CCELoss", "cce_loss", "js_divergence", "local_view_labels", "pairwise_js"]

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


def cce_loss(
    local_cams: torch.Tensor,
    geometry: torch.Tensor,
    global_label: torch.Tensor,
    global_hw: tuple[int, int] | None = None,
    labels: torch.Tensor | None = None,
    max_patches: int = 256,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
    temperature: float = 1.0,
) -> torch.Tensor:
    """CAM correspondence loss, Eq. (11).

    Patch distributions are ``softmax(cam / temperature)`` over the C foreground classes of each local
    patch (with ``labels`` given, absent classes' activations are zeroed first, as for normalised CAMs).
    At most ``max_patches`` patches with a valid label are drawn per view (uniformly, without replacement,
    via random scores + top-k on the CAM's device); all unordered pairs ``i < j`` among them are used.
    A view without positive (or negative) pairs contributes only the other term; a view without any
    valid patch contributes 0. No host synchronisation.

    Args:
        local_cams: ``[B, V, C, h, w]`` raw CAMs of the local views (with grad).
        geometry: ``[B, V, 5]`` view boxes ``(y0, x0, h, w, flipped)`` in global-image pixels.
        global_label: ``[B, Hl, Wl]`` long CAM pseudo-label of the global view (``ignore_index`` =
            uncertain).
        global_hw: ``(H, W)`` of the global image (default: ``global_label``'s size).
        labels: optional ``[B, C]`` image-level labels.
        max_patches: maximum number of patches per view entering the pairs (cost ``O(max_patches^2 C)``).
        generator: optional ``torch.Generator`` (on the CAMs' device) for the patch sampling.
        ignore_index: label of uncertain pixels.
        temperature: softmax temperature of the patch distributions.

    Returns:
        scalar loss (float32): the sum over views of Eq. (11)'s per-view terms, averaged over the batch.

    Example:
        >>> cams = torch.zeros(1, 1, 2, 1, 2)
        >>> cams[0, 0, 0, 0, 0] = 50.0  # left patch: class 0, right patch: uniform
        >>> geo = torch.tensor([[[0.0, 0.0, 1.0, 2.0, 0.0]]])
        >>> round(float(cce_loss(cams, geo, torch.tensor([[[1, 0]]]))), 4)  # one negative pair
        0.3113
    """
    if local_cams.dim() != 5:
        raise ValueError(f"local_cams must be [B, V, C, h, w], got {tuple(local_cams.shape)}")
    b, v, c, h, w = local_cams.shape
    if geometry.shape != (b, v, 5):
        raise ValueError(f"geometry must be [B={b}, V={v}, 5], got {tuple(geometry.shape)}")
    if labels is not None and labels.shape != (b, c):
        raise ValueError(f"labels must be [B={b}, C={c}], got {tuple(labels.shape)}")
    if max_patches < 2:
        raise ValueError(f"max_patches must be >= 2, got {max_patches}")
    n = h * w
    cams = local_cams.float()
    if labels is not None:
        cams = cams * labels.to(cams)[:, None, :, None, None]
    prob = (cams / temperature).softmax(dim=2).flatten(3).transpose(2, 3)  # [B, V, N, C]
    lab = local_view_labels(global_label, geometry, (h, w), global_hw, ignore_index).to(cams.device)
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
    """Module wrapper of :func:`cce_loss` (Eq. (11)).

    Args:
        max_patches: maximum number of patches per view entering the pairs.
        ignore_index: label of uncertain pixels.
        temperature: softmax temperature of the patch distributions.

    Example:
        >>> loss = CCELoss(max_patches=16)
        >>> cams = torch.rand(2, 2, 3, 4, 4, requires_grad=True)
        >>> geo = torch.tensor([[0.0, 0.0, 8.0, 8.0, 0.0]]).repeat(2, 2, 1)
        >>> loss(cams, geo, torch.randint(0, 3, (2, 8, 8))).dim()
        0
    """

    def __init__(self, max_patches: int = 256, ignore_index: int = 255, temperature: float = 1.0) -> None:
        super().__init__()
        self.max_patches = max_patches
        self.ignore_index = ignore_index
        self.temperature = temperature

    def forward(
        self,
        local_cams: torch.Tensor,
        geometry: torch.Tensor,
        global_label: torch.Tensor,
        labels: torch.Tensor | None = None,
        global_hw: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """See :func:`cce_loss`."""
        return cce_loss(
            local_cams,
            geometry,
            global_label,
            global_hw=global_hw,
            labels=labels,
            max_patches=self.max_patches,
            generator=generator,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
        )

    def extra_repr(self) -> str:
        fields = (
            f"max_patches={self.max_patches}",
            f"ignore_index={self.ignore_index}",
            f"temperature={self.temperature}",
        )
        return ", ".join(fields)
