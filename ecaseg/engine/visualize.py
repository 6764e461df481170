"""Figures: image / CAM / CARM / pseudo-label / prediction panels (TensorBoard, ``ecaseg visualize``, demo).

Heat maps use OpenCV's JET colour map blended over the image; label maps use the VOC palette.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from torch import Tensor

from ecaseg.data import denormalize
from ecaseg.engine.inference import colorize
from ecaseg.engine.pseudo import PseudoLabels

__all__ = ["bar_chart", "heatmap", "label_panel", "panel_row", "to_rgb_uint8", "training_panels"]


def to_rgb_uint8(images: Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` normalised images -> ``[B, H, W, 3]`` uint8 RGB."""
    rgb = denormalize(images.detach().float()).clamp(0, 1).mul(255).round().byte()
    return rgb.permute(0, 2, 3, 1).cpu().numpy()


def heatmap(image: np.ndarray, scores: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """Blend a ``[h, w]`` score map in [0, 1] (resized to the image) over ``image`` (JET colour map)."""
    height, width = image.shape[:2]
    scores = cv2.resize(scores.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    colored = cv2.applyColorMap((scores.clip(0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB)
    return ((1 - opacity) * image.astype(np.float32) + opacity * colored).astype(np.uint8)


def label_panel(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Colour a label map with the VOC palette (ignore = white) at ``size`` (h, w)."""
    label = cv2.resize(label.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return colorize(label)


def panel_row(panels: Sequence[np.ndarray], titles: Sequence[str] | None = None, pad: int = 4) -> np.ndarray:
    """Concatenate same-height RGB panels horizontally with white gaps and optional titles on top."""
    height = panels[0].shape[0]
    gap = np.full((height, pad, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for i, panel in enumerate(panels):
        if i:
            parts.append(gap)
        parts.append(panel)
    row = np.concatenate(parts, axis=1)
    if titles:
        band = np.full((18, row.shape[1], 3), 255, np.uint8)
        x = 0
        for panel, title in zip(panels, titles):
            cv2.putText(band, title, (x + 2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
            x += panel.shape[1] + pad
        row = np.concatenate([band, row], axis=0)
    return row


def class_legend(class_names: Sequence[str], width: int) -> np.ndarray:
    """A band of colour swatches with the class names (VOC palette; white = ignored), ``width`` wide."""
    entries = [*((name, colorize(np.array([[k]]))[0, 0]) for k, name in enumerate(class_names))]
    entries.append(("ignored", np.array([255, 255, 255], np.uint8)))
    x, y, line = 4, 4, 16
    positions = []
    for name, _ in entries:
        step = 16 + 7 * len(name) + 10
        if x + step > width and x > 4:
            x, y = 4, y + line
        positions.append((x, y))
        x += step
    band = np.full((y + line + 2, width, 3), 255, np.uint8)
    for (name, colour), (x, y) in zip(entries, positions):
        cv2.rectangle(band, (x, y), (x + 11, y + 11), tuple(int(c) for c in colour), -1)
        cv2.rectangle(band, (x, y), (x + 11, y + 11), (120, 120, 120), 1)
        cv2.putText(band, name, (x + 15, y + 10), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return band


def training_panels(
    images: Tensor,
    pseudo: PseudoLabels,
    pred: Tensor,
    n: int,
    masks: Tensor | None = None,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """One row per image: image, CAM (max over classes), CARM (max over fg classes), CAM pseudo-label,
    CARM pseudo-label, prediction and, with ``masks``, the ground truth; a title band on top and, with
    ``class_names``, a class colour legend below. Returns ``[H, W, 3]`` uint8."""
    rgb = to_rgb_uint8(images[:n])
    rows = []
    titles = ["image", "CAM", *(["CARM"] if pseudo.carm is not None else []), "CAM pseudo-label"]
    titles += [*(["CARM pseudo-label"] if pseudo.carm_label is not None else []), "prediction"]
    titles += ["ground truth"] if masks is not None else []
    for i in range(n):
        image = rgb[i]
        size = image.shape[:2]
        panels = [image, heatmap(image, pseudo.cams[i].max(0).values.float().cpu().numpy())]
        if pseudo.carm is not None:
            panels.append(heatmap(image, pseudo.carm[i, 1:].max(0).values.float().cpu().numpy()))
        panels.append(label_panel(pseudo.cam_label[i].cpu().numpy(), size))
        if pseudo.carm_label is not None:
            panels.append(label_panel(pseudo.carm_label[i].cpu().numpy(), size))
        panels.append(label_panel(pred[i].cpu().numpy(), size))
        if masks is not None:
            panels.append(label_panel(masks[i].cpu().numpy(), size))
        rows.append(panel_row(panels, titles if i == 0 else None))
    gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    stacked: list[np.ndarray] = []
    for i, row in enumerate(rows):
        if i:
            stacked.append(gap)
        stacked.append(row)
    if class_names:
        stacked += [gap, class_legend(class_names, rows[0].shape[1])]
    return np.concatenate(stacked, axis=0)


def bar_chart(
    series: dict[str, Sequence[float]],
    class_names: Sequence[str],
    height: int = 220,
    bar_width: int = 9,
    title: str = "",
) -> np.ndarray:
    """Grouped bar chart of per-class values in [0, 1] (e.g. IoU per class for several models).

    Args:
        series: model name -> one value per class (NaN drawn as no bar).
        class_names: the class names, in order (x axis labels).
        height: height of the plotting area in pixels.
        bar_width: width of one bar in pixels.
        title: drawn above the legend (the y axis is labelled in %).

    Returns:
        ``[H, W, 3]`` uint8 RGB image with a legend.
    """
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    names = list(series)
    group = max(bar_width * len(names) + 8, 64)
    left, top, bottom = 34, 24 + (16 if title else 0), 30
    width = max(left + group * len(class_names) + 10, left + 110 * len(names))
    canvas = np.full((top + height + bottom, width, 3), 255, np.uint8)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + round((1 - tick) * height)
        cv2.line(canvas, (left, y), (width - 5, y), (225, 225, 225), 1)
        cv2.putText(
            canvas,
            f"{100 * tick:.0f}%",
            (2, y + 4),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.3,
            (90, 90, 90),
            1,
            cv2.LINE_AA,
        )
    for c, class_name in enumerate(class_names):
        x0 = left + c * group + 4
        for m, name in enumerate(names):
            value = float(series[name][c])
            if value != value:  # NaN
                continue
            y = top + round((1 - min(max(value, 0.0), 1.0)) * height)
            x = x0 + m * bar_width
            cv2.rectangle(canvas, (x, y), (x + bar_width - 2, top + height), colors[m % len(colors)], -1)
        label_pos = (x0, top + height + 12)
        cv2.putText(
            canvas, class_name[:10], label_pos, cv2.FONT_HERSHEY_SIMPLEX, 0.3, (0, 0, 0), 1, cv2.LINE_AA
        )
    legend_y = 6 + (16 if title else 0)
    if title:
        cv2.putText(canvas, title, (left, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for m, name in enumerate(names):
        x = left + m * 110
        cv2.rectangle(canvas, (x, legend_y), (x + 10, legend_y + 10), colors[m % len(colors)], -1)
        cv2.putText(
            canvas, name, (x + 14, legend_y + 9), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA
        )
    return canvas
