"""Local views for CAM Correspondence Enhancement (CCE, paper Sec. 3.3) and their geometry.

A local view is a random square box of the (already augmented) global training image, resampled to
``size x size``, possibly flipped horizontally and colour-jittered. Its *geometry* ``(y0, x0, h, w,
flipped)`` is the box in global-image pixel coordinates (pixel ``i`` spans ``[i, i + 1)``), so that any map
computed on the local view (a CAM on its patch grid) can be related to the global view:
:func:`view_sampling_grid` gives, for every cell of a grid laid over the view, where its centre lies in the
global image, in the normalised coordinates of ``F.grid_sample`` (``align_corners=False``). Everything is
batched tensor code on the images' device; no value is read back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecaseg.data.classes import IMAGENET_MEAN, IMAGENET_STD
from ecaseg.data.transforms import denormalize, normalize
from ecaseg.geometry import view_sampling_grid

__all__ = ["LocalViewSampler", "LocalViews", "adjust_hue", "view_sampling_grid"]


@dataclass
class LocalViews:
    """Local views of a batch of global images.

    Attributes:
        images: ``[B, V, 3, s, s]`` normalised view images.
        geometry: ``[B, V, 5]`` float32 ``(y0, x0, h, w, flipped)`` of each view's box in global-image pixels;
            ``flipped`` is 0. or 1. (the view is the box mirrored left-right).
    """

    images: Tensor
    geometry: Tensor

    @property
    def num_views(self) -> int:
        """V."""
        return int(self.images.shape[1])


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB images in [0, 1] by ``shift`` (fraction of a turn), batched.

    Args:
        x: ``[..., 3, H, W]`` RGB in [0, 1].
        shift: tensor broadcastable to ``[..., 1, H, W]`` (e.g. ``[..., 1, 1, 1]`` per image).

    Returns:
        Tensor like ``x``.

    Example:
        >>> red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
        >>> adjust_hue(red, torch.tensor(1 / 3)).flatten().tolist()  # red -> green
        [0.0, 1.0, 0.0]
    """
    maxc, _ = x.max(dim=-3, keepdim=True)
    minc, _ = x.min(dim=-3, keepdim=True)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x.split(1, dim=-3)
    hue = torch.where(
        maxc == r, (g - b) / safe, torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    )
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    hue = torch.remainder(hue + shift, 1.0)
    sat = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    # HSV -> RGB: channel n of (R, G, B) = v - v * s * clamp(min(k, 4 - k), 0, 1),
    # with k = (n + 6h) mod 6 and n = 5, 3, 1.
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(3, 1, 1)  # 5, 3, 1
    k = torch.remainder(offsets + 6.0 * hue, 6.0)
    return maxc - maxc * sat * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


