"""The images of DINO pretraining: a folder of image files or any map-style dataset; only images are read.

* :class:`ImageFolder` -- every image file under a folder (recursively), items ``{"image": uint8 HWC RGB}``.
* ``_SquareImages`` -- what the training loader iterates: a random square cut of each item's image resized
  to ``image_size``, float32 ``[3, S, S]`` in [0, 1] (``_unit_image`` converts one image; labels and masks
  are never read).
* ``_as_dataset`` -- a folder path or a dataset, checked.

Layout: engine layer; imports ``ecaseg.data`` and ``ecaseg.errors``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ecaseg.data import IMAGE_EXTENSIONS, denormalize, read_image
from ecaseg.errors import DatasetError

__all__ = ["ImageFolder"]


class ImageFolder(Dataset):
    """Every image file under ``root`` (recursively), sorted by path; items are ``{"image": uint8 HWC RGB}``.

    Args:
        root: Folder to search; files with the extensions of :data:`ecaseg.data.IMAGE_EXTENSIONS` (any case).
        check: Decode every image once here, so that a bad file stops the run before its first iteration
            (not in the middle of it, without a checkpoint).
        skip_bad: With ``check``, leave out the files that cannot be decoded (or decode only with libjpeg
            warnings) instead of raising; they are listed in :attr:`skipped`.

    Attributes:
        skipped: One message per file left out (naming it).

    Raises:
        DatasetError: If ``root`` is not a folder or holds no (decodable) image file, or, with ``check`` and
            without ``skip_bad``, a file cannot be decoded (named).

    Example:
        >>> import tempfile
        >>> ImageFolder(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        ecaseg.errors.DatasetError: no image files (.jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff) under ...
    """

    def __init__(self, root: str | Path, check: bool = False, skip_bad: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"image folder not found: {self.root}")
        self.paths = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not self.paths:
            raise DatasetError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.skipped: list[str] = []
        if check:
            good = []
            for path in self.paths:
                try:
                    read_image(path, corrupt="error")
                except DatasetError as err:
                    if not skip_bad:
                        raise DatasetError(
                            f"{err}; no training was started (pass --skip-bad to train on the other images)"
                        ) from None
                    self.skipped.append(str(err))
                    continue
                good.append(path)
            self.paths = good
            if not self.paths:
                raise DatasetError(f"none of the images under {self.root} can be decoded: {self.skipped[0]}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": read_image(self.paths[index])}


def _unit_image(image: Any, index: int) -> Tensor:
    """An item's image as float32 ``[3, H, W]`` RGB in [0, 1] (uint8 HWC array, or normalised CHW tensor)."""
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DatasetError(
                f"item {index}: 'image' must be a uint8 [H, W, 3] array, got {image.dtype} {image.shape}"
            )
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise DatasetError(f"item {index}: an 'image' tensor must be [3, H, W], got {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.float() / 255.0
        return denormalize(image.float())
    raise DatasetError(f"item {index}: 'image' is a {type(image).__name__}, expected a numpy array or tensor")


class _SquareImages(Dataset):
    """Wraps a dataset: item ``i`` -> float32 ``[3, S, S]`` in [0, 1], a random square cut resized to S."""

    def __init__(self, source: Any, size: int, cache: bool = False) -> None:
        self.source = source
        self.size = size
        self.cache: dict[int, Any] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.source)

    def _image(self, index: int) -> Any:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        item = self.source[index]
        if not isinstance(item, Mapping) or "image" not in item:
            raise DatasetError(f"item {index} of {type(self.source).__name__} has no 'image' entry")
        if self.cache is not None:
            self.cache[index] = item["image"]
        return item["image"]

    def __getitem__(self, index: int) -> Tensor:
        image = self._image(index)
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
            h, w = image.shape[:2]
            side = min(h, w)
            y0 = int(torch.randint(0, h - side + 1, ()).item())
            x0 = int(torch.randint(0, w - side + 1, ()).item())
            square = image[y0 : y0 + side, x0 : x0 + side]
            if side != self.size:
                interp = cv2.INTER_AREA if side > self.size else cv2.INTER_LINEAR
                square = cv2.resize(square, (self.size, self.size), interpolation=interp)
            return _unit_image(square, index)
        x = _unit_image(image, index)
        h, w = x.shape[-2:]
        side = min(h, w)
        y0 = int(torch.randint(0, h - side + 1, ()).item())
        x0 = int(torch.randint(0, w - side + 1, ()).item())
        x = x[:, y0 : y0 + side, x0 : x0 + side]
        if side != self.size:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        return x.clamp(0.0, 1.0)


def _as_dataset(images: str | Path | Dataset | Sequence[dict[str, Any]], skip_bad: bool = False) -> Any:
    if isinstance(images, (str, Path)):
        return ImageFolder(images, check=True, skip_bad=skip_bad)
    if not hasattr(images, "__getitem__") or not hasattr(images, "__len__"):
        raise DatasetError(f"images must be a folder or a map-style dataset, got {type(images).__name__}")
    if len(images) == 0:  # type: ignore[arg-type]
        raise DatasetError(f"the dataset {type(images).__name__} is empty")
    return images
