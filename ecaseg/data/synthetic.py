"""A deterministic synthetic benchmark for weakly supervised semantic segmentation.

Every image holds a few objects of a few classes on a cluttered background, with an image-level label and a
ground-truth mask. The generator is built to be hard in the ways that matter to WSSS from image-level labels:

* **Shared colours.** Every class draws its object colour from the same palette, so colour alone does not tell
  classes apart; class identity is carried by the shape and texture of a small *head* part.
* **Parts.** An object is a large plain *body* (an ellipse whose look does not depend on the class) plus a
  smaller class-specific head. A classifier only needs the head, so its CAM under-activates on the body. As
  on a real object, head and body share the object's colour, and the objects of one image differ in colour,
  so an affinity between patches can tell which body belongs to which head.
* **Co-occurring distractors.** Each class has a *context* texture (think of water under boats) that is
  usually drawn around objects of that class and is labelled background in the mask, so CAMs over-activate
  on it. Context patches of absent classes appear now and then, so the context is a strong but imperfect cue.

A sample is a pure function of ``(config, split, index)``: its random numbers come from a numpy ``Generator``
seeded with ``(seed, split, index)``, so samples can be drawn in any order, in any process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ecaseg.errors import ConfigError, DatasetError
from ecaseg.utils.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "CONTEXT_COLOURS",
    "OBJECT_PALETTE",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_SPLITS",
    "SyntheticConfig",
    "SyntheticSample",
    "SyntheticWSSSDataset",
    "generate_sample",
    "render_sample",
    "synthetic_class_names",
    "write_synthetic_dataset",
]

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "background",
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "star",
    "diamond",
    "hexagon",
)
"""All class names, background first; a config with ``num_fg_classes=C`` uses the first ``C + 1``."""

SYNTHETIC_SPLITS: tuple[str, ...] = ("train", "val")
"""The splits a :class:`SyntheticConfig` describes."""

OBJECT_PALETTE: np.ndarray = np.array(
    [
        (205, 50, 50),  # red
        (50, 170, 70),  # green
        (50, 90, 215),  # blue
        (225, 200, 45),  # yellow
        (190, 60, 195),  # magenta
        (240, 130, 35),  # orange
        (40, 190, 205),  # cyan
        (225, 225, 225),  # white
    ],
    dtype=np.float32,
)
"""Object colours (RGB). With ``shared_colours=True`` every class draws from all of them."""

HEAD_TEXTURES: tuple[str, ...] = (
    "hstripes",
    "dots",
    "diagonal",
    "checker",
    "vstripes",
    "grid",
    "concentric",
    "solid",
)
"""Texture of the head of class ``k`` (1-based) is ``HEAD_TEXTURES[k - 1]``."""

CONTEXT_COLOURS: np.ndarray = np.array(
    [
        [(60, 110, 165), (125, 170, 210)],  # water: waves
        [(70, 120, 50), (120, 165, 75)],  # grass: blades
        [(150, 80, 60), (95, 55, 45)],  # bricks
        [(200, 180, 130), (150, 130, 90)],  # gravel
        [(110, 90, 135), (160, 140, 180)],  # tiles
        [(50, 120, 110), (95, 165, 150)],  # large checker
        [(175, 135, 50), (125, 95, 35)],  # weave
        [(125, 125, 125), (80, 80, 80)],  # spots
    ],
    dtype=np.float32,
)
"""The two colours (RGB) of the context texture of class ``k`` (1-based) are ``CONTEXT_COLOURS[k - 1]``."""

_SPLIT_CODES = {name: code for code, name in enumerate(SYNTHETIC_SPLITS)}
_MAX_CLASSES = len(SYNTHETIC_CLASSES) - 1


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic benchmark; equal configs give identical datasets.

    Attributes:
        seed: base seed; sample ``i`` of split ``s`` is seeded with ``(seed, s, i)``.
        image_size: side of the square images in pixels (at least 32). Object sizes scale with it.
        num_fg_classes: number of foreground classes ``C`` (1..8). The property :attr:`num_classes` is
            ``K = C + 1``, the background included, as everywhere else in ecaseg.
        min_objects: fewest objects in an image (at least 1, so every image has a label).
        max_objects: most objects in an image. Objects never overlap; object sizes shrink when more objects
            must fit.
        num_train: number of images in the ``"train"`` split.
        num_val: number of images in the ``"val"`` split.
        shared_colours: if True (the hard default) every class draws its object colour from the whole
            :data:`OBJECT_PALETTE`; if False class ``k`` always uses colour ``k - 1`` (an easy variant for
            ablations: colour then identifies the class).
        distinct_colours: if True, the objects of one image get different palette colours (as different
            objects of a photo usually look different); if False colours may repeat within an image.
        head_scale: radius of the class-specific head relative to the object radius (0.1..0.45). The body
            takes most of the rest of the object, so a small value makes the discriminative part small.
        head_shade: brightness of the head's class pattern relative to the object colour (0 = black
            marks); the rest of the head has the object colour, like the body.
        object_scale: size of the objects relative to generator version 1 (0.5..2).
        context_prob: probability that an object gets its class's context texture patch (a background
            distractor) around it. 0 disables the co-occurring distractors.
        spurious_context_prob: probability, per image, of one extra context patch of a class that is absent
            from the image (so the distractor is not a perfect cue).
        clutter: number of small background clutter items (lines, dots, boxes; some in object colours).
        noise_std: standard deviation of the Gaussian pixel noise added at the end (0..255 scale).
        blur_sigma: sigma of the Gaussian blur applied before the noise (0 disables it); it softens edges
            the way a camera does, the mask stays hard.
    """

    seed: int = 0
    image_size: int = 128
    num_fg_classes: int = 5
    min_objects: int = 1
    max_objects: int = 3
    num_train: int = 1000
    num_val: int = 200
    shared_colours: bool = True
    distinct_colours: bool = True
    head_scale: float = 0.32
    head_shade: float = 0.6
    object_scale: float = 1.8
    context_prob: float = 0.4
    spurious_context_prob: float = 0.3
    clutter: int = 12
    noise_std: float = 6.0
    blur_sigma: float = 0.6

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"SyntheticConfig.{name}={getattr(self, name)!r} is invalid: {rule}")

        if self.seed < 0:
            raise bad("seed", "must be >= 0")
        if self.image_size < 32:
            raise bad("image_size", "must be at least 32")
        if not 1 <= self.num_fg_classes <= _MAX_CLASSES:
            raise bad("num_fg_classes", f"must be in 1..{_MAX_CLASSES}")
        if self.min_objects < 1:
            raise bad("min_objects", "must be at least 1")
        if self.max_objects < self.min_objects:
            raise bad("max_objects", f"must be >= min_objects={self.min_objects}")
        if self.max_objects > 8:
            raise bad("max_objects", "must be at most 8")
        if self.num_train < 0:
            raise bad("num_train", "must be >= 0")
        if self.num_val < 0:
            raise bad("num_val", "must be >= 0")
        if not 0.1 <= self.head_scale <= 0.45:
            raise bad("head_scale", "must be in [0.1, 0.45]")
        if not 0.5 <= self.object_scale <= 2.0:
            raise bad("object_scale", "must be in [0.5, 2]")
        if not 0.0 <= self.head_shade < 1.0:
            raise bad("head_shade", "must be in [0, 1)")
        for name in ("context_prob", "spurious_context_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be a probability in [0, 1]")
        if self.clutter < 0:
            raise bad("clutter", "must be >= 0")
        if self.noise_std < 0:
            raise bad("noise_std", "must be >= 0")
        if self.blur_sigma < 0:
            raise bad("blur_sigma", "must be >= 0")

    @property
    def num_classes(self) -> int:
        """``K = num_fg_classes + 1``: the classes with the background, as ``num_classes`` counts everywhere.

        Example:
            >>> SyntheticConfig(num_fg_classes=5).num_classes
            6
        """
        return self.num_fg_classes + 1

    def split_size(self, split: str) -> int:
        """Number of images in ``split`` (``"train"`` or ``"val"``)."""
        _check_split(split)
        return self.num_train if split == "train" else self.num_val


