"""A user's own images with image-level labels from a CSV or JSON file, masks optional."""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from ecaseg.data.base import IMAGE_EXTENSIONS, SegmentationDataset, Transform, missing_files_message
from ecaseg.data.classes import VOC_CLASSES
from ecaseg.data.labels import load_or_compute_mask_labels
from ecaseg.errors import DatasetError
from ecaseg.utils.io import read_text_utf8

__all__ = ["FolderDataset", "parse_labels_file", "resolve_class_names"]


def _norm(name: str) -> str:
    return " ".join(name.strip().lower().replace("_", " ").split())


def resolve_class_names(class_names: Sequence[str] | str | os.PathLike[str] | None) -> tuple[str, ...]:
    """K class names, background first, from names, a text file (one name per line) or None (VOC).

    A leading ``"background"`` is added when missing. Names that are integers (``"0"``, ``"12"``) are
    refused: labels files read numbers as class indices, so such a name would be read as another class.

    Example:
        >>> resolve_class_names(["cat", "dog"])
        ('background', 'cat', 'dog')
    """
    if class_names is None:
        return VOC_CLASSES
    if isinstance(class_names, (str, os.PathLike)):
        file = Path(class_names).expanduser()
        try:
            lines = read_text_utf8(file, "class names file").splitlines()
        except OSError as exc:
            raise DatasetError(f"cannot read class names file {file}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
        names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    else:
        names = [str(n).strip() for n in class_names]
    if not names or _norm(names[0]) != "background":
        names = ["background", *names]
    seen: dict[str, str] = {}
    for name in names:
        if not name:
            raise DatasetError("class names must not be empty")
        if re.fullmatch(r"[+-]?\d+", name):
            raise DatasetError(
                f"class name {name!r} is a number: labels files read numbers as class indices (background = "
                "0), so such a name would be confused with another class; give the classes words, e.g. "
                f"'class_{name.lstrip('+-')}'"
            )
        if _norm(name) in seen:
            raise DatasetError(f"class name {name!r} appears twice (as {seen[_norm(name)]!r})")
        seen[_norm(name)] = name
    if len(names) < 2:
        raise DatasetError("at least one foreground class name is needed")
    return tuple(names)


def _label_vector(tokens: Sequence[object], class_names: tuple[str, ...], where: str) -> np.ndarray:
    lookup = {_norm(n): k for k, n in enumerate(class_names)}
    vec = np.zeros(len(class_names) - 1, dtype=np.uint8)
    for token in tokens:
        if isinstance(token, bool) or not isinstance(token, (int, str)):
            raise DatasetError(f"{where}: label {token!r} is neither a class name nor a class index")
        text = str(token).strip()
        if not text:
            continue
        if re.fullmatch(r"[+-]?\d+", text):
            k = int(text)
            if not 0 <= k < len(class_names):
                raise DatasetError(
                    f"{where}: class index {k} is outside 1..{len(class_names) - 1} "
                    f"(indices count from background = 0, as in the masks)"
                )
        elif _norm(text) in lookup:
            k = lookup[_norm(text)]
        else:
            shown = ", ".join(class_names[1:16]) + (", ..." if len(class_names) > 16 else "")
            raise DatasetError(f"{where}: unknown class {text!r}; valid names: {shown}")
        if k > 0:  # background is implicit
            vec[k - 1] = 1
    return vec


def _split_label_field(field: str) -> list[str]:
    # ';' separates when present (then names may contain spaces, e.g. "traffic light"), else whitespace.
    return field.split(";") if ";" in field else field.split()


def parse_labels_file(
    path: str | os.PathLike[str], class_names: Sequence[str]
) -> tuple[list[str], np.ndarray]:
    """Parse an image-level labels file (CSV or JSON, see :class:`FolderDataset`).

    Args:
        path: ``.json`` file (a JSON object ``{"id": [labels...]}``) or any other extension for CSV
            (``id,labels`` rows, optional header ``id,labels``).
        class_names: K names, background first; labels are names (case-insensitive, ``_`` = space) or class
            indices into this list (1..K-1, as in masks; ``0``/``background`` are accepted and ignored).

    Returns:
        ``(ids, labels)`` with labels ``[len(ids), K-1]`` uint8, ids in file order.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "labels.csv"
        >>> _ = p.write_text("id,labels\\nimg1,cat;dog\\nimg2,2\\n")
        >>> ids, y = parse_labels_file(p, ("background", "cat", "dog"))
        >>> ids, y.tolist()
        (['img1', 'img2'], [[1, 1], [0, 1]])
    """
    file = Path(path).expanduser()
    names = tuple(class_names)
    try:
        text = read_text_utf8(file, "labels file")
    except OSError as exc:
        raise DatasetError(f"cannot read labels file {file}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    ids: list[str] = []
    rows: list[np.ndarray] = []
    where_of: dict[str, str] = {}

    def add(image_id: str, tokens: Sequence[object], where: str) -> None:
        if not image_id:
            raise DatasetError(f"{where}: empty image id")
        if image_id in where_of:
            raise DatasetError(f"{where}: image id {image_id!r} already listed at {where_of[image_id]}")
        where_of[image_id] = where
        ids.append(image_id)
        rows.append(_label_vector(tokens, names, where))

    if file.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"labels file {file} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise DatasetError(f'labels file {file} must hold a JSON object {{"id": [labels...]}}')
        for image_id, value in data.items():
            where = f"{file} (id {image_id!r})"
            if isinstance(value, str):
                tokens: list[object] = list(_split_label_field(value))
            elif isinstance(value, int) and not isinstance(value, bool):
                tokens = [value]
            elif isinstance(value, list):
                tokens = list(value)
            else:
                raise DatasetError(f"{where}: labels must be a list of class names or indices, got {value!r}")
            add(str(image_id).strip(), tokens, where)
    else:
        for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if line_no == 1 and _norm(row[0]) == "id":
                continue  # header
            field = ",".join(row[1:])
            add(row[0].strip(), _split_label_field(field), f"{file}:{line_no}")
    if not ids:
        raise DatasetError(f"labels file {file} lists no image")
    return ids, np.stack(rows).astype(np.uint8)


def _index_images(images_dir: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    by_name: dict[str, Path] = {}
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(images_dir.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            rel = path.relative_to(images_dir).as_posix()
            by_name[rel] = path
            by_stem.setdefault(rel[: -len(path.suffix)], []).append(path)
    return by_name, by_stem


class FolderDataset(SegmentationDataset):
    """Images in a folder with image-level labels from a CSV or JSON file; masks optional.

    Labels file formats (labels are class names, case-insensitive, or class indices counted from
    background = 0 as in masks; ``background`` / ``0`` are ignored; an empty label list is allowed)::

        # labels.csv (header optional; labels separated by ';' or by spaces)
        id,labels
        cat_001,cat
        street_07,person;car
        2008_000123,8 12

        # labels.json
        {"cat_001": ["cat"], "street_07": ["person", "car"], "2008_000123": [8, 12]}

    An id is the image's path relative to ``images_dir`` without or with its extension (``cat_001`` or
    ``cat_001.jpg``; subfolders as ``sub/cat_001``). Masks (for evaluation) are ``masks_dir/<id>.png``,
    single-channel with class ids and 255 = ignore. Labels from the file are parsed once at construction
    (no cache needed). With ``labels_file=None`` and ``masks_dir`` given, every image with a mask is used and
    the labels are derived from the masks, computed once and cached like for VOC.

    Args:
        images_dir: the images folder (searched recursively).
        labels_file: CSV or JSON labels file, or None to derive labels from ``masks_dir``.
        masks_dir: optional folder of PNG masks.
        class_names: foreground names (a leading ``"background"`` is added when missing), a text file with
            one name per line, or None for the VOC classes.
        transform: ``transform(image, mask) -> dict`` or None.
        cache_dir: folder for the label cache when labels come from masks.
        subset: ``"all"`` images, or the ``"train"`` / ``"val"`` part of a held-out split: ``val_fraction``
            of the images (at least one when the fraction is positive and there are two or more), drawn
            with ``split_seed``; the two parts are disjoint and together hold every image.
        val_fraction: share of the images held out for ``subset="val"``.
        split_seed: seed of the held-out split.

    Example:
        >>> import tempfile, pathlib, cv2
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> (d / "img").mkdir()
        >>> _ = cv2.imwrite(str(d / "img" / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
        >>> _ = (d / "labels.json").write_text('{"a": ["dog"]}')
        >>> ds = FolderDataset(d / "img", d / "labels.json", class_names=["cat", "dog"])
        >>> ds.class_names, ds[0]["label"].tolist(), ds[0]["image"].shape
        (('background', 'cat', 'dog'), [0.0, 1.0], (8, 8, 3))
    """

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        labels_file: str | os.PathLike[str] | None,
        masks_dir: str | os.PathLike[str] | None = None,
        class_names: Sequence[str] | str | os.PathLike[str] | None = None,
        transform: Transform | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        subset: Literal["all", "train", "val"] = "all",
        val_fraction: float = 0.0,
        split_seed: int = 0,
    ) -> None:
        if subset not in ("all", "train", "val"):
            raise DatasetError(f"subset must be 'all', 'train' or 'val', got {subset!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if subset == "val" and val_fraction == 0.0:
            raise DatasetError(
                "a folder dataset has a val part only with data.val_fraction > 0 (a held-out share of the "
                "images) or a separate data.val_labels_file"
            )
        self.images_dir = Path(images_dir).expanduser()
        self.masks_dir = None if masks_dir is None else Path(masks_dir).expanduser()
        names = resolve_class_names(class_names)
        if not self.images_dir.is_dir():
            raise DatasetError(
                f"images folder {self.images_dir} does not exist; expected a folder of images "
                f"({', '.join(IMAGE_EXTENSIONS)}) plus a labels file: id,labels (CSV) or "
                "{id: [labels]} (JSON)"
            )
        if self.masks_dir is not None and not self.masks_dir.is_dir():
            raise DatasetError(f"masks folder {self.masks_dir} does not exist (expected <id>.png masks)")
        by_name, by_stem = _index_images(self.images_dir)

        labels: np.ndarray | None
        if labels_file is not None:
            label_path = Path(labels_file).expanduser()
            if not label_path.is_file():
                raise DatasetError(f"labels file {label_path} does not exist")
            ids, labels = parse_labels_file(label_path, names)
        elif self.masks_dir is not None:
            ids = sorted(s for s in by_stem if (self.masks_dir / f"{s}.png").is_file())
            if not ids:
                raise DatasetError(f"no image of {self.images_dir} has a mask <id>.png in {self.masks_dir}")
            labels = None
        else:
            raise DatasetError("FolderDataset needs a labels_file, or a masks_dir to derive the labels from")

        image_paths: list[Path] = []
        stems: list[str] = []
        missing: list[str] = []
        for image_id in ids:
            if image_id in by_name:
                path = by_name[image_id]
            elif len(by_stem.get(image_id, [])) == 1:
                path = by_stem[image_id][0]
            elif image_id in by_stem:
                options = ", ".join(p.name for p in by_stem[image_id])
                raise DatasetError(f"image id {image_id!r} is ambiguous in {self.images_dir}: {options}")
            else:
                missing.append(image_id)
                continue
            image_paths.append(path)
            rel = path.relative_to(self.images_dir).as_posix()
            stems.append(rel[: -len(path.suffix)])
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise DatasetError(f"{len(missing)} listed images not found in {self.images_dir}: {shown}")

        mask_paths = None
        if self.masks_dir is not None:
            mask_paths = [self.masks_dir / f"{s}.png" for s in stems]
            message = missing_files_message(mask_paths, f"masks in {self.masks_dir}")
            if message:
                raise DatasetError(message)
            if labels is None:
                labels = load_or_compute_mask_labels(
                    ids,
                    mask_paths,
                    len(names),
                    data_root=self.masks_dir,
                    cache_name="folder",
                    cache_dir=cache_dir,
                )
        if subset != "all":
            n = len(ids)
            if n < 2:
                raise DatasetError(
                    f"{self.images_dir} has {n} labelled image(s): a held-out {subset} split needs at "
                    "least 2 (one for val, the rest for training), or give data.val_labels_file"
                )
            n_val = min(n - 1, max(1, round(val_fraction * n))) if n >= 2 else 0
            order = np.random.default_rng(split_seed).permutation(n)
            keep = sorted(order[:n_val] if subset == "val" else order[n_val:])
            ids = [ids[i] for i in keep]
            image_paths = [image_paths[i] for i in keep]
            mask_paths = None if mask_paths is None else [mask_paths[i] for i in keep]
            labels = None if labels is None else labels[keep]
        self._set_items(
            ids=ids,
            image_paths=image_paths,
            mask_paths=mask_paths,
            labels=labels,
            class_names=names,
            transform=transform,
        )
