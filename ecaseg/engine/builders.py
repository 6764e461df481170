"""Build datasets, networks and method blocks from a :class:`~ecaseg.engine.config.Config`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ecaseg.carm import CARMGenerator
from ecaseg.data import (
    COCOSegDataset,
    EvalTransform,
    FolderDataset,
    SegmentationDataset,
    TrainTransform,
    VOCAugDataset,
)
from ecaseg.data.synthetic import SyntheticConfig, SyntheticWSSSDataset
from ecaseg.dino_affinity import DINOAffinity
from ecaseg.engine.config import Config
from ecaseg.engine.pseudo import PseudoLabelPipeline
from ecaseg.errors import ConfigError
from ecaseg.models import ECANet
from ecaseg.models.timm_backbone import TIMM_PREFIX, is_timm_backbone
from ecaseg.par import PAR

__all__ = [
    "build_carm_generator",
    "build_dataset",
    "build_dino",
    "build_model",
    "build_par",
    "build_pseudo_labeler",
    "needs_dino",
    "resolve_weights",
    "synthetic_config",
]


def synthetic_config(cfg: Config) -> SyntheticConfig:
    """The :class:`~ecaseg.data.synthetic.SyntheticConfig` described by ``cfg.data.synthetic_*``."""
    d = cfg.data
    return SyntheticConfig(
        seed=d.synthetic_seed,
        image_size=d.synthetic_image_size,
        num_fg_classes=d.synthetic_num_classes,
        num_train=d.synthetic_num_train,
        num_val=d.synthetic_num_val,
        context_prob=d.synthetic_context_prob,
        spurious_context_prob=d.synthetic_spurious_context_prob,
    )


def build_dataset(
    cfg: Config, split: str, train: bool, *, uint8: bool = False, masks: bool = True
) -> Dataset[dict[str, Any]]:
    """The dataset of ``split`` with the training or evaluation transform of ``cfg``.

    ``uint8``: training crops stay ``uint8`` (normalised on the device by
    :func:`~ecaseg.data.normalize_crops`); ``masks=False``: mask files are not read (weakly supervised
    training; the synthetic dataset draws its masks anyway).
    """
    d = cfg.data
    transform: Any
    if train:
        transform = TrainTransform(
            crop_size=d.crop_size,
            resize_long=d.resize_long,
            scale_range=d.scale_range,
            hflip=d.hflip,
            uint8=uint8,
        )
    else:
        transform = EvalTransform()
    dataset = _build_dataset(cfg, split, transform)
    if not masks and isinstance(dataset, SegmentationDataset):
        dataset.load_masks = False
    return dataset


def _build_dataset(cfg: Config, split: str, transform: Any) -> Dataset[dict[str, Any]]:
    d = cfg.data
    cache_dir = d.cache_dir or None
    if d.dataset == "voc":
        return VOCAugDataset(d.root, split=split, transform=transform, cache_dir=cache_dir)
    if d.dataset == "coco":
        return COCOSegDataset(d.root, split=split, transform=transform, cache_dir=cache_dir)
    if d.dataset == "synthetic":
        if split not in ("train", "val"):
            raise ConfigError(f"the synthetic dataset has splits 'train' and 'val', got {split!r}")
        return SyntheticWSSSDataset(split=split, config=synthetic_config(cfg), transform=transform)
    if d.dataset == "folder":
        if not d.images_dir or not d.labels_file:
            raise ConfigError("data.dataset=folder needs data.images_dir and data.labels_file")
        return build_folder_dataset(cfg, split, transform)
    raise ConfigError(f"unknown data.dataset {d.dataset!r}; valid choices: voc, coco, folder, synthetic")


def folder_class_names(cfg: Config) -> tuple[str, ...] | str | None:
    """The class names of a folder dataset: ``data.class_names``, ``data.classes_file``, a ``classes.txt``
    beside the labels file (or in the images folder's parent), else None (the VOC classes)."""
    d = cfg.data
    if d.class_names:
        return tuple(d.class_names)
    if d.classes_file:
        return d.classes_file
    for folder in (
        Path(d.labels_file).expanduser().parent if d.labels_file else None,
        Path(d.images_dir).parent,
    ):
        if folder is not None and (folder / "classes.txt").is_file():
            return str(folder / "classes.txt")
    return None


def build_folder_dataset(cfg: Config, split: str, transform: Any) -> FolderDataset:
    """A folder dataset's ``split``: ``data.val_split`` is the val labels file or the held-out fraction."""
    d = cfg.data
    common: dict[str, Any] = {
        "masks_dir": d.masks_dir or None,
        "class_names": folder_class_names(cfg),
        "transform": transform,
        "cache_dir": d.cache_dir or None,
    }
    is_val = split == d.val_split
    if is_val and d.val_masks_dir:
        common["masks_dir"] = d.val_masks_dir
    if d.val_labels_file:
        labels = d.val_labels_file if is_val else d.labels_file
        images = d.val_images_dir if is_val and d.val_images_dir else d.images_dir
        return FolderDataset(images, labels or None, **common)
    if d.val_fraction <= 0.0:
        if is_val:
            raise ConfigError(
                "a folder dataset has no val split: set data.val_labels_file, or data.val_fraction > 0 "
                "to hold out a share of the labelled images"
            )
        return FolderDataset(d.images_dir, d.labels_file or None, **common)
    return FolderDataset(
        d.images_dir,
        d.labels_file or None,
        subset="val" if is_val else "train",
        val_fraction=d.val_fraction,
        split_seed=cfg.train.seed,
        **common,
    )


def build_model(cfg: Config, num_classes: int, load_weights: bool = True) -> ECANet:
    """The segmentation network (MiT backbone, SegFormer head, classifier, affinity projection).

    ImageNet weights for the backbone are required unless ``model.allow_random_backbone`` is set (the paper
    starts from ImageNet-1k; a silent random start would only look like a bad run). ``load_weights=False``
    builds the architecture alone, for restoring an ecaseg checkpoint.
    """
    m = cfg.model
    weights: str | None = None
    if load_weights:
        if m.backbone_weights.startswith("packaged:"):
            weights = resolve_weights(m.backbone_weights)
        elif m.backbone_weights:
            if not Path(m.backbone_weights).exists() and is_timm_backbone(m.backbone):
                raise ConfigError(
                    f"model.backbone_weights {m.backbone_weights} does not exist; point it to the state-dict "
                    f"file of the timm model {m.backbone[len(TIMM_PREFIX) :]!r} (pytorch_model.bin or "
                    "model.safetensors)"
                )
            if not Path(m.backbone_weights).exists():
                raise ConfigError(
                    f"model.backbone_weights {m.backbone_weights} does not exist; download the SegFormer "
                    f"ImageNet encoder ({m.backbone}.pth, NVlabs release, or the "
                    f"nvidia/{m.backbone.replace('_', '-')} "
                    "Hugging Face folder) and point model.backbone_weights to it"
                )
            weights = m.backbone_weights
        elif not m.allow_random_backbone:
            raise ConfigError(
                "model.backbone_weights is empty: set it to the ImageNet checkpoint "
                f"({m.backbone}.pth) or set model.allow_random_backbone=true to train from scratch"
            )
    return ECANet(
        backbone=m.backbone,
        num_classes=num_classes,
        backbone_weights=weights,
        strides=m.strides,
        decoder_dim=m.decoder_dim,
        attn_blocks=m.attn_blocks,
    )


def needs_dino(cfg: Config) -> bool:
    """Whether the configured method uses CARM (and so the frozen affinity ViT)."""
    m = cfg.method
    return not m.fully_supervised and (m.use_carm_seg or m.aff_source == "carm")


def resolve_weights(path: str) -> str | None:
    """``""`` -> ``None``; ``"packaged:NAME"`` -> the file ``NAME`` shipped in ``ecaseg/assets``."""
    if not path:
        return None
    if path.startswith("packaged:"):
        name = path.split(":", 1)[1]
        asset = resources.files("ecaseg") / "assets" / name
        if not asset.is_file():
            raise ConfigError(f"no packaged weights {name!r} in ecaseg/assets")
        return str(asset)
    return path


def build_dino(cfg: Config) -> DINOAffinity:
    """The frozen affinity ViT of ``model.dino`` with ``model.dino_weights`` (a path or ``packaged:NAME``)."""
    m = cfg.model
    return DINOAffinity(
        name=m.dino, weights=resolve_weights(m.dino_weights), allow_random_init=m.dino_allow_random_init
    )


def build_carm_generator(cfg: Config, num_classes: int, feature_dim: int) -> CARMGenerator:
    """The SAE module (seeds, affinity graph, CARM, momentum-prototype calibration)."""
    m = cfg.method
    return CARMGenerator(
        num_classes=num_classes,
        feature_dim=feature_dim,
        k=m.k,
        gamma=m.gamma,
        momentum=m.momentum,
        calibrate=m.calibrate,
        fg_cue=m.fg_cue,
        validate=False,  # the training loop never waits on the host for input checks
    )


def build_par(cfg: Config) -> PAR:
    """Pixel-adaptive refinement with the configured dilations, iterations and kernel weights."""
    m = cfg.method
    return PAR(dilations=m.par_dilations, num_iter=m.par_iters, w1=m.par_w1, w2=m.par_w2, validate=False)


def build_pseudo_labeler(
    cfg: Config,
    net: ECANet,
    par: PAR | None,
    dino: DINOAffinity | None = None,
    carm_generator: CARMGenerator | None = None,
) -> PseudoLabelPipeline:
    """The online pseudo-label path of the config's ``method`` section (training, validation, export)."""
    m = cfg.method
    return PseudoLabelPipeline(
        net,
        par,
        dino,
        carm_generator,
        cam_scales=m.cam_scales,
        cam_flip=m.cam_flip,
        alpha=m.alpha,
        band=m.band,
        par_downsample=m.par_downsample,
        carm_background=m.carm_background,
        cam_rule=m.cam_rule,
        par_input=m.par_input,
    )