def synthetic_class_names(num_fg_classes: int) -> tuple[str, ...]:
    """The ``num_fg_classes + 1`` class names of a config, background first.

    Args:
        num_fg_classes: number of foreground classes ``C`` (1..8).

    Returns:
        ``("background", ...)`` with ``C + 1`` names.

    Example:
        >>> synthetic_class_names(3)
        ('background', 'circle', 'square', 'triangle')
    """
    if not 1 <= num_fg_classes <= _MAX_CLASSES:
        raise ConfigError(f"num_fg_classes={num_fg_classes!r} is invalid: must be in 1..{_MAX_CLASSES}")
    return SYNTHETIC_CLASSES[: num_fg_classes + 1]


def _check_split(split: str) -> int:
    if split not in _SPLIT_CODES:
        raise ConfigError(f"unknown synthetic split {split!r}; choose one of {SYNTHETIC_SPLITS}")
    return _SPLIT_CODES[split]


# --------------------------------------------------------------------------------------------------------
# Layout: the geometry of a sample (cheap; the dataset's labels come from it without rendering)


@dataclass(frozen=True)
class _Object:
    cls: int  # 1..C
    cx: float
    cy: float
    radius: float  # every pixel of the object lies within this disc
    body_axes: tuple[float, float]
    angle: float  # body major axis direction (radians); the head sits at one end of it
    head_radius: float
    head_rotation: float
    colour: tuple[float, float, float]
    light: tuple[float, float]  # shading direction scaled by its strength
    phase: tuple[float, float]  # texture phases