class LocalViewSampler(nn.Module):
    """Random local views of the global training images for CCE (paper Sec. 3.3 and 4.1: 256 x 256 crops,
    random colour distortion and horizontal flip).

    For each image and view: a square box of side ``round(size * u)``, ``u ~ U(scale)`` (clipped to the image
    or to ``valid_box``), at a uniformly random integer position inside the image (inside ``valid_box`` when
    it is large enough); resampled to ``size x size`` with bilinear ``grid_sample`` (exact copy of the pixels
    when the box side equals ``size``); flipped with probability ``hflip_p``; with probability ``jitter_p``
    colour-jittered like torchvision's ``ColorJitter`` but with per-view factors and a fixed order
    (brightness, contrast, saturation, hue): brightness/contrast/saturation factors ``~ U(1 - a, 1 + a)``,
    hue shift ``~ U(-hue, hue)``. Jitter is computed in float32 on de-normalised images, then re-normalised.

    Args:
        num_views: V, views per image.
        size: s, output side in pixels.
        scale: range of the box side relative to ``size``.
        hflip_p: flip probability.
        brightness: brightness strength.
        contrast: contrast strength.
        saturation: saturation strength.
        hue: hue strength (at most 0.5).
        jitter_p: probability that a view is colour-jittered.
        mean: normalisation mean of the input images.
        std: normalisation std of the input images.

    Returns (of ``sampler(images [B, 3, H, W], generator=None, valid_box=None)``):
        :class:`LocalViews`. ``generator`` must live on the images' device; ``valid_box`` ``[B, 4]``
        ``(y0, y1, x0, x1)`` is e.g. the ``crop_box`` of :class:`~ecaseg.data.TrainTransform` (pass it on
        the images' device: a host tensor is copied, which synchronises).

    Example:
        >>> sampler = LocalViewSampler(num_views=2, size=4)
        >>> views = sampler(torch.randn(3, 3, 8, 8))
        >>> views.images.shape, views.geometry.shape
        (torch.Size([3, 2, 3, 4, 4]), torch.Size([3, 2, 5]))
    """

    def __init__(
        self,
        num_views: int = 2,
        size: int = 256,
        scale: tuple[float, float] = (1.0, 1.0),
        hflip_p: float = 0.5,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        jitter_p: float = 0.8,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if num_views < 1 or size < 1:
            raise ValueError(f"num_views and size must be positive, got {num_views} and {size}")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5:
            raise ValueError("jitter strengths must be >= 0 and hue <= 0.5")
        if not (0.0 <= hflip_p <= 1.0 and 0.0 <= jitter_p <= 1.0):
            raise ValueError("hflip_p and jitter_p must be probabilities")
        self.num_views = int(num_views)
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.hflip_p = float(hflip_p)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)
        self.hue = float(hue)
        self.jitter_p = float(jitter_p)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def extra_repr(self) -> str:
        return (
            f"num_views={self.num_views}, size={self.size}, scale={self.scale}, hflip_p={self.hflip_p}, "
            f"jitter=({self.brightness}, {self.contrast}, {self.saturation}, {self.hue}) p={self.jitter_p}"
        )

    def _boxes(
        self,
        batch: int,
        big_h: int,
        big_w: int,
        device: torch.device,
        gen: torch.Generator | None,
        valid_box: Tensor | None,
    ) -> Tensor:
        v = self.num_views
        lo, hi = self.scale
        u = lo + (hi - lo) * torch.rand(batch, v, device=device, generator=gen)
        side = torch.round(self.size * u).clamp_min(1.0)
        bh, bw = side.clamp_max(float(big_h)), side.clamp_max(float(big_w))
        if valid_box is None:
            zero = torch.zeros(batch, 1, device=device)
            vb = torch.cat((zero, zero + big_h, zero, zero + big_w), dim=1)
        else:
            if valid_box.shape != (batch, 4):
                raise ValueError(f"valid_box must have shape [B, 4], got {tuple(valid_box.shape)}")
            vb = valid_box.to(device=device, dtype=torch.float32)
        starts = []
        for extent, length, start, stop in (
            (bh, big_h, vb[:, 0:1], vb[:, 1:2]),
            (bw, big_w, vb[:, 2:3], vb[:, 3:4]),
        ):
            last = float(length) - extent  # largest start inside the image
            low = torch.minimum(start.expand_as(extent), last)
            high = torch.maximum(torch.minimum(stop - extent, last), low)
            r = torch.rand(batch, v, device=device, generator=gen)
            starts.append(torch.minimum(low + torch.floor(r * (high - low + 1.0)), high))
        flipped = (torch.rand(batch, v, device=device, generator=gen) < self.hflip_p).float()
        return torch.stack((starts[0], starts[1], bh, bw, flipped), dim=-1)

    def _jitter(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        """Colour-jitter de-normalised views ``x [B, V, 3, s, s]`` in [0, 1] (float32)."""
        batch, v = x.shape[:2]

        def factor(strength: float) -> Tensor:
            r = torch.rand(batch, v, 1, 1, 1, device=x.device, generator=gen)
            return 1.0 + strength * (2.0 * r - 1.0)

        b, c, s = factor(self.brightness), factor(self.contrast), factor(self.saturation)
        h = self.hue * (2.0 * torch.rand(batch, v, 1, 1, 1, device=x.device, generator=gen) - 1.0)
        out = (x * b).clamp(0.0, 1.0)
        mean = _gray(out).mean(dim=(-3, -2, -1), keepdim=True)
        out = ((out - mean) * c + mean).clamp(0.0, 1.0)
        gray = _gray(out)
        out = ((out - gray) * s + gray).clamp(0.0, 1.0)
        if self.hue > 0:
            out = adjust_hue(out, h)
        return out

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None, valid_box: Tensor | None = None
    ) -> LocalViews:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        batch, _, big_h, big_w = images.shape
        v, s = self.num_views, self.size
        with torch.no_grad():
            geometry = self._boxes(batch, big_h, big_w, images.device, generator, valid_box)
            grid = view_sampling_grid(geometry, (s, s), (big_h, big_w))  # [B, V, s, s, 2]
            # Views stacked along the grid's height: one grid_sample per image, no copy of the input.
            src = images.float()
            views = F.grid_sample(
                src,
                grid.reshape(batch, v * s, s, 2),
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )
            views = views.view(batch, 3, v, s, s).transpose(1, 2)  # [B, V, 3, s, s]
            if self.jitter_p > 0 and (self.brightness or self.contrast or self.saturation or self.hue):
                apply = (
                    torch.rand(batch, v, 1, 1, 1, device=images.device, generator=generator) < self.jitter_p
                )
                jittered = normalize(
                    self._jitter(denormalize(views, self.mean, self.std), generator), self.mean, self.std
                )
                views = torch.where(apply, jittered, views)
        return LocalViews(images=views.to(images.dtype).contiguous(), geometry=geometry)
