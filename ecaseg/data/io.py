"""Reading images and label masks with errors that name the offending file.

Images are decoded with OpenCV (``cv2``), masks with Pillow so that the palette ("P" mode) PNGs of VOC's
``SegmentationClass`` give their palette indices (OpenCV would expand them to colours).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from ecaseg.errors import DatasetError
from ecaseg.utils.io import atomic_write_bytes

__all__ = ["check_mask_values", "read_image", "read_mask", "write_mask"]

# EXIF orientation is ignored so that images stay aligned with their masks as stored on disk
# (the behaviour of PIL-based tools that produce most annotation files).
_IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


def read_image(path: str | os.PathLike[str], corrupt: Literal["warn", "error"] = "warn") -> np.ndarray:
    """Read an image file as RGB.

    Args:
        path: image file (any format OpenCV decodes: JPEG, PNG, BMP, WebP, TIFF, ...). Grayscale images are
            expanded to three channels and an alpha channel is dropped.
        corrupt: what to do with a JPEG that libjpeg decodes only with a warning ("Corrupt JPEG data",
            "Premature end of JPEG file": damaged pixels): ``"warn"`` (a :class:`RuntimeWarning` naming the
            file, the image is used) or ``"error"`` (:class:`~ecaseg.errors.DatasetError`). libjpeg's own
            message, which names no file, is not printed.

    Returns:
        ``np.ndarray`` ``[H, W, 3]`` uint8, RGB order.

    Raises:
        DatasetError: the file is missing or cannot be decoded (the message names it).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.png"
        >>> _ = cv2.imwrite(str(p), np.full((2, 3, 3), (255, 0, 0), np.uint8))  # BGR: blue
        >>> img = read_image(p)
        >>> img.shape, img[0, 0].tolist()
        ((2, 3, 3), [0, 0, 255])
    """
    file = Path(path)
    try:
        data = np.fromfile(file, dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"cannot read image file {file}: {exc.strerror or exc}") from exc
    if data[:3].tobytes() == b"\xff\xd8\xff":  # JPEG: libjpeg reports damaged data on stderr only
        with _stderr_captured() as captured:
            image = cv2.imdecode(data, _IMREAD_FLAGS)
        damage = _libjpeg_messages(captured)
        if damage and image is not None:
            message = f"image file {file} is a damaged JPEG (libjpeg: {'; '.join(damage)})"
            if corrupt == "error":
                raise DatasetError(message + "; replace or remove it")
            warnings.warn(message + "; its pixels may be wrong", RuntimeWarning, stacklevel=2)
    else:
        image = cv2.imdecode(data, _IMREAD_FLAGS) if data.size else None
    if image is None:
        raise DatasetError(f"cannot decode image file {file} (empty, truncated or not an image)")
    if image.dtype == np.uint16:  # 16-bit PNG/TIFF
        image = (image.astype(np.float32) * (255.0 / 65535.0)).round().astype(np.uint8)
    return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[bytes]]:
    """Capture what C code writes to file descriptor 2 during the block (libjpeg's warnings)."""
    out: list[bytes] = []
    with contextlib.suppress(ValueError, OSError):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (a daemon): nothing to capture
        yield out
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read())


def _libjpeg_messages(captured: list[bytes]) -> list[str]:
    """libjpeg's lines of the captured output; other lines (another thread's) go back to stderr."""
    mine: list[str] = []
    others: list[str] = []
    for line in b"".join(captured).decode("utf-8", "replace").splitlines():
        (mine if "JPEG" in line or "Huffman" in line else others).append(line)
    if others:
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.write("\n".join(others) + "\n")
    return [line.strip() for line in mine if line.strip()]


