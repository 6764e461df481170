"""Common base of the segmentation datasets: image/mask reading, size checks, transform hook."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ecaseg.data.io import read_image, read_mask
from ecaseg.errors import DatasetError
from ecaseg.utils.io import read_text_utf8

__all__ = ["IMAGE_EXTENSIONS", "SegmentationDataset", "Transform", "read_id_file"]

#: Signature of a dataset transform: ``(image HWC uint8 RGB, mask HW uint8 | None) -> dict``.
Transform = Callable[[np.ndarray, "np.ndarray | None"], dict[str, Any]]

#: File extensions recognised as images (lower case).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def read_id_file(path: str | os.PathLike[str]) -> list[str]:
    """Read a list of image ids, one per line.

    Blank lines and lines starting with ``#`` are skipped. Only the first whitespace-separated token of a
    line is used, folders are stripped and a known image extension is removed, so DeepLab-style lists
    (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``) work as well as plain ids.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "ids.txt"
        >>> _ = p.write_text("2007_000032\\n\\n# note\\n/JPEGImages/2007_000039.jpg /Seg/2007_000039.png\\n")
        >>> read_id_file(p)
        ['2007_000032', '2007_000039']
    """
    file = Path(path)
    try:
        text = read_text_utf8(file, "id list")
    except OSError as exc:
        raise DatasetError(f"cannot read id list {file}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    ids = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token = line.split()[0].replace("\\", "/").rsplit("/", 1)[-1]
        stem, dot, ext = token.rpartition(".")
        if dot and f".{ext.lower()}" in IMAGE_EXTENSIONS:
            token = stem
        ids.append(token)
    return ids


def missing_files_message(paths: Sequence[Path], what: str, limit: int = 5) -> str | None:
    """A message listing the first few ``paths`` that do not exist, or None if all exist."""
    missing = [p for p in paths if not p.is_file()]
    if not missing:
        return None
    shown = ", ".join(str(p) for p in missing[:limit])
    more = f" and {len(missing) - limit} more" if len(missing) > limit else ""
    return f"{len(missing)} {what} missing: {shown}{more}"


class SegmentationDataset(Dataset[dict[str, Any]]):
    """Base class: a list of images, optional masks and multi-hot image-level labels.

    Subclasses resolve their layout and call ``_set_items``. Items are dictionaries:
    ``{"id": str, "image": ..., "label": FloatTensor[C], "mask": ... (only when has_masks)}`` plus what the
    transform returns. With ``transform=None`` the image is ``np.uint8 [H, W, 3]`` RGB and the mask
    ``np.uint8 [H, W]``; otherwise ``transform(image, mask)`` builds the tensors.

    Attributes:
        class_names: K names, background first.
        num_classes: K.
        ignore_index: the mask value of ignored pixels (255).
        has_masks: whether the dataset has masks.
        load_masks: whether items carry them (default True); a weakly supervised training loop sets it to
            False, so that no mask file is read, decoded, resized and cropped only to be dropped.
        has_labels: whether ``labels`` are known (False for e.g. VOC ``test``, where they are all zero).
        ids: image ids in dataset order.
        labels: ``np.ndarray [len, C]`` uint8 cached image-level labels (C = K - 1).
        transform: the transform, or None.
    """

    class_names: tuple[str, ...]
    num_classes: int
    ignore_index: int
    has_masks: bool
    has_labels: bool
    ids: list[str]
    labels: np.ndarray
    transform: Transform | None

    def _set_items(
        self,
        *,
        ids: Sequence[str],
        image_paths: Sequence[Path],
        mask_paths: Sequence[Path] | None,
        labels: np.ndarray | None,
        class_names: Sequence[str],
        transform: Transform | None,
        ignore_index: int = 255,
    ) -> None:
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = ignore_index
        self.ids = list(ids)
        self._image_paths = list(image_paths)
        self._mask_paths = None if mask_paths is None else list(mask_paths)
        self.has_masks = self._mask_paths is not None
        self.load_masks = True
        self.has_labels = labels is not None
        if labels is None:
            labels = np.zeros((len(self.ids), self.num_classes - 1), dtype=np.uint8)
        self.labels = np.ascontiguousarray(labels, dtype=np.uint8)
        self.transform = transform
        if len(self._image_paths) != len(self.ids) or self.labels.shape != (
            len(self.ids),
            self.num_classes - 1,
        ):
            raise ValueError("ids, image paths and labels disagree in length")  # internal error

    def subset(self, keep: np.ndarray) -> None:
        """Keep only the items where the boolean array ``keep`` is True (in place)."""
        index = np.flatnonzero(np.asarray(keep, dtype=bool))
        self.ids = [self.ids[i] for i in index]
        self._image_paths = [self._image_paths[i] for i in index]
        if self._mask_paths is not None:
            self._mask_paths = [self._mask_paths[i] for i in index]
        self.labels = np.ascontiguousarray(self.labels[index])

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        """Path of the image file of item ``index``."""
        return self._image_paths[index]

    def mask_path(self, index: int) -> Path | None:
        """Path of the mask file of item ``index`` (None without masks)."""
        return None if self._mask_paths is None else self._mask_paths[index]

    @property
    def foreground_names(self) -> tuple[str, ...]:
        """The C foreground class names (label order)."""
        return self.class_names[1:]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_file = self._image_paths[index]
        image = read_image(image_file)
        mask: np.ndarray | None = None
        if self._mask_paths is not None and self.load_masks:
            mask_file = self._mask_paths[index]
            mask = read_mask(mask_file, self.num_classes, self.ignore_index)
            if mask.shape != image.shape[:2]:
                raise DatasetError(
                    f"mask {mask_file} has size {mask.shape[0]}x{mask.shape[1]} (HxW) but its image "
                    f"{image_file} is {image.shape[0]}x{image.shape[1]}"
                )
        if self.transform is None:
            sample: dict[str, Any] = {"image": image}
            if mask is not None:
                sample["mask"] = mask
        else:
            sample = dict(self.transform(image, mask))
        sample["id"] = self.ids[index]
        sample["label"] = torch.from_numpy(self.labels[index].astype(np.float32))
        return sample

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, classes={self.num_classes}, has_masks={self.has_masks}, "
            f"has_labels={self.has_labels})"
        )
