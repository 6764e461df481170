"""Input checks shared by the public blocks (the input contract of docs/contract.rst).

Two kinds of checks:

* *shape* checks read only tensor metadata; every public block runs them always;
* *value* checks (finiteness, value ranges, 0/1 labels) read values back to the host, so a block runs them
  only with ``validate=True`` (the default); training loops pass ``validate=False``.

Every message names the argument, what was expected and, where one exists, the fix. This module imports
torch only.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: How far outside ``[0, 1]`` a normalised map may go (rounding of resampling and of bf16).
UNIT_RANGE_TOL = 1e-3

NORMALIZE_HINT = (
    "normalise raw CAMs per image and class first, e.g. ecaseg.cam.minmax_normalize(cams.relu()) "
    "(or build them with ecaseg.cam.cam_from_features)"
)


def shape_str(x: Tensor) -> str:
    """``(2, 20, 32, 32)``-style shape for messages."""
    return str(tuple(x.shape))


def fg_count_message(num_classes: int, what: str, got: int) -> str:
    """The one wording of the class-count convention in shape errors."""
    return (
        f"num_classes={num_classes} counts the background: expected {num_classes - 1} {what}, got {got} "
        "(foreground tensors hold num_classes - 1 channels; the background is index 0 of K-channel outputs)"
    )


def check_finite(x: Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or infinite values (one host synchronisation)."""
    if x.is_floating_point() or x.is_complex():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(
                f"{name} holds {bad} non-finite value(s) (NaN or inf) out of {x.numel()}; "
                "check the network or data that produced it"
            )


def check_unit_range(
    x: Tensor,
    name: str,
    hint: str = NORMALIZE_HINT,
    tol: float = UNIT_RANGE_TOL,
    labels: Tensor | None = None,
) -> None:
    """Raise ``ValueError`` unless every value of ``x`` is finite and in ``[0, 1]`` (within ``tol``).

    With ``labels`` (``[B, C]`` for ``x`` of ``[B, C, ...]``) the range is checked on the labelled channels
    only (the blocks zero the others); finiteness is checked everywhere.
    """
    check_finite(x, name)
    if x.numel() == 0:
        return
    values = x.detach().float()
    if labels is not None:
        keep = (labels > 0).reshape(*labels.shape, *([1] * (values.dim() - 2)))
        values = torch.where(keep, values, torch.zeros((), device=values.device))
    lo, hi = torch.aminmax(values)
    lo_v, hi_v = float(lo), float(hi)
    if lo_v < -tol or hi_v > 1.0 + tol:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo_v:.4g}, {hi_v:.4g}]; {hint}")


def check_normalized_maps(cams: Tensor, labels: Tensor, name: str = "cams", tol: float = 1e-2) -> None:
    """Raise ``ValueError`` unless every labelled class's map of ``[B, C, ...]`` peaks at 1 (or is all 0).

    Min-max normalisation per image and class (Eq. (1)) puts each map's maximum at 1. A map that peaks
    lower is compared with the background ``1 - max_c M_c`` (Eq. (2)) on unequal terms: ``cams * 0.4`` gives
    every patch to the background, so no foreground seed is left.
    """
    peaks = cams.detach().float().flatten(2).amax(dim=-1)  # [B, C]
    bad = (labels > 0) & (peaks > 0) & (peaks < 1.0 - tol)
    count = int(bad.sum())
    if count:
        b, c = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{name} are not normalised per image and class: {count} labelled map(s) peak below 1, e.g. "
            f"{float(peaks[b, c]):.4g} (image {b}, channel {c}); the background of Eq. (2) is 1 - max_c M_c, "
            f"so such maps lose their seeds to the background; {NORMALIZE_HINT}, after any resizing"
        )


def check_multi_hot(labels: Tensor, name: str = "labels") -> None:
    """Raise ``ValueError`` unless every entry of ``labels`` is 0 or 1."""
    if labels.dtype == torch.bool:
        return
    bad = (labels != 0) & (labels != 1)
    count = int(bad.sum())
    if count:
        example = float(labels[bad].flatten()[0])
        raise ValueError(
            f"{name} must be multi-hot image-level labels (0 or 1 per class), got {count} other value(s), "
            f"e.g. {example:.4g}; pass (scores > threshold).float() for classifier scores"
        )


def check_float_dtype(x: Tensor, name: str, hint: str) -> None:
    """Raise ``TypeError`` unless ``x`` is a floating-point tensor (``hint`` says how to convert)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {got}; {hint}")


def check_number(
    value: object,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float after checking it is a finite real number in the given range.

    ``low``/``high`` are inclusive bounds unless ``low_open``/``high_open``; ``None`` leaves that side open.

    Example:
        >>> check_number(0.3, "w1", 0.0, low_open=True)
        0.3
        >>> check_number(-1, "w2", 0.0)
        Traceback (most recent call last):
        ...
        ValueError: w2 must be a finite number in [0, inf), got -1
    """
    interval = (
        f"{'(' if low_open or low is None else '['}{'-inf' if low is None else f'{low:g}'}, "
        f"{'inf' if high is None else f'{high:g}'}{')' if high_open or high is None else ']'}"
    )
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    v = float(value) if not bad else float("nan")  # type: ignore[arg-type]
    if not bad and v == v and abs(v) != float("inf"):
        too_low = low is not None and (v <= low if low_open else v < low)
        too_high = high is not None and (v >= high if high_open else v > high)
        if not (too_low or too_high):
            return v
    raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")


def class_names_mismatch(
    saved: list[str] | tuple[str, ...], current: list[str] | tuple[str, ...]
) -> str | None:
    """Describe how two class-name lists (background first) differ, order included, or ``None`` if equal.

    Example:
        >>> class_names_mismatch(["background", "cat", "dog"], ["background", "dog", "cat"])
        "index 1 is 'cat' in the checkpoint but 'dog' here; index 2 is 'dog' in the checkpoint but 'cat' here"
    """
    saved, current = list(saved), list(current)
    if [_norm_name(n) for n in saved] == [_norm_name(n) for n in current]:
        return None
    if len(saved) != len(current):
        return (
            f"{len(saved)} classes in the checkpoint ({', '.join(saved)}) but {len(current)} here "
            f"({', '.join(current)})"
        )
    diffs = [
        f"index {i} is {a!r} in the checkpoint but {b!r} here"
        for i, (a, b) in enumerate(zip(saved, current))
        if _norm_name(a) != _norm_name(b)
    ]
    return "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")


def _norm_name(name: str) -> str:
    """Class names compare case-insensitively, ``_`` = space (as the labels files read them)."""
    return " ".join(str(name).strip().lower().replace("_", " ").split())