@dataclass(frozen=True)
class _Context:
    cls: int
    ellipses: tuple[tuple[float, float, float, float, float], ...]  # (cx, cy, ax, ay, angle_deg)


@dataclass(frozen=True)
class _Layout:
    objects: tuple[_Object, ...]  # in drawing order (larger first)
    contexts: tuple[_Context, ...]

    @property
    def classes(self) -> frozenset[int]:
        return frozenset(o.cls for o in self.objects)


def _rng(config: SyntheticConfig, split: str, index: int, stream: int) -> np.random.Generator:
    code = _check_split(split)
    size = config.split_size(split)
    if not 0 <= index < size:
        raise IndexError(f"index {index} out of range for synthetic split {split!r} of {size} images")
    return np.random.default_rng([config.seed, code, index, stream])


def _place_objects(config: SyntheticConfig, rng: np.random.Generator, n: int) -> list[tuple[float, ...]]:
    size = config.image_size
    scale = math.sqrt(3.0 / max(config.max_objects, 3))
    scale *= config.object_scale
    r_hi, r_lo = 0.24 * size * scale, 0.14 * size * scale
    placed: list[tuple[float, float, float]] = []
    for _ in range(n):
        best: tuple[float, float, float] | None = None
        best_gap = -math.inf
        for attempt in range(60):
            shrink = 0.97**attempt
            r = rng.uniform(r_lo, r_hi) * shrink
            r = max(r, 0.09 * size * scale)
            cx, cy = rng.uniform(r + 1.0, size - r - 2.0, size=2)
            gap = min((math.hypot(cx - px, cy - py) - r - pr for px, py, pr in placed), default=math.inf)
            if gap >= 2.0:
                best = (cx, cy, r)
                break
            # fallback: keep the candidate that overlaps least while keeping each centre out of the
            # smaller object's disc (the smaller one is drawn on top, see _sample_layout)
            ok = all(math.hypot(cx - px, cy - py) >= min(r, pr) + 2.0 for px, py, pr in placed)
            if ok and gap > best_gap:
                best, best_gap = (cx, cy, r), gap
        if best is None:  # practically unreachable: smallest possible object in the emptiest corner
            r = 0.09 * size * scale
            cands = rng.uniform(r + 1.0, size - r - 2.0, size=(64, 2))
            dists = [min((math.hypot(x - px, y - py) for px, py, _ in placed), default=0.0) for x, y in cands]
            x, y = cands[int(np.argmax(dists))]
            best = (float(x), float(y), r)
        placed.append(best)
    return [tuple(float(v) for v in p) for p in placed]


