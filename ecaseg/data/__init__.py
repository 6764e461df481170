"""Datasets, image-level labels, transforms and CCE local views.

Everything public is re-exported here; see the datasets page of the documentation for the on-disk layouts.
"""

from ecaseg.data.base import IMAGE_EXTENSIONS, SegmentationDataset, read_id_file
from ecaseg.data.classes import (
    COCO_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VOC_CLASSES,
    colorize_mask,
    voc_palette,
)
from ecaseg.data.coco import COCO_LAYOUT, COCOSegDataset
from ecaseg.data.folder import FolderDataset, parse_labels_file, resolve_class_names
from ecaseg.data.io import check_mask_values, read_image, read_mask, write_mask
from ecaseg.data.labels import (
    default_cache_dir,
    labels_from_mask,
    load_or_compute_mask_labels,
    mask_labels_fingerprint,
)
from ecaseg.data.transforms import (
    EvalTransform,
    TrainTransform,
    denormalize,
    normalize,
    normalize_crops,
    normalize_image,
    worker_init,
)
from ecaseg.data.views import LocalViews, LocalViewSampler, adjust_hue, view_sampling_grid
from ecaseg.data.voc import VOC_LAYOUT, VOC_SPLITS, VOCAugDataset

__all__ = [
    "COCO_CLASSES",
    "COCO_LAYOUT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "VOC_CLASSES",
    "VOC_LAYOUT",
    "VOC_SPLITS",
    "COCOSegDataset",
    "EvalTransform",
    "FolderDataset",
    "LocalViewSampler",
    "LocalViews",
    "SegmentationDataset",
    "TrainTransform",
    "VOCAugDataset",
    "adjust_hue",
    "check_mask_values",
    "colorize_mask",
    "default_cache_dir",
    "denormalize",
    "labels_from_mask",
    "load_or_compute_mask_labels",
    "mask_labels_fingerprint",
    "normalize",
    "normalize_crops",
    "normalize_image",
    "parse_labels_file",
    "read_id_file",
    "read_image",
    "read_mask",
    "resolve_class_names",
    "view_sampling_grid",
    "voc_palette",
    "worker_init",
    "write_mask",
]
