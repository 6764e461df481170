"""Class names of the supported datasets, ImageNet normalisation constants and the VOC colour map."""

from __future__ import annotations

import numpy as np

__all__ = ["COCO_CLASSES", "IMAGENET_MEAN", "IMAGENET_STD", "VOC_CLASSES", "colorize_mask", "voc_palette"]

#: ImageNet RGB mean used to normalise images entering the networks (values in [0, 1]).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: ImageNet RGB standard deviation used to normalise images entering the networks.
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: PASCAL VOC 2012: background followed by the 20 object classes (mask values 0..20).
VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

#: MS COCO 2014: background followed by the 80 "things" classes in COCO category-id order (mask values 0..80).
COCO_CLASSES: tuple[str, ...] = (
    "background",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)


def voc_palette() -> np.ndarray:
    """The standard PASCAL VOC colour map (used by its palette PNG masks).

    Colour ``i`` spreads the bits of ``i`` over the three channels, most significant first:
    bit ``3k + c`` of the index sets bit ``7 - k`` of channel ``c`` (R, G, B).

    Returns:
        ``np.ndarray`` of shape ``[256, 3]``, dtype uint8, RGB.

    Example:
        >>> pal = voc_palette()
        >>> pal.shape, pal[1].tolist(), pal[15].tolist(), pal[255].tolist()
        ((256, 3), [128, 0, 0], [192, 128, 128], [224, 224, 192])
    """
    index = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.int64)
    for k in range(8):
        for c in range(3):
            bit = (index >> (3 * k + c)) & 1
            palette[:, c] |= bit << (7 - k)
    return palette.astype(np.uint8)


def colorize_mask(mask: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Map a label mask to RGB colours (for visualising masks and pseudo-labels).

    Args:
        mask: ``[H, W]`` integer array with values in ``0..255``.
        palette: ``[256, 3]`` uint8 colours; the VOC colour map by default.

    Returns:
        ``[H, W, 3]`` uint8 RGB image.

    Example:
        >>> colorize_mask(np.array([[0, 1], [15, 255]], dtype=np.uint8))[1, 0].tolist()
        [192, 128, 128]
    """
    pal = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    if pal.shape != (256, 3):
        raise ValueError(f"palette must have shape [256, 3], got {pal.shape}")
    values = np.asarray(mask)
    if values.ndim != 2:
        raise ValueError(f"mask must have shape [H, W], got {values.shape}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError("mask values must lie in 0..255")
    return pal[values.astype(np.int64)]