def _sample_layout(config: SyntheticConfig, split: str, index: int) -> _Layout:
    rng = _rng(config, split, index, 0)
    size = config.image_size
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    classes = rng.integers(1, config.num_fg_classes + 1, size=n)
    discs = _place_objects(config, rng, n)
    if config.distinct_colours:
        colour_ids = rng.permutation(len(OBJECT_PALETTE))[:n].tolist()
    else:
        colour_ids = rng.integers(len(OBJECT_PALETTE), size=n).tolist()
    objects = []
    contexts = []
    for cls, (cx, cy, radius), colour_id in zip(classes.tolist(), discs, colour_ids):
        head_r = config.head_scale * radius
        # head centre at 0.35 * head_r beyond the body's tip: major + 1.35 * head_r <= radius
        major = radius - 1.35 * head_r
        minor = major * rng.uniform(0.7, 0.95)
        angle = rng.uniform(0.0, 2 * math.pi)
        if config.shared_colours:
            base = OBJECT_PALETTE[colour_id]
        else:
            base = OBJECT_PALETTE[(cls - 1) % len(OBJECT_PALETTE)]
        colour = np.clip(base + rng.uniform(-15.0, 15.0, size=3), 0.0, 255.0)
        light_dir = rng.uniform(0.0, 2 * math.pi)
        strength = rng.uniform(0.1, 0.25)
        objects.append(
            _Object(
                cls=cls,
                cx=cx,
                cy=cy,
                radius=radius,
                body_axes=(major, minor),
                angle=angle,
                head_radius=head_r,
                head_rotation=rng.uniform(0.0, 2 * math.pi),
                colour=(float(colour[0]), float(colour[1]), float(colour[2])),
                light=(strength * math.cos(light_dir), strength * math.sin(light_dir)),
                phase=(float(rng.uniform()), float(rng.uniform())),
            )
        )
        if rng.uniform() < config.context_prob:
            contexts.append(_Context(cls, _blob(rng, cx, cy, radius * 1.05, radius * 1.45)))
    present = set(classes.tolist())
    absent = [c for c in range(1, config.num_fg_classes + 1) if c not in present]
    if absent and rng.uniform() < config.spurious_context_prob:
        cls = absent[int(rng.integers(len(absent)))]
        cx, cy = rng.uniform(0.0, size, size=2)
        contexts.append(_Context(cls, _blob(rng, float(cx), float(cy), 0.15 * size, 0.25 * size)))
    # larger objects first: a smaller object drawn on top never hides the centre of a larger one
    order = sorted(range(n), key=lambda i: -objects[i].radius)
    return _Layout(objects=tuple(objects[i] for i in order), contexts=tuple(contexts))


def _blob(
    rng: np.random.Generator, cx: float, cy: float, lo: float, hi: float
) -> tuple[tuple[float, float, float, float, float], ...]:
    """Two overlapping random ellipses around (cx, cy): an irregular patch."""
    out = []
    for _ in range(2):
        dx, dy = rng.normal(0.0, 0.2 * lo, size=2)
        ax, ay = rng.uniform(lo, hi, size=2)
        out.append((cx + float(dx), cy + float(dy), float(ax), float(ay), float(rng.uniform(0.0, 180.0))))
    return tuple(out)


# --------------------------------------------------------------------------------------------------------
# Rendering


def _head_texture(
    name: str, dy: np.ndarray, dx: np.ndarray, period: float, phase: tuple[float, float]
) -> np.ndarray:
    u = dx / period + phase[0]
    v = dy / period + phase[1]
    if name == "hstripes":
        return (v % 1.0) < 0.5
    if name == "vstripes":
        return (u % 1.0) < 0.5
    if name == "diagonal":
        return (((u + v) / 1.2) % 1.0) < 0.5
    if name == "dots":
        return ((u % 1.0) - 0.5) ** 2 + ((v % 1.0) - 0.5) ** 2 < 0.1
    if name == "checker":
        return ((np.floor(u / 0.75) + np.floor(v / 0.75)) % 2) == 0
    if name == "grid":
        return ((u % 1.0) < 0.32) | ((v % 1.0) < 0.32)
    if name == "concentric":
        return ((np.sqrt(dx * dx + dy * dy) / period + phase[0]) % 1.0) < 0.5
    return np.ones(dx.shape, dtype=bool)  # "solid": the whole head in the dark shade


