"""Class activation maps (Section 3.1 of the ECA paper).

Pure functions over batched tensors plus thin :class:`torch.nn.Module` wrappers:

* :func:`cam_from_features` -- Eq. (1): ReLU of the classifier applied to a feature map, then per-image,
  per-class min-max normalisation to ``[0, 1]``.
* :func:`background_cam` / :func:`with_background` -- Eq. (2): ``M_0 = 1 - max_c M_c``.
* :func:`multiscale_cam` -- multi-scale + flip CAM of a network with ``forward_cam``.
* :func:`cam_to_label` -- CAM to pseudo-label with the hard threshold ``alpha`` or an uncertain band.

Conventions: ``B`` batch, ``C`` foreground classes, ``K = C + 1`` with background at index 0, labels are
float multi-hot ``[B, C]``; classes absent from an image (label 0) get an all-zero CAM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CAM",
    "CAMModel",
    "CAMRule",
    "MultiScaleCAM",
    "background_cam",
    "cam_from_features",
    "cam_probabilities",
    "cam_to_label",
    "crop_box_mask",
    "minmax_normalize",
    "multiscale_cam",
    "with_background",
]


class CAMModel(Protocol):
    """Anything with ``forward_cam(images [B,3,H,W]) -> raw CAM [B,C,h,w]`` (e.g. ``ECANet``).

    ``multiscale_cam(..., rule="afa")`` also calls ``forward_cam(x, relu=False)`` (the response before the
    ReLU), which ``ECANet`` supports.
    """

    def forward_cam(self, x: Tensor) -> Tensor: ...


CAMRule = Literal["sum", "afa"]
"""How :func:`multiscale_cam` merges scales and flips: ecaseg 0.1's ``"sum"`` or AFA's ``"afa"``."""


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Context that disables autocast on ``device`` (so matmuls and reductions really run in float32)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _check_labels(labels: Tensor, batch: int, num_fg: int, name: str = "labels") -> None:
    if labels.dim() != 2 or labels.shape[0] != batch or labels.shape[1] != num_fg:
        raise ValueError(
            f"{name} must be multi-hot foreground labels [B, C] = [{batch}, {num_fg}] matching the CAMs' "
            f"C = num_classes - 1 = {num_fg} channels, got {tuple(labels.shape)}"
        )


def _label_mask(labels: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
    """``[B, C]`` multi-hot -> ``[B, C, 1, ...]`` 0/1 mask broadcastable to an ``ndim``-dimensional map."""
    mask = (labels > 0).to(dtype)
    return mask.reshape(*mask.shape, *([1] * (ndim - 2)))


def minmax_normalize(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Min-max normalise each map of ``x`` to ``[0, 1]`` (per image and per class).

    The minimum and maximum are taken over all dimensions after the first two. A constant map (including an
    all-zero map, e.g. an absent class) becomes all zero: the range is clamped at ``eps`` from below.

    Args:
        x: Tensor ``[B, C, ...]`` (e.g. ``[B, C, h, w]`` or ``[B, C, N]``).
        eps: Smallest range used as divisor.

    Returns:
        Tensor of the same shape and dtype with values in ``[0, 1]`` (float32 for integer or bool input:
        normalised values are fractions).

    Example:
        >>> minmax_normalize(torch.tensor([[[1.0, 3.0, 2.0]]]))
        tensor([[[0.0000, 1.0000, 0.5000]]])
    """
    if x.dim() < 3:
        raise ValueError(f"minmax_normalize expects [B, C, ...] with spatial dims, got {tuple(x.shape)}")
    flat = x.float().flatten(2)
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    out = (flat - lo) / (hi - lo).clamp_min(eps)
    return out.reshape(x.shape).to(x.dtype if x.is_floating_point() else torch.float32)


