"""DINO's multi-crop augmentation, batched on the images' device and driven by one ``torch.Generator``.

* :func:`random_resized_crops` -- random resized crops with a random horizontal flip, one
  ``affine_grid`` / ``grid_sample`` for the whole batch.
* :func:`color_augment` -- per-crop colour jitter (brightness, contrast, saturation, hue) and random grey.
* :func:`gaussian_blur` -- per-crop Gaussian blur, each crop with its own sigma.
* :func:`multi_crop` -- two global and ``num_local`` local views, with DINO's blur / solarisation
  probabilities per view, ImageNet-normalised.

Every random draw comes from the ``generator`` argument, one value per crop, so a run is reproducible and
each crop gets its own parameters. ``torchvision.transforms.v2``: solarisation is its
``functional.solarize`` (the same ``where(x >= 0.5, 1 - x, x)``; ``torch.equal`` to the former code). The
other steps stay hand-written, because v2's random transforms draw one parameter set per call for the whole
batch from the global RNG (no generator) and its functionals take one Python float per call, so per-crop
parameters need a loop over the crops; measured on one CPU thread for 128 local crops of 32 x 32 (the default
recipe's batch), against the v2 functionals called crop by crop:

* grey (``rgb_to_grayscale``, also inside ``adjust_contrast`` / ``adjust_saturation``): red weight 0.2989
  instead of 0.299, max difference 1.0e-4 (contrast 2.0e-5, saturation 4.0e-5), so not the same numbers;
* brightness (``adjust_brightness``): identical values, but 1.0 ms in a loop against 0.06 ms batched;
* hue (``adjust_hue``, here :func:`ecaseg.data.adjust_hue`): max difference 1.4e-6, 21.7 ms against 7.2 ms;
* blur (``gaussian_blur``): max difference 5.4e-7 (a 2-D kernel built with a softmax against two separable
  passes), 18.7 ms against 1.2 ms;
* ``ColorJitter`` applies the four jitters in a random order per call (here a fixed one), and
  ``RandomResizedCrop`` draws integer boxes by rejection sampling (another distribution and resampling).

Layout: engine layer; imports ``ecaseg.data`` (normalisation, hue) and torchvision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from ecaseg.data import adjust_hue, normalize
from ecaseg.engine.dino_pretrain.config import DINOPretrainConfig

__all__ = ["color_augment", "gaussian_blur", "multi_crop", "random_resized_crops"]


def _rand(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(shape, device=like.device, generator=generator, dtype=torch.float32)


def random_resized_crops(
    images: Tensor,
    num: int,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``num`` random resized crops of every image, batched with ``affine_grid`` / ``grid_sample``.

    A box covers a fraction ``a ~ U(scale)`` of the image area with aspect ratio ``r`` log-uniform in
    ``ratio`` (width fraction ``sqrt(a r)``, height fraction ``sqrt(a / r)``, each at most 1), at a uniform
    position inside the image; it is resampled to ``size x size`` (bilinear on a 2x finer grid, then 2x2
    averaging, which limits aliasing when shrinking) and mirrored left-right with probability ``hflip_p``.

    Args:
        images: ``[B, C, H, W]``.
        num: Crops per image.
        size: Output side.
        scale: Area fraction range, ``0 < low <= high <= 1``.
        ratio: Aspect-ratio range.
        hflip_p: Flip probability.
        generator: Random generator on the images' device.

    Returns:
        ``[num * B, C, size, size]``, crop-major (crop ``v`` of image ``b`` at ``v * B + b``).

    Example:
        >>> random_resized_crops(torch.rand(2, 3, 16, 16), num=3, size=8, scale=(0.5, 1.0)).shape
        torch.Size([6, 3, 8, 8])
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    batch, channels = images.shape[:2]
    m = num * batch
    area = scale[0] + (scale[1] - scale[0]) * _rand((m,), images, generator)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand((m,), images, generator)
    aspect = torch.exp(log_r)
    fw = torch.sqrt(area * aspect).clamp(max=1.0)  # width as a fraction of the image width
    fh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (2.0 * _rand((m,), images, generator) - 1.0) * (1.0 - fw)  # box centre, normalised coordinates
    cy = (2.0 * _rand((m,), images, generator) - 1.0) * (1.0 - fh)
    flip = 1.0 - 2.0 * (_rand((m,), images, generator) < hflip_p).float()
    zero = torch.zeros_like(fw)
    theta = torch.stack((torch.stack((fw * flip, zero, cx), -1), torch.stack((zero, fh, cy), -1)), dim=1)
    fine = 2 * size
    grid = F.affine_grid(theta, [m, channels, fine, fine], align_corners=False)
    src = images.float().repeat(num, 1, 1, 1)
    crops = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(crops, 2).to(images.dtype)


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def color_augment(
    x: Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    jitter_p: float,
    grayscale_p: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-image colour jitter (brightness, contrast, saturation, hue, in that order) and random greyscale.

    Args:
        x: ``[M, 3, H, W]`` RGB in [0, 1].
        brightness: Factor range ``[1 - a, 1 + a]``.
        contrast: Factor range around the image's mean grey.
        saturation: Factor range around each pixel's grey.
        hue: Shift range ``[-a, a]`` (turns), via :func:`ecaseg.data.adjust_hue`.
        jitter_p: Probability that an image is jittered at all.
        grayscale_p: Probability that an image becomes grey (after the jitter).
        generator: Random generator on ``x``'s device.

    Returns:
        ``[M, 3, H, W]`` in [0, 1].

    Example:
        >>> x = torch.rand(4, 3, 8, 8)
        >>> torch.equal(color_augment(x, 0.4, 0.4, 0.2, 0.1, jitter_p=0.0, grayscale_p=0.0), x)
        True
    """
    m = x.shape[0]

    def factor(strength: float) -> Tensor:
        return 1.0 + strength * (2.0 * _rand((m, 1, 1, 1), x, generator) - 1.0)

    out = (x * factor(brightness)).clamp(0.0, 1.0)
    mean = _gray(out).mean(dim=(-3, -2, -1), keepdim=True)
    out = ((out - mean) * factor(contrast) + mean).clamp(0.0, 1.0)
    gray = _gray(out)
    out = ((out - gray) * factor(saturation) + gray).clamp(0.0, 1.0)
    if hue > 0:
        out = adjust_hue(out, hue * (2.0 * _rand((m, 1, 1, 1), x, generator) - 1.0))
    out = torch.where(_rand((m, 1, 1, 1), x, generator) < jitter_p, out, x)
    return torch.where(_rand((m, 1, 1, 1), x, generator) < grayscale_p, _gray(out).expand_as(out), out)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Blur each image with its own Gaussian (separable, reflect padding, one grouped convolution per axis).

    Args:
        x: ``[M, C, H, W]``.
        sigma: ``[M]`` standard deviations in pixels (> 0).
        radius: Kernel half-width (kernel ``2 * radius + 1``; less than ``H`` and ``W``).

    Returns:
        ``[M, C, H, W]``.

    Example:
        >>> x = torch.zeros(1, 1, 9, 9); x[0, 0, 4, 4] = 1.0
        >>> y = gaussian_blur(x, torch.tensor([1.0]), radius=2)
        >>> round(float(y.sum()), 4), round(float(y[0, 0, 4, 4]), 4)  # mass kept; centre (1 / 2.4837)^2
        (1.0, 0.1621)
    """
    m, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2.0 * sigma.float()[:, None] ** 2))  # [M, 2r+1]
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [M*C, 2r+1]
    flat = x.float().reshape(1, m * c, h, w)
    flat = F.conv2d(
        F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=m * c
    )
    flat = F.conv2d(
        F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=m * c
    )
    return flat.reshape(m, c, h, w).to(x.dtype)


def _photometric(
    x: Tensor, cfg: DINOPretrainConfig, blur_p: float, solarize_p: float, generator: torch.Generator | None
) -> Tensor:
    m, size = x.shape[0], x.shape[-1]
    x = color_augment(
        x, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, cfg.jitter_p, cfg.grayscale_p, generator
    )
    if blur_p > 0:
        lo, hi = cfg.blur_sigma
        sigma = lo + (hi - lo) * _rand((m,), x, generator)
        radius = min(math.ceil(3.0 * hi), size - 1)
        blurred = gaussian_blur(x, sigma, radius)
        x = torch.where(_rand((m, 1, 1, 1), x, generator) < blur_p, blurred, x)
    if solarize_p > 0:
        solar = TF.solarize(x, 0.5)  # where(x >= 0.5, 1 - x, x)
        x = torch.where(_rand((m, 1, 1, 1), x, generator) < solarize_p, solar, x)
    return x


def multi_crop(
    images: Tensor, config: DINOPretrainConfig, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor | None]:
    """DINO's multi-crop views of a batch: two global crops and ``config.num_local`` local crops.

    Global crop 1 is always blurred (``blur_p[0]``), global crop 2 rarely (``blur_p[1]``) and sometimes
    solarised, local crops are blurred with ``blur_p[2]``; all crops are flipped, colour-jittered and made
    grey at random (see :class:`DINOPretrainConfig`), then ImageNet-normalised.

    Args:
        images: ``[B, 3, H, W]`` RGB in [0, 1].
        config: Crop sizes, scales and photometric settings.
        generator: Random generator on the images' device.

    Returns:
        ``(globals [2 B, 3, g, g], locals [L B, 3, l, l] | None)``, both view-major and normalised.

    Example:
        >>> cfg = DINOPretrainConfig(global_size=16, local_size=8, num_local=3)
        >>> g, loc = multi_crop(torch.rand(2, 3, 32, 32), cfg)
        >>> g.shape, loc.shape
        (torch.Size([4, 3, 16, 16]), torch.Size([6, 3, 8, 8]))
    """
    batch = images.shape[0]
    gcrops = random_resized_crops(
        images, 2, config.global_size, config.global_scale, config.ratio, config.hflip_p, generator
    )
    first = _photometric(gcrops[:batch], config, config.blur_p[0], 0.0, generator)
    second = _photometric(gcrops[batch:], config, config.blur_p[1], config.solarize_p, generator)
    global_views = normalize(torch.cat((first, second), dim=0))
    if config.num_local == 0:
        return global_views, None
    lcrops = random_resized_crops(
        images,
        config.num_local,
        config.local_size,
        config.local_scale,
        config.ratio,
        config.hflip_p,
        generator,
    )
    local_views = normalize(_photometric(lcrops, config, config.blur_p[2], 0.0, generator))
    return global_views, local_views