def _context_texture(
    k: int, yy: np.ndarray, xx: np.ndarray, s: float, rng: np.random.Generator
) -> np.ndarray:
    """Texture of context ``k`` (0-based) at absolute coordinates, ``s`` = image_size / 128."""
    y, x = yy / s, xx / s
    if k == 0:  # waves
        return np.sin(0.9 * y + 1.5 * np.sin(0.25 * x)) > 0.3
    if k == 1:  # grass blades
        return ((x + 2.0 * np.sin(0.7 * y)) % 5.0) < 1.3
    if k == 2:  # bricks
        row = np.floor(y / 6.0)
        return ((y % 6.0) < 1.2) | (((x + 5.0 * (row % 2)) % 10.0) < 1.2)
    if k == 3:  # gravel
        return rng.random(yy.shape) < 0.25
    if k == 4:  # tiles
        return ((x % 7.0) < 1.3) | ((y % 7.0) < 1.3)
    if k == 5:  # large checker
        return ((np.floor(x / 8.0) + np.floor(y / 8.0)) % 2) == 0
    if k == 6:  # weave
        return (((x + y) % 8.0) < 2.0) ^ (((x - y) % 8.0) < 2.0)
    return ((x % 9.0 - 4.5) ** 2 + (y % 9.0 - 4.5) ** 2) < 6.0  # spots


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    if kind == "square":
        ang = rot + np.pi / 4 + np.arange(4) * np.pi / 2
        rad = np.full(4, 1.15 * r)
    elif kind == "triangle":
        ang = rot + np.arange(3) * 2 * np.pi / 3
        rad = np.full(3, 1.3 * r)
    elif kind == "diamond":
        ang = rot + np.arange(4) * np.pi / 2
        rad = np.array([1.3, 0.75, 1.3, 0.75]) * r
    elif kind == "hexagon":
        ang = rot + np.arange(6) * np.pi / 3
        rad = np.full(6, 1.05 * r)
    elif kind == "star":
        ang = rot + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.25 * r, 0.5 * r)
    else:  # cross: a plus sign with arms of half-width 0.36 r
        w = 0.36
        corners = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1)]
        local = np.array(corners + [(-x, -y) for x, y in corners]) * (1.15 * r)
        c, s_ = math.cos(rot), math.sin(rot)
        xs = cx + local[:, 0] * c - local[:, 1] * s_
        ys = cy + local[:, 0] * s_ + local[:, 1] * c
        return np.stack([xs, ys], axis=1)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)


_SHIFT = 4  # sub-pixel bits for cv2 drawing


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(points * (1 << _SHIFT)).astype(np.int32)


def _draw_head(canvas: np.ndarray, kind: str, cx: float, cy: float, r: float, rot: float) -> None:
    centre = (round(cx * (1 << _SHIFT)), round(cy * (1 << _SHIFT)))
    if kind == "circle":
        cv2.circle(canvas, centre, round(r * (1 << _SHIFT)), 1, -1, cv2.LINE_8, _SHIFT)
    elif kind == "ring":
        cv2.circle(canvas, centre, round(1.1 * r * (1 << _SHIFT)), 1, -1, cv2.LINE_8, _SHIFT)
        cv2.circle(canvas, centre, round(0.5 * r * (1 << _SHIFT)), 0, -1, cv2.LINE_8, _SHIFT)
    else:
        cv2.fillPoly(canvas, [_fixed(_polygon(kind, cx, cy, r, rot))], 1, cv2.LINE_8, _SHIFT)


def _draw_ellipses(
    canvas: np.ndarray, ellipses: tuple[tuple[float, float, float, float, float], ...]
) -> None:
    for cx, cy, ax, ay, ang in ellipses:
        centre = (round(cx * (1 << _SHIFT)), round(cy * (1 << _SHIFT)))
        axes = (round(ax * (1 << _SHIFT)), round(ay * (1 << _SHIFT)))
        cv2.ellipse(canvas, centre, axes, ang, 0.0, 360.0, 1, -1, cv2.LINE_8, _SHIFT)