def cam_from_features(features: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """CAM from a feature map and classifier weights, Eq. (1), then min-max normalisation.

    ``M_c = ReLU(sum_i W_{i,c} F_i)``, rescaled per image and class to ``[0, 1]``.

    Args:
        features: Feature map ``[B, D, h, w]``.
        weight: Classifier weights ``[C, D]`` or ``[C, D, 1, 1]`` (a bias-free 1x1 convolution).
        eps: Passed to :func:`minmax_normalize`.

    Returns:
        Normalised CAM ``[B, C, h, w]`` (float32) in ``[0, 1]``.

    Example:
        >>> cam_from_features(torch.ones(1, 2, 1, 2), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).shape
        torch.Size([1, 2, 1, 2])
    """
    if features.dim() != 4:
        raise ValueError(f"features must be [B, D, h, w], got {tuple(features.shape)}")
    if weight.dim() == 4:
        if weight.shape[2:] != (1, 1):
            raise ValueError(f"weight must be [C, D] or [C, D, 1, 1], got {tuple(weight.shape)}")
        weight = weight.flatten(1)
    if weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"weight must be [C, D] with D = {features.shape[1]} (feature channels), "
            f"got {tuple(weight.shape)}"
        )
    with _no_autocast(features.device):
        raw = torch.einsum("bdhw,cd->bchw", features.float(), weight.float()).relu()
    return minmax_normalize(raw, eps)


def background_cam(cams: Tensor) -> Tensor:
    """Background CAM, Eq. (2): ``M_0(i) = 1 - max_{1<=c<=C} M_c(i)``.

    Args:
        cams: Normalised foreground CAMs ``[B, C, ...]`` in ``[0, 1]`` (absent classes zero).

    Returns:
        Background map ``[B, 1, ...]``.

    Example:
        >>> background_cam(torch.tensor([[[0.2, 0.9], [0.5, 0.1]]]))
        tensor([[[0.5000, 0.1000]]])
    """
    if cams.dim() < 3 or cams.shape[1] == 0:
        raise ValueError(f"cams must be [B, C, ...] with C >= 1, got {tuple(cams.shape)}")
    return 1.0 - cams.amax(dim=1, keepdim=True)


def with_background(cams: Tensor) -> Tensor:
    """Prepend the background CAM of Eq. (2) to foreground CAMs.

    Args:
        cams: Normalised foreground CAMs ``[B, C, ...]``.

    Returns:
        ``[B, C + 1, ...]`` with the background at index 0.

    Example:
        >>> with_background(torch.tensor([[[0.25], [0.5]]])).flatten().tolist()
        [0.5, 0.25, 0.5]
    """
    return torch.cat([background_cam(cams), cams], dim=1)


