"""PASCAL VOC 2012 with the SBD augmented masks ("VOC aug")."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ecaseg.data.base import SegmentationDataset, Transform, missing_files_message, read_id_file
from ecaseg.data.classes import VOC_CLASSES
from ecaseg.data.labels import load_or_compute_mask_labels
from ecaseg.errors import DatasetError

__all__ = ["VOC_LAYOUT", "VOC_SPLITS", "VOCAugDataset"]

#: The named splits of :class:`VOCAugDataset`.
VOC_SPLITS: tuple[str, ...] = ("train_aug", "train", "val", "test")

VOC_LAYOUT = """\
VOCdevkit/
└── VOC2012/                       <- root (VOCdevkit/ is accepted too)
    ├── JPEGImages/                2007_000032.jpg ...
    ├── SegmentationClassAug/      2007_000032.png ... (SBD + VOC masks, values 0..20 and 255)
    ├── SegmentationClass/         (optional) VOC's own masks, used for train/val when complete
    └── ImageSets/Segmentation/    train.txt, val.txt, test.txt (one id per line)"""


def _resolve_root(root: str | os.PathLike[str]) -> Path:
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetError(
            f"VOC root {base} does not exist or is not a folder; expected layout:\n{VOC_LAYOUT}"
        )
    for candidate in (base, base / "VOC2012", base / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DatasetError(
        f"no JPEGImages folder in {base} (nor in {base / 'VOC2012'}); expected layout:\n{VOC_LAYOUT}"
    )


def _split_file(root: Path, name: str) -> Path:
    path = root / "ImageSets" / "Segmentation" / f"{name}.txt"
    if not path.is_file():
        raise DatasetError(f"VOC split file {path} is missing; expected layout:\n{VOC_LAYOUT}")
    return path


class VOCAugDataset(SegmentationDataset):
    """PASCAL VOC 2012 + SBD for WSSS (21 classes, background first).

    Splits:

    * ``"train_aug"``: every mask in ``SegmentationClassAug`` whose id is not in ``val.txt`` (10,582 images
      on the full dataset), masks from ``SegmentationClassAug``.
    * ``"train"`` / ``"val"``: the ids of ``ImageSets/Segmentation/{train,val}.txt``; masks from
      ``SegmentationClass`` when that folder holds a mask for every id, else from ``SegmentationClassAug``
      (which contains VOC's own masks for these ids, converted to class ids).
    * ``"test"``: ``test.txt``, no masks and no labels (``has_labels`` is False, ``labels`` are zero).
    * any other value: a text file of ids (one per line, see :func:`~ecaseg.data.base.read_id_file`); masks
      from the first of ``SegmentationClass``, ``SegmentationClassAug`` holding all of them, or none at all
      when neither holds any (then like ``test``).

    Image-level labels are the foreground classes present in each mask, computed once and cached (see
    :func:`~ecaseg.data.labels.load_or_compute_mask_labels`).

    Args:
        root: the ``VOC2012`` folder, or the ``VOCdevkit`` folder that contains it.
        split: a split name or a path to an id list.
        transform: ``transform(image, mask) -> dict`` (e.g. :class:`~ecaseg.data.TrainTransform`) or None.
        cache_dir: folder for the label cache (default: beside the data, or the user cache if not writable).

    Raises:
        DatasetError: missing root/folders/split files (the message shows the expected layout), missing images
            or masks (named), unreadable masks or invalid mask values.

    Example:
        >>> VOCAugDataset("/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ecaseg.errors.DatasetError: VOC root /no/such/folder does not exist or is not a folder; expected ...
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | os.PathLike[str] = "train_aug",
        transform: Transform | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = _resolve_root(root)
        self.split = os.fspath(split)
        aug_dir = self.root / "SegmentationClassAug"
        voc_dir = self.root / "SegmentationClass"

        mask_dir: Path | None
        if self.split == "train_aug":
            if not aug_dir.is_dir():
                raise DatasetError(
                    f"split 'train_aug' needs the SBD masks folder {aug_dir}, which is missing; "
                    f"expected layout:\n{VOC_LAYOUT}"
                )
            val_ids = set(read_id_file(_split_file(self.root, "val")))
            ids = sorted(p.stem for p in aug_dir.glob("*.png") if p.stem not in val_ids)
            if not ids:
                raise DatasetError(f"{aug_dir} holds no .png mask outside the val split")
            mask_dir = aug_dir
            cache_name = "voc-train_aug"
        elif self.split in ("train", "val", "test"):
            ids = read_id_file(_split_file(self.root, self.split))
            mask_dir = None if self.split == "test" else self._pick_mask_dir(ids, [voc_dir, aug_dir], True)
            cache_name = f"voc-{self.split}"
        else:
            id_file = Path(self.split).expanduser()
            if not id_file.is_file():
                raise DatasetError(
                    f"unknown VOC split {self.split!r}: expected one of {', '.join(VOC_SPLITS)} "
                    "or the path of a text file of image ids"
                )
            ids = read_id_file(id_file)
            mask_dir = self._pick_mask_dir(ids, [voc_dir, aug_dir], False)
            digest = hashlib.sha256(str(id_file.resolve()).encode()).hexdigest()[:10]
            cache_name = f"voc-ids-{id_file.stem}-{digest}"
        if not ids:
            raise DatasetError(f"VOC split {self.split!r} lists no image id")

        image_paths = [self.root / "JPEGImages" / f"{i}.jpg" for i in ids]
        message = missing_files_message(image_paths, "images of the VOC split " + repr(self.split))
        if message:
            raise DatasetError(message)
        mask_paths = None if mask_dir is None else [mask_dir / f"{i}.png" for i in ids]
        labels = None
        if mask_paths is not None:
            labels = load_or_compute_mask_labels(
                ids,
                mask_paths,
                len(VOC_CLASSES),
                data_root=self.root,
                cache_name=cache_name,
                cache_dir=cache_dir,
            )
        self.mask_dir = mask_dir
        self._set_items(
            ids=ids,
            image_paths=image_paths,
            mask_paths=mask_paths,
            labels=labels,
            class_names=VOC_CLASSES,
            transform=transform,
        )

    def _pick_mask_dir(self, ids: list[str], folders: list[Path], required: bool) -> Path | None:
        reasons = []
        any_found = False
        for folder in folders:
            if not folder.is_dir():
                reasons.append(f"{folder} does not exist")
                continue
            paths = [folder / f"{i}.png" for i in ids]
            message = missing_files_message(paths, f"masks in {folder.name}")
            if message is None:
                return folder
            any_found = any_found or any(p.is_file() for p in paths)
            reasons.append(message)
        if not required and not any_found:
            return None
        raise DatasetError(
            f"no mask folder holds a mask for every image of the VOC split {self.split!r}: "
            + "; ".join(reasons)
            + f"\nexpected layout:\n{VOC_LAYOUT}"
        )