def check_mask_values(
    mask: np.ndarray, num_classes: int, ignore_index: int = 255, name: str | os.PathLike[str] = "mask"
) -> None:
    """Raise :class:`~ecaseg.errors.DatasetError` if ``mask`` holds a value that is neither a class id nor
    ``ignore_index``.

    Args:
        mask: integer array of any shape.
        num_classes: K, the number of classes including background (valid ids are ``0..K-1``).
        ignore_index: the "ignore" value (255).
        name: file name (or description) used in the message.

    Example:
        >>> check_mask_values(np.array([0, 3, 255]), num_classes=21)
        >>> check_mask_values(np.array([0, 22, 40]), num_classes=21, name="x.png")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ecaseg.errors.DatasetError: mask x.png holds values [22, 40] that are neither class ids 0..20 nor ...
    """
    bad = ((mask < 0) | (mask >= num_classes)) & (mask != ignore_index)
    if bad.any():
        values = np.unique(mask[bad])
        shown = ", ".join(str(int(v)) for v in values[:10]) + (", ..." if values.size > 10 else "")
        raise DatasetError(
            f"mask {name} holds values [{shown}] that are neither class ids 0..{num_classes - 1} "
            f"nor the ignore value {ignore_index}"
        )


def read_mask(path: str | os.PathLike[str], num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Read a single-channel label mask (grayscale or palette PNG) and check its values.

    Args:
        path: mask file. Grayscale (``L``), palette (``P``, the palette *indices* are the labels, as in VOC's
            ``SegmentationClass``) and 16-bit grayscale images are accepted; colour images are not.
        num_classes: K, the number of classes including background.
        ignore_index: value marking ignored pixels (255).

    Returns:
        ``np.ndarray`` ``[H, W]`` uint8 of class ids ``0..K-1`` or ``ignore_index``.

    Raises:
        DatasetError: missing/unreadable file, more than one channel, or values that are neither a class id
            nor ``ignore_index`` (the message names the file and the values).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.png"
        >>> _ = cv2.imwrite(str(p), np.array([[0, 3], [255, 20]], np.uint8))
        >>> read_mask(p, num_classes=21).tolist()
        [[0, 3], [255, 20]]
    """
    file = Path(path)
    try:
        with Image.open(file) as img:
            mode = img.mode
            if mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise DatasetError(
                    f"mask {file} is not single-channel (image mode {mode!r}); masks must be grayscale or "
                    "palette PNGs holding class ids"
                )
            array = np.array(img)
    except DatasetError:
        raise
    except FileNotFoundError as exc:
        raise DatasetError(f"mask file {file} does not exist") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"cannot decode mask file {file}: {exc}") from exc
    if array.ndim != 2:
        raise DatasetError(f"mask {file} is not single-channel (shape {array.shape})")
    check_mask_values(array, num_classes, ignore_index, file)
    return np.ascontiguousarray(array.astype(np.uint8, copy=False))


def write_mask(path: str | os.PathLike[str], mask: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write a label mask as a PNG, atomically (e.g. pseudo-labels or predictions).

    Args:
        path: output ``.png`` file; parent folders are created.
        mask: ``[H, W]`` integer array with values in ``0..255``.
        palette: optional ``[256, 3]`` uint8 RGB colour map; when given the PNG is a palette image (viewable
            in colour, still read back as class ids by :func:`read_mask`), else it is grayscale.

    Example:
        >>> import tempfile, pathlib
        >>> from ecaseg.data.classes import voc_palette
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "out" / "m.png"
        >>> write_mask(p, np.array([[0, 1], [2, 255]]), palette=voc_palette())
        >>> read_mask(p, num_classes=21).tolist()
        [[0, 1], [2, 255]]
    """
    values = np.asarray(mask)
    if values.ndim != 2:
        raise ValueError(f"mask must have shape [H, W], got {values.shape}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f"mask values must lie in 0..255 to be written to {path}")
    raw = np.ascontiguousarray(values.astype(np.uint8))
    height, width = raw.shape
    if palette is None:
        img = Image.frombytes("L", (width, height), raw.tobytes())
    else:
        pal = np.asarray(palette, dtype=np.uint8)
        if pal.shape != (256, 3):
            raise ValueError(f"palette must have shape [256, 3], got {pal.shape}")
        img = Image.frombytes("P", (width, height), raw.tobytes())
        img.putpalette(pal.reshape(-1).tolist())
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