def _scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def multiscale_cam(
    model: CAMModel,
    images: Tensor,
    labels: Tensor,
    scales: Sequence[float] = (1.0, 0.5, 1.5),
    flip: bool = True,
    out_size: tuple[int, int] | None = None,
    eps: float = 1e-5,
    rule: CAMRule = "sum",
    raw_at_one: Tensor | None = None,
) -> Tensor:
    """Multi-scale (and horizontally flipped) CAM of a network, normalised to ``[0, 1]``.

    ``rule="afa"`` is AFA's released ``multi_scale_cam``: each scale's input is ``int(s * H) x int(s * W)``;
    the response *before* the ReLU (``forward_cam(x, relu=False)``) of the image and of its flip is
    resized bilinearly to ``out_size`` (default: the image size ``H x W``), the two are merged by their
    element-wise maximum, then the ReLU is applied; the scales are summed and each map is min-max
    normalised as ``(x - min) / (max - min + eps)``. Absent classes are zeroed. The rest of this docstring
    describes ``rule="sum"`` (ecaseg 0.1, the default of this function).

    For every scale ``s`` the images are resized bilinearly to ``round(s * H) x round(s * W)``; with
    ``flip=True`` the flipped copies go through the network in the same batch. Each raw CAM
    (``model.forward_cam``, i.e. ReLU of the classifier, Eq. (1) before normalisation) is flipped back,
    resized bilinearly to ``out_size`` and all are summed; the sum is then min-max normalised per image and
    class with :func:`minmax_normalize` (the paper's normalisation; AFA's ``x + maxpool(-x)``, then a
    division by the maximum, is a min-max too, with ``eps`` added to the range instead of clamping it) and
    absent classes are zeroed.

    Runs under :func:`torch.no_grad` (pseudo-labels carry no gradient); the model's train/eval mode is left
    as it is.

    Args:
        model: Object with ``forward_cam(x [B,3,h,w]) -> raw CAM [B,C,h',w']``.
        images: Normalised images ``[B, 3, H, W]``.
        labels: Multi-hot image labels ``[B, C]``.
        scales: Input scales; the default is AFA's training setting.
        flip: Also use horizontally flipped inputs.
        out_size: Output ``(h, w)``; ``None`` uses the CAM size at scale 1.0 (or at the first scale if
            1.0 is not among ``scales``).
        eps: Passed to :func:`minmax_normalize`.
        raw_at_one: ``model.forward_cam(images)`` (``relu=False`` under ``rule="afa"``) when the caller
            already has it, e.g. from the training forward: the scale-1.0 pass then runs the flipped images
            only. It must be what the model computes for ``images`` in its current mode; with stochastic
            layers (drop-path, dropout) or batch statistics active it is another sample of it (the
            trainer's ``method.reuse_train_cam`` decides when to pass it). Needs 1.0 among ``scales``.

    Returns:
        Normalised CAM ``[B, C, h, w]`` (float32).

    Example:
        >>> class Net:
        ...     def forward_cam(self, x):
        ...         return torch.relu(x[:, :2, ::4, ::4])
        >>> multiscale_cam(Net(), torch.randn(1, 3, 16, 16), torch.tensor([[1.0, 0.0]])).shape
        torch.Size([1, 2, 4, 4])
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if len(scales) == 0:
        raise ValueError("multiscale_cam needs at least one scale")
    if any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive, got {tuple(scales)}")
    if raw_at_one is not None:
        if 1.0 not in scales:
            raise ValueError(f"raw_at_one is the scale-1.0 CAM but 1.0 is not among scales {tuple(scales)}")
        if raw_at_one.dim() != 4 or raw_at_one.shape[0] != images.shape[0]:
            raise ValueError(
                f"raw_at_one must be the [B, C, h, w] CAM of the {images.shape[0]} images, "
                f"got {tuple(raw_at_one.shape)}"
            )
    forward = _Reusing(model, images, raw_at_one, flip)
    if rule == "afa":
        return _multiscale_cam_afa(forward, images, labels, scales, flip, out_size, eps)
    if rule != "sum":
        raise ValueError(f"rule must be 'sum' or 'afa', got {rule!r}")
    batch = images.shape[0]
    hw = (images.shape[-2], images.shape[-1])
    order = sorted(range(len(scales)), key=lambda i: scales[i] != 1.0)  # scale 1.0 first: it sets out_size
    total: Tensor | None = None
    with torch.no_grad():
        for i in order:
            size = _scaled_size(hw, scales[i])
            x = (
                images
                if size == hw
                else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            )
            if flip:
                x = torch.cat([x, x.flip(-1)], dim=0)
            raw = forward(x, scales[i] == 1.0).float()
            if raw.dim() != 4 or raw.shape[0] != x.shape[0]:
                raise ValueError(f"model.forward_cam must return [B, C, h, w], got {tuple(raw.shape)}")
            if flip:
                raw = raw[:batch] + raw[batch:].flip(-1)
            if out_size is None:
                out_size = (raw.shape[-2], raw.shape[-1])
            if (raw.shape[-2], raw.shape[-1]) != tuple(out_size):
                raw = F.interpolate(raw, size=out_size, mode="bilinear", align_corners=False)
            total = raw if total is None else total + raw
        assert total is not None
        _check_labels(labels, batch, total.shape[1])
        cams = minmax_normalize(total.relu(), eps)
        return cams * _label_mask(labels, 4, cams.dtype)


class _Reusing:
    """``model.forward_cam`` for :func:`multiscale_cam`; ``raw_at_one`` serves the unflipped scale 1.0."""

    def __init__(self, model: CAMModel, images: Tensor, raw_at_one: Tensor | None, flip: bool) -> None:
        self.model, self.images, self.raw, self.flip = model, images, raw_at_one, flip

    def __call__(self, x: Tensor, at_one: bool, **kwargs: Any) -> Tensor:
        forward: Any = self.model.forward_cam
        if self.raw is None or not at_one:
            return forward(x, **kwargs)
        if not self.flip:
            return self.raw
        flipped = forward(x[self.images.shape[0] :], **kwargs)
        return torch.cat([self.raw.to(flipped.dtype), flipped], dim=0)


def _multiscale_cam_afa(
    model: _Reusing,
    images: Tensor,
    labels: Tensor,
    scales: Sequence[float],
    flip: bool,
    out_size: tuple[int, int] | None,
    eps: float,
) -> Tensor:
    """``multiscale_cam(rule="afa")``: resize, flip maximum, ReLU, sum over scales, min-max."""
    batch = images.shape[0]
    height, width = images.shape[-2:]
    size = (height, width) if out_size is None else (int(out_size[0]), int(out_size[1]))
    total: Tensor | None = None
    with torch.no_grad():
        for s in sorted(scales, key=lambda v: v != 1.0):
            x = images
            if s != 1.0:
                x = F.interpolate(
                    images,
                    size=(max(1, int(s * height)), max(1, int(s * width))),
                    mode="bilinear",
                    align_corners=False,
                )
            if flip:
                x = torch.cat([x, x.flip(-1)], dim=0)
            try:
                raw = model(x, s == 1.0, relu=False).float()
            except TypeError as err:
                raise TypeError(
                    "multiscale_cam(rule='afa') needs forward_cam(x, relu=False) (the response before the "
                    f"ReLU); {type(model.model).__name__}.forward_cam does not take relu ({err})"
                ) from None
            raw = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
            if flip:
                raw = torch.maximum(raw[:batch], raw[batch:].flip(-1))
            raw = raw.relu()
            total = raw if total is None else total + raw
        assert total is not None
        _check_labels(labels, batch, total.shape[1])
        flat = total.flatten(2)
        lo = flat.amin(dim=-1, keepdim=True)
        hi = (flat - lo).amax(dim=-1, keepdim=True)
        cams = ((flat - lo) / (hi + eps)).view_as(total)
        return cams * _label_mask(labels, 4, cams.dtype)


def crop_box_mask(crop_box: Tensor, size: tuple[int, int]) -> Tensor:
    """Boolean mask ``[B, H, W]`` that is True inside each image's box.

    Args:
        crop_box: ``[B, 4]`` integer boxes ``(y0, y1, x0, x1)``, half-open, in the pixel grid of ``size``.
        size: ``(H, W)`` of the mask.

    Returns:
        BoolTensor ``[B, H, W]``.

    Example:
        >>> crop_box_mask(torch.tensor([[0, 1, 1, 3]]), (2, 3)).int()
        tensor([[[0, 1, 1],
                 [0, 0, 0]]], dtype=torch.int32)
    """
    if crop_box.dim() != 2 or crop_box.shape[1] != 4:
        raise ValueError(f"crop_box must be [B, 4] = (y0, y1, x0, x1), got {tuple(crop_box.shape)}")
    box = crop_box.to(torch.long)
    rows = torch.arange(size[0], device=box.device).view(1, -1, 1)
    cols = torch.arange(size[1], device=box.device).view(1, 1, -1)
    y0, y1, x0, x1 = (box[:, i].view(-1, 1, 1) for i in range(4))
    return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def cam_to_label(
    cams: Tensor,
    labels: Tensor,
    alpha: float = 0.5,
    band: tuple[float, float] | None = None,
    crop_box: Tensor | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """Pseudo-label from normalised foreground CAMs (no refinement).

    Each pixel takes the labelled class with the highest score, ``argmax + 1``. Then, with the hard
    threshold (``band=None``, ECA's setting), a pixel whose best score is ``<= alpha`` is background (0).
    With ``band=(low, high)`` (AFA's uncertain band, 0.35 / 0.55): best score ``<= low`` -> background,
    ``low < score <= high`` -> ``ignore_index``, above ``high`` -> the class. Pixels outside ``crop_box``
    are ``ignore_index``. Absent classes (label 0) never win.

    Args:
        cams: Normalised CAMs ``[B, C, H, W]`` in ``[0, 1]``.
        labels: Multi-hot image labels ``[B, C]``.
        alpha: Hard background threshold (used when ``band`` is None).
        band: Optional ``(low, high)`` uncertain band, ``low <= high``.
        crop_box: Optional ``[B, 4]`` boxes ``(y0, y1, x0, x1)`` (half-open) in the CAMs' pixel grid.
        ignore_index: Label of ignored pixels.

    Returns:
        LongTensor ``[B, H, W]`` with values in ``{0..C, ignore_index}``.

    Example:
        >>> cams = torch.tensor([[[[0.9, 0.4]], [[0.2, 0.6]]]])
        >>> cam_to_label(cams, torch.tensor([[1.0, 0.0]])).tolist()
        [[[1, 0]]]
    """
    if cams.dim() != 4:
        raise ValueError(f"cams must be [B, C, H, W], got {tuple(cams.shape)}")
    _check_labels(labels, cams.shape[0], cams.shape[1])
    if band is not None and band[0] > band[1]:
        raise ValueError(f"band must be (low, high) with low <= high, got {band}")
    scores = cams.float() * _label_mask(labels, 4, torch.float32)
    scores = scores.masked_fill(_label_mask(labels, 4, torch.float32) == 0, -1.0)
    best, idx = scores.max(dim=1)
    label = idx + 1
    if band is None:
        label = torch.where(best <= alpha, torch.zeros_like(label), label)
    else:
        label = torch.where(best <= band[1], torch.full_like(label, ignore_index), label)
        label = torch.where(best <= band[0], torch.zeros_like(label), label)
    if crop_box is not None:
        inside = crop_box_mask(crop_box.to(cams.device), (cams.shape[-2], cams.shape[-1]))
        label = torch.where(inside, label, torch.full_like(label, ignore_index))
    return label


def cam_probabilities(cams: Tensor, labels: Tensor, bg_score: float = 0.5, eps: float = 1e-5) -> Tensor:
    """Class probabilities ``[B, C + 1, H, W]`` from normalised foreground CAMs and a background threshold.

    What a dense CRF (:mod:`ecaseg.crf`) or a random walk needs from a thresholded CAM: the scores
    ``[bg_score, CAM_1 .. CAM_C]`` with unlabelled classes set to 0, divided by their sum at each pixel.
    The argmax equals :func:`cam_to_label`'s with ``alpha = bg_score`` (up to ties), and a pixel's
    background probability grows as its best CAM score falls below the threshold.

    Args:
        cams: ``[B, C, H, W]`` normalised foreground CAMs in ``[0, 1]``.
        labels: ``[B, C]`` multi-hot image labels.
        bg_score: The constant background score (the CAM threshold), in ``(0, 1]``.
        eps: Floor of the per-pixel sum.

    Returns:
        float32 ``[B, C + 1, H, W]``, background first, summing to 1 over classes.

    Example:
        >>> p = cam_probabilities(torch.tensor([[[[1.0, 0.0]], [[0.5, 0.5]]]]), torch.tensor([[1.0, 0.0]]))
        >>> p[0, :, 0].mul(1000).round().tolist()  # background, class 1, class 2 (absent) at two pixels
        [[333.0, 1000.0], [667.0, 0.0], [0.0, 0.0]]
    """
    if cams.dim() != 4:
        raise ValueError(f"cams must be [B, C, H, W], got {tuple(cams.shape)}")
    _check_labels(labels, cams.shape[0], cams.shape[1])
    if not 0.0 < bg_score <= 1.0:
        raise ValueError(f"bg_score must be in (0, 1], got {bg_score}")
    fg = cams.float().clamp_min(0.0) * _label_mask(labels, 4, torch.float32)
    scores = torch.cat([torch.full_like(fg[:, :1], float(bg_score)), fg], dim=1)
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(eps)


class CAM(nn.Module):
    """Module form of :func:`cam_from_features` (Eq. (1)), optionally zeroing absent classes.

    Example:
        >>> CAM()(torch.randn(2, 8, 4, 4), torch.randn(3, 8)).shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    if TYPE_CHECKING:

        def __call__(self, features: Tensor, weight: Tensor, labels: Tensor | None = None) -> Tensor: ...

    def forward(self, features: Tensor, weight: Tensor, labels: Tensor | None = None) -> Tensor:
        """Normalised CAM of Eq. (1).

        Args:
            features: ``[B, D, h, w]`` feature map.
            weight: ``[C, D]`` or ``[C, D, 1, 1]`` classifier weights, C = num_classes - 1 foreground classes.
            labels: Optional ``[B, C]`` multi-hot labels; classes with label 0 are zeroed.

        Returns:
            ``[B, C, h, w]`` float32 in ``[0, 1]`` (foreground only; the background is Eq. (2),
            :func:`background_cam`).
        """
        cams = cam_from_features(features, weight, self.eps)
        if labels is not None:
            _check_labels(labels, cams.shape[0], cams.shape[1])
            cams = cams * _label_mask(labels, 4, cams.dtype)
        return cams


class MultiScaleCAM(nn.Module):
    """Module form of :func:`multiscale_cam` holding the scales and the flip switch.

    Example:
        >>> class Net:
        ...     def forward_cam(self, x):
        ...         return torch.relu(x[:, :2, ::4, ::4])
        >>> MultiScaleCAM(scales=(1.0,))(Net(), torch.randn(1, 3, 8, 8), torch.ones(1, 2)).shape
        torch.Size([1, 2, 2, 2])
    """

    def __init__(
        self,
        scales: Sequence[float] = (1.0, 0.5, 1.5),
        flip: bool = True,
        out_size: tuple[int, int] | None = None,
        rule: CAMRule = "sum",
    ) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        self.flip = flip
        self.out_size = out_size
        self.rule: CAMRule = rule

    if TYPE_CHECKING:

        def __call__(self, model: CAMModel, images: Tensor, labels: Tensor) -> Tensor: ...

    def forward(self, model: CAMModel, images: Tensor, labels: Tensor) -> Tensor:
        """Multi-scale, flipped CAM of ``model`` (see :func:`multiscale_cam`).

        Args:
            model: Object with ``forward_cam(x [B, 3, h, w]) -> raw CAM [B, C, h', w']``.
            images: ``[B, 3, H, W]`` normalised images.
            labels: ``[B, C]`` multi-hot labels, C = num_classes - 1.

        Returns:
            ``[B, C, h, w]`` float32 normalised CAM in ``[0, 1]``.
        """
        return multiscale_cam(model, images, labels, self.scales, self.flip, self.out_size, rule=self.rule)

    def extra_repr(self) -> str:
        return f"scales={self.scales}, flip={self.flip}, out_size={self.out_size}, rule={self.rule!r}"