def _draw_clutter(image: np.ndarray, rng: np.random.Generator, count: int) -> None:
    size = image.shape[0]
    for _ in range(count):
        if rng.uniform() < 0.4:
            colour = OBJECT_PALETTE[int(rng.integers(len(OBJECT_PALETTE)))] + rng.uniform(-20, 20, size=3)
        else:
            colour = rng.uniform(20.0, 235.0, size=3)
        col = tuple(float(c) for c in np.clip(colour, 0, 255))
        kind = int(rng.integers(3))
        x, y = (int(v) for v in rng.integers(0, size, size=2))
        if kind == 0:  # line
            length = rng.uniform(0.08, 0.3) * size
            a = rng.uniform(0.0, 2 * math.pi)
            x2, y2 = int(x + length * math.cos(a)), int(y + length * math.sin(a))
            cv2.line(image, (x, y), (x2, y2), col, int(rng.integers(1, 3)), cv2.LINE_AA)
        elif kind == 1:  # dot
            cv2.circle(image, (x, y), max(1, int(rng.uniform(0.01, 0.035) * size)), col, -1, cv2.LINE_AA)
        else:  # small box
            w, h = (max(2, int(v)) for v in rng.uniform(0.02, 0.07, size=2) * size)
            cv2.rectangle(image, (x, y), (x + w, y + h), col, -1)


@dataclass(frozen=True)
class SyntheticSample:
    """One rendered sample with the ground truth and what made it (for analysis and tests).

    Attributes:
        image: ``[H, W, 3]`` uint8 RGB.
        mask: ``[H, W]`` uint8, 0 = background, ``1..C`` = class (no ignore pixels).
        parts: ``[H, W]`` uint8, 0 = background, 1 = object body, 2 = object head (the discriminative part).
        instances: ``[H, W]`` uint8, 0 = background, ``i + 1`` = ``object_classes[i]``'s object.
        distractor: ``[H, W]`` bool, the background pixels covered by context (distractor) textures.
        object_classes: class (``1..C``) of each object, in drawing order.
        context_classes: class whose context texture each drawn context patch shows.
    """

    image: np.ndarray
    mask: np.ndarray
    parts: np.ndarray
    instances: np.ndarray
    distractor: np.ndarray
    object_classes: tuple[int, ...]
    context_classes: tuple[int, ...]


def render_sample(config: SyntheticConfig, split: str, index: int) -> SyntheticSample:
    """Render sample ``index`` of ``split`` with its mask, part map, instance map and distractor map.

    Args:
        config: the benchmark parameters.
        split: ``"train"`` or ``"val"``.
        index: ``0 <= index < config.split_size(split)``.

    Returns:
        A :class:`SyntheticSample`; identical for equal ``(config, split, index)``.

    Example:
        >>> s = render_sample(SyntheticConfig(image_size=48, num_train=2), "train", 1)
        >>> s.image.shape, s.mask.shape, int(s.parts.max())
        ((48, 48, 3), (48, 48), 2)
    """
    layout = _sample_layout(config, split, index)
    rng = _rng(config, split, index, 1)
    size = config.image_size
    s = size / 128.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # background: a muted linear gradient between two colours
    grey = rng.uniform(95.0, 160.0, size=2)
    c0 = grey[0] + rng.uniform(-12.0, 12.0, size=3)
    c1 = grey[1] + rng.uniform(-12.0, 12.0, size=3)
    a = rng.uniform(0.0, 2 * math.pi)
    t = ((xx * math.cos(a) + yy * math.sin(a)) / (size * math.sqrt(2.0)) + 0.5)[..., None]
    image = (c0 + (c1 - c0) * t).astype(np.float32)

    distractor = np.zeros((size, size), dtype=bool)
    canvas = np.zeros((size, size), dtype=np.uint8)
    for ctx in layout.contexts:
        canvas[:] = 0
        _draw_ellipses(canvas, ctx.ellipses)
        region = canvas.astype(bool)
        pattern = _context_texture(ctx.cls - 1, yy[region], xx[region], s, rng)
        colours = CONTEXT_COLOURS[ctx.cls - 1]
        image[region] = np.where(pattern[:, None], colours[1], colours[0])
        distractor |= region

    _draw_clutter(image, rng, config.clutter)

    mask = np.zeros((size, size), dtype=np.uint8)
    parts = np.zeros((size, size), dtype=np.uint8)
    instances = np.zeros((size, size), dtype=np.uint8)
    for i, obj in enumerate(layout.objects):
        colour = np.asarray(obj.colour, dtype=np.float32)
        major, minor = obj.body_axes
        # body: a plain, lit ellipse whose look does not depend on the class
        canvas[:] = 0
        body = ((obj.cx, obj.cy, major, minor, math.degrees(obj.angle)),)
        _draw_ellipses(canvas, body)
        m = canvas.astype(bool)
        shade = 1.0 + ((xx[m] - obj.cx) * obj.light[0] + (yy[m] - obj.cy) * obj.light[1]) / obj.radius
        image[m] = colour * shade[:, None]
        mask[m], parts[m], instances[m] = obj.cls, 1, i + 1
        # head: the class's shape and texture at one end of the body
        dist = major + 0.35 * obj.head_radius
        hx, hy = obj.cx + dist * math.cos(obj.angle), obj.cy + dist * math.sin(obj.angle)
        canvas[:] = 0
        _draw_head(canvas, SYNTHETIC_CLASSES[obj.cls], hx, hy, obj.head_radius, obj.head_rotation)
        m = canvas.astype(bool)
        period = max(3.0, 0.6 * obj.head_radius)
        texture = _head_texture(HEAD_TEXTURES[obj.cls - 1], yy[m] - hy, xx[m] - hx, period, obj.phase)
        image[m] = np.where(texture[:, None], colour * config.head_shade, colour)
        mask[m], parts[m], instances[m] = obj.cls, 2, i + 1
    distractor &= mask == 0

    if config.blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), config.blur_sigma)
    if config.noise_std > 0:
        image += rng.normal(0.0, config.noise_std, size=image.shape).astype(np.float32)
    out = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return SyntheticSample(
        image=out,
        mask=mask,
        parts=parts,
        instances=instances,
        distractor=distractor,
        object_classes=tuple(o.cls for o in layout.objects),
        context_classes=tuple(c.cls for c in layout.contexts),
    )


