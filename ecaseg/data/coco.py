"""MS COCO 2014 with VOC-style single-channel masks (81 values: background + 80 things, 255 = ignore)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ecaseg.data.base import SegmentationDataset, Transform, missing_files_message, read_id_file
from ecaseg.data.classes import COCO_CLASSES
from ecaseg.data.labels import load_or_compute_mask_labels
from ecaseg.errors import DatasetError

__all__ = ["COCO_LAYOUT", "COCOSegDataset"]

COCO_LAYOUT = """\
coco/                              <- root
├── train2014/                     COCO_train2014_000000000009.jpg ...
├── val2014/                       COCO_val2014_000000000042.jpg ...
│                                  (root/JPEGImages/{train2014,val2014}/ is accepted too)
├── SegmentationClass/
│   ├── train2014/                 COCO_train2014_000000000009.png ... (values 0..80 and 255)
│   └── val2014/                   COCO_val2014_000000000042.png ...
└── ImageSets/                     (optional) train.txt, val.txt: ids to use (default: every mask)"""

_YEAR = {"train": "train2014", "val": "val2014", "train2014": "train2014", "val2014": "val2014"}


def _image_dir(root: Path, folder: str) -> Path | None:
    for candidate in (root / folder, root / "JPEGImages" / folder):
        if candidate.is_dir():
            return candidate
    return None


class COCOSegDataset(SegmentationDataset):
    """MS COCO 2014 for WSSS (81 classes, background first, things in COCO category order).

    Layout (see ``COCO_LAYOUT`` and the datasets page): images in ``root/{train2014,val2014}/`` (or
    ``root/JPEGImages/{train2014,val2014}/``), masks in ``root/SegmentationClass/{train2014,val2014}/``
    named like the images with ``.png``.

    Splits: ``"train"`` / ``"val"`` (aliases ``"train2014"`` / ``"val2014"``) use the ids of
    ``root/ImageSets/{train,val}.txt`` when that file exists, else every mask of the split's folder (sorted).
    Any other value is a path to an id list; each id is looked up in ``train2014`` then ``val2014``.

    Images whose mask holds no object (no foreground class) are dropped when ``drop_empty`` is True, the
    default for ``train`` and ``val`` — this gives the paper's 82,081 train and 40,137 val images; id-list
    splits keep every listed image unless ``drop_empty=True``.

    Args:
        root: the COCO folder.
        split: ``"train"``, ``"val"`` or a path to an id list.
        transform: ``transform(image, mask) -> dict`` or None.
        cache_dir: folder for the label cache (default: beside the data, or the user cache if not writable).
        drop_empty: drop images without any foreground class (default: True for named splits).

    Raises:
        DatasetError: missing root/folders (the message shows the expected layout), missing images or masks
            (named), unreadable masks or invalid mask values.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | os.PathLike[str] = "train",
        transform: Transform | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        drop_empty: bool | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(
                f"COCO root {self.root} does not exist or is not a folder; expected layout:\n{COCO_LAYOUT}"
            )
        self.split = os.fspath(split)
        mask_root = self.root / "SegmentationClass"
        if self.split in _YEAR:
            folder = _YEAR[self.split]
            image_dir = _image_dir(self.root, folder)
            mask_dir = mask_root / folder
            if image_dir is None:
                raise DatasetError(
                    f"COCO image folder {self.root / folder} is missing (nor "
                    f"{self.root / 'JPEGImages' / folder}); expected layout:\n{COCO_LAYOUT}"
                )
            if not mask_dir.is_dir():
                raise DatasetError(f"COCO mask folder {mask_dir} is missing; expected layout:\n{COCO_LAYOUT}")
            short = folder[: -len("2014")]
            id_file = self.root / "ImageSets" / f"{short}.txt"
            if id_file.is_file():
                ids = read_id_file(id_file)
            else:
                ids = sorted(p.stem for p in mask_dir.glob("*.png"))
            image_paths = [image_dir / f"{i}.jpg" for i in ids]
            mask_paths = [mask_dir / f"{i}.png" for i in ids]
            cache_name = f"coco-{short}"
            drop = True if drop_empty is None else drop_empty
        else:
            id_file = Path(self.split).expanduser()
            if not id_file.is_file():
                raise DatasetError(
                    f"unknown COCO split {self.split!r}: expected 'train', 'val' or the path of a text file "
                    "of image ids"
                )
            ids = read_id_file(id_file)
            image_paths, mask_paths = [], []
            dirs = [(d, _image_dir(self.root, d), mask_root / d) for d in ("train2014", "val2014")]
            if all(img is None for _, img, _ in dirs):
                raise DatasetError(f"no COCO image folder under {self.root}; expected layout:\n{COCO_LAYOUT}")
            for i in ids:
                chosen = next(
                    ((img, msk) for _, img, msk in dirs if img is not None and (msk / f"{i}.png").is_file()),
                    None,
                )
                if chosen is None:  # report it below as a missing mask of the first folder
                    first = next(img for _, img, _ in dirs if img is not None)
                    chosen = (first, mask_root / first.name)
                image_paths.append(chosen[0] / f"{i}.jpg")
                mask_paths.append(chosen[1] / f"{i}.png")
            digest = hashlib.sha256(str(id_file.resolve()).encode()).hexdigest()[:10]
            cache_name = f"coco-ids-{id_file.stem}-{digest}"
            drop = bool(drop_empty)
        if not ids:
            raise DatasetError(f"COCO split {self.split!r} holds no image id (no mask found)")
        for paths, what in ((image_paths, "images"), (mask_paths, "masks")):
            message = missing_files_message(paths, f"{what} of the COCO split {self.split!r}")
            if message:
                raise DatasetError(message)
        labels = load_or_compute_mask_labels(
            ids,
            mask_paths,
            len(COCO_CLASSES),
            data_root=self.root,
            cache_name=cache_name,
            cache_dir=cache_dir,
        )
        self._set_items(
            ids=ids,
            image_paths=image_paths,
            mask_paths=mask_paths,
            labels=labels,
            class_names=COCO_CLASSES,
            transform=transform,
        )
        #: number of images dropped because their mask holds no object
        self.num_dropped = 0
        if drop:
            keep = np.asarray(self.labels.any(axis=1), dtype=bool)
            self.num_dropped = int(len(keep) - np.count_nonzero(keep))
            self.subset(keep)
            if not self.ids:
                raise DatasetError(f"every image of the COCO split {self.split!r} has an empty mask")
