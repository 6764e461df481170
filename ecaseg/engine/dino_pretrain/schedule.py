"""Per-iteration schedules of DINO pretraining (learning rate, weight decay, teacher momentum).

Layout: engine layer; imports numpy only.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["cosine_schedule"]


def cosine_schedule(
    base: float, final: float, total_iters: int, warmup_iters: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Per-iteration values: linear warm-up ``warmup_start -> base``, then a half cosine ``base -> final``.

    Args:
        base: Value at the end of the warm-up.
        final: Value at the last iteration.
        total_iters: Length of the schedule.
        warmup_iters: Warm-up length (clipped to ``total_iters``).
        warmup_start: Value at iteration 0 when there is a warm-up.

    Returns:
        float64 array of ``total_iters`` values.

    Example:
        >>> cosine_schedule(1.0, 0.0, 5, warmup_iters=2).round(4).tolist()
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    warm = min(max(warmup_iters, 0), total_iters)
    ramp = np.linspace(warmup_start, base, warm, endpoint=False) if warm else np.zeros(0)
    rest = total_iters - warm
    if rest == 1:
        decay = np.array([base], dtype=np.float64)
    else:
        steps = np.arange(rest, dtype=np.float64) / max(rest - 1, 1)
        decay = final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * steps))
    return np.concatenate((ramp, decay)).astype(np.float64)