def generate_sample(config: SyntheticConfig, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and ground-truth mask of sample ``index`` of ``split``.

    The sample depends only on ``(config, split, index)`` (not on which samples were generated before).

    Args:
        config: the benchmark parameters.
        split: ``"train"`` or ``"val"``.
        index: ``0 <= index < config.split_size(split)`` (IndexError otherwise).

    Returns:
        ``(image [H, W, 3] uint8 RGB, mask [H, W] uint8)`` with mask values 0 (background) or ``1..C``.

    Example:
        >>> cfg = SyntheticConfig(image_size=64, num_train=4)
        >>> image, mask = generate_sample(cfg, "train", 3)
        >>> image.shape, image.dtype, mask.shape, int(mask.max()) <= cfg.num_fg_classes
        ((64, 64, 3), dtype('uint8'), (64, 64), True)
        >>> bool((generate_sample(cfg, "train", 3)[0] == image).all())
        True
    """
    sample = render_sample(config, split, index)
    return sample.image, sample.mask


def _label_vector(config: SyntheticConfig, classes: frozenset[int]) -> np.ndarray:
    label = np.zeros(config.num_fg_classes, dtype=np.uint8)
    label[[c - 1 for c in sorted(classes)]] = 1
    return label


def _sample_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


class SyntheticWSSSDataset(Dataset):
    """The synthetic benchmark as a torch ``Dataset`` following the ecaseg dataset conventions.

    Images are rendered on the fly in ``__getitem__`` (a few milliseconds each); the image-level labels are
    computed once at construction from the sample layouts, without rendering.

    Args:
        split: ``"train"`` or ``"val"``.
        config: the benchmark parameters.
        transform: ``None`` (items hold ``np.uint8`` arrays: image ``[H, W, 3]`` RGB, mask ``[H, W]``) or a
            callable ``transform(image, mask) -> dict`` (e.g. ``ecaseg.data.TrainTransform``) whose output
            the item holds, plus ``"id"`` and ``"label"``.

    Attributes:
        class_names: ``K`` names, background first.
        num_classes: ``K = C + 1``.
        has_masks: always True.
        ids: ``"<split>_<index:06d>"``, the names :func:`write_synthetic_dataset` gives the files.
        labels: ``[len, C]`` uint8 multi-hot image-level labels.

    Example:
        >>> ds = SyntheticWSSSDataset("val", SyntheticConfig(image_size=48, num_val=3))
        >>> item = ds[0]
        >>> len(ds), ds.num_classes, item["id"], item["image"].shape, item["label"].shape
        (3, 6, 'val_000000', (48, 48, 3), torch.Size([5]))
    """

    has_masks = True

    def __init__(
        self,
        split: str = "train",
        config: SyntheticConfig | None = None,
        transform: Callable[[np.ndarray, np.ndarray | None], dict[str, Any]] | None = None,
    ) -> None:
        self.config = config if config is not None else SyntheticConfig()
        _check_split(split)
        self.split = split
        self.transform = transform
        self.class_names: tuple[str, ...] = synthetic_class_names(self.config.num_fg_classes)
        self.num_classes: int = self.config.num_classes
        n = self.config.split_size(split)
        self.ids: list[str] = [_sample_id(split, i) for i in range(n)]
        labels = np.zeros((n, self.config.num_fg_classes), dtype=np.uint8)
        for i in range(n):
            labels[i] = _label_vector(self.config, _sample_layout(self.config, split, i).classes)
        self.labels: np.ndarray = labels

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        """Not available: the images exist only in memory.

        Raises:
            DatasetError: always; write the benchmark with :func:`write_synthetic_dataset` and read it with
                ``ecaseg.data.FolderDataset`` to have files.
        """
        raise DatasetError(
            f"SyntheticWSSSDataset({self.split!r}) has no image files (sample {index} is rendered in "
            "memory); use write_synthetic_dataset() and FolderDataset for a dataset on disk"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for SyntheticWSSSDataset of {len(self)} images")
        image, mask = generate_sample(self.config, self.split, index)
        label = torch.from_numpy(self.labels[index].astype(np.float32))
        if self.transform is None:
            return {"id": self.ids[index], "image": image, "label": label, "mask": mask}
        out = dict(self.transform(image, mask))
        out["id"] = self.ids[index]
        out["label"] = label
        return out


def write_synthetic_dataset(root: str | os.PathLike[str], config: SyntheticConfig | None = None) -> Path:
    """Write the benchmark to disk in the ``FolderDataset`` layout.

    Files (each written atomically): ``images/<id>.png`` (RGB), ``masks/<id>.png`` (single-channel, values
    0..C), ``labels.json`` (``{"<id>": [class names], ...}`` for every id of both splits), ``classes.txt``
    (``K`` names, background first, one per line), ``train.txt`` and ``val.txt`` (ids, one per line) and
    ``synthetic_config.json`` (the config, for provenance).

    Args:
        root: output folder (created if needed; existing files of the same names are replaced).
        config: the benchmark parameters (default :class:`SyntheticConfig`).

    Returns:
        ``root`` as a ``Path``.

    Example:
        >>> import tempfile
        >>> cfg = SyntheticConfig(image_size=32, num_train=2, num_val=1)
        >>> root = write_synthetic_dataset(tempfile.mkdtemp(), cfg)
        >>> sorted(p.name for p in root.iterdir())
        ['classes.txt', 'images', 'labels.json', 'masks', 'synthetic_config.json', 'train.txt', 'val.txt']
    """
    config = config if config is not None else SyntheticConfig()
    root = Path(root)
    names = synthetic_class_names(config.num_fg_classes)
    labels: dict[str, list[str]] = {}
    for split in SYNTHETIC_SPLITS:
        ids = []
        for index in range(config.split_size(split)):
            sample_id = _sample_id(split, index)
            image, mask = generate_sample(config, split, index)
            for folder, array in (("images", cv2.cvtColor(image, cv2.COLOR_RGB2BGR)), ("masks", mask)):
                ok, buf = cv2.imencode(".png", array)
                if not ok:
                    raise DatasetError(f"could not encode {folder}/{sample_id}.png")
                atomic_write_bytes(root / folder / f"{sample_id}.png", buf.tobytes())
            labels[sample_id] = [names[c] for c in np.unique(mask).tolist() if c != 0]
            ids.append(sample_id)
        atomic_write_text(root / f"{split}.txt", "".join(f"{i}\n" for i in ids))
    atomic_write_text(root / "labels.json", json.dumps(labels, indent=1) + "\n")
    atomic_write_text(root / "classes.txt", "".join(f"{n}\n" for n in names))
    atomic_write_text(
        root / "synthetic_config.json",
        json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n",
    )
    return root
