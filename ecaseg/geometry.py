"""Geometry of CCE local views (imports torch only).

A local view's *geometry* ``(y0, x0, h, w, flipped)`` is its box in global-image pixel coordinates (pixel
``i`` spans ``[i, i + 1)``). :func:`view_sampling_grid` maps the cells of a grid laid over a view back into
the global image; :mod:`ecaseg.data.views` samples the views, :mod:`ecaseg.cce_loss` uses the mapping.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["view_sampling_grid"]


def view_sampling_grid(geometry: Tensor, out_hw: tuple[int, int], global_hw: tuple[int, int]) -> Tensor:
    """Global sampling coordinates of the cell centres of an ``out_hw`` grid over each local view.

    Cell ``(i, j)`` of an ``h x w`` grid over a view with box ``(y0, x0, bh, bw, f)`` has its centre at the
    fractions ``fy = (i + 0.5) / h``, ``fx = (j + 0.5) / w`` of the view; in the global image that is
    ``y = y0 + bh * fy`` and ``x = x0 + bw * fx`` (or ``x0 + bw * (1 - fx)`` when flipped), which are mapped
    to ``grid_sample``'s ``[-1, 1]`` range with ``align_corners=False``: ``X = 2x / W - 1``,
    ``Y = 2y / H - 1``.

    Args:
        geometry: ``[B, V, 5]`` view boxes ``(y0, x0, h, w, flipped)`` in global pixels.
        out_hw: ``(h, w)`` of the grid over the view (e.g. the view's CAM grid, or its pixel size).
        global_hw: ``(H, W)`` of the global image the geometry refers to.

    Returns:
        ``[B, V, h, w, 2]`` normalised ``(x, y)`` (geometry's device, float32 or float64), for
        ``F.grid_sample(global_map, grid.flatten(1, 2))`` style sampling, e.g. of the global pseudo-label with
        ``mode="nearest"``.

    Example:
        >>> geo = torch.tensor([[[0.0, 0.0, 2.0, 2.0, 1.0]]])  # the left 2x2 box of a 2x4 image, flipped
        >>> view_sampling_grid(geo, (1, 2), (2, 4))[0, 0, 0].tolist()
        [[-0.25, 0.0], [-0.75, 0.0]]
    """
    if geometry.ndim != 3 or geometry.shape[-1] != 5:
        raise ValueError(f"geometry must have shape [B, V, 5], got {tuple(geometry.shape)}")
    h, w = int(out_hw[0]), int(out_hw[1])
    big_h, big_w = int(global_hw[0]), int(global_hw[1])
    if min(h, w, big_h, big_w) < 1:
        raise ValueError(f"out_hw {out_hw} and global_hw {global_hw} must be positive")
    geo = geometry if geometry.dtype == torch.float64 else geometry.float()
    y0, x0, bh, bw, flipped = geo.unbind(-1)  # each [B, V]
    fy = (torch.arange(h, device=geo.device, dtype=geo.dtype) + 0.5) / h
    fx = (torch.arange(w, device=geo.device, dtype=geo.dtype) + 0.5) / w
    fx = fx + flipped[..., None] * (1.0 - 2.0 * fx)  # [B, V, w]: fx, or 1 - fx when flipped
    gx = 2.0 * (x0[..., None] + bw[..., None] * fx) / big_w - 1.0  # [B, V, w]
    gy = 2.0 * (y0[..., None] + bh[..., None] * fy) / big_h - 1.0  # [B, V, h]
    batch, views = geo.shape[:2]
    return torch.stack(
        (gx[:, :, None, :].expand(batch, views, h, w), gy[:, :, :, None].expand(batch, views, h, w)), dim=-1
    )
