"""In-domain DINO pretraining of an affinity ViT, and a measurement of how meaningful its affinity is.

ECA reads its class-agnostic affinity graph (Eq. (4)) and foreground cue (Eq. (5)) from a frozen DINO ViT
pretrained on ImageNet. In other domains (medical, remote sensing, microscopy) such a ViT may see images
unlike anything it was trained on. This package trains one with DINO self-distillation on the unlabelled
images of any folder (or any dataset that yields images); no label and no mask is ever read.

* :class:`DINOPretrainConfig` -- every knob of the recipe (crops, head, temperatures, schedules, optimiser).
* :func:`pretrain_dino` -- train and write the **teacher** backbone as a plain state dict with timm
  ``VisionTransformer`` key names, loadable by ``DINOAffinity(<variant>, weights=<file>)``.
* Building blocks, each a pure function (plus :class:`DINOHead`): :func:`multi_crop`,
  :func:`dino_loss`, :func:`update_center`, :func:`ema_update`, :func:`cosine_schedule`.
* :func:`affinity_auc` -- ROC AUC of :func:`ecaseg.carm.affinity_graph` values for same-object versus
  different-class patch pairs of ground-truth masks (masks are used for the measurement only), with the
  rank-based :func:`mann_whitney_auc`; :func:`foreground_cue_auc` -- ROC AUC of the foreground cues (the
  class-token cue of Eq. (5) and the contrast cue) for object versus background patches.
* The command line (``python -m ecaseg.engine.dino_pretrain --images DIR --out FILE``, the same as
  ``ecaseg pretrain-dino``) lives in ``ecaseg.cli`` (``pretrain_dino_main``); ``main`` and
  ``build_parser`` of this package still resolve to it, imported on first use.

One file per concern, every public name re-exported here:

========================================  ===============================================================
``config``                                :class:`DINOPretrainConfig`
``data``                                  :class:`ImageFolder` (and the square-cut loader dataset)
``augment``                               :func:`random_resized_crops`, :func:`color_augment`,
                                          :func:`gaussian_blur`, :func:`multi_crop`
``head``                                  :class:`DINOHead` (and backbone + head for multi-crop views)
``loss``                                  :func:`dino_loss`, :func:`teacher_entropies`,
                                          :func:`update_center`, :func:`ema_update`
``schedule``                              :func:`cosine_schedule`
``loop``                                  :func:`pretrain_dino`, :func:`resume_path`
``metrics``                               :func:`affinity_auc`, :func:`foreground_cue_auc`,
                                          :func:`mann_whitney_auc`, :func:`patch_majority`
``__main__``                              ``python -m ecaseg.engine.dino_pretrain``
========================================  ===============================================================

Layout: engine layer; imports ``ecaseg.data``, ``ecaseg.dino_affinity``, ``ecaseg.carm`` and
``ecaseg.utils``; never ``ecaseg.cli`` at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

from ecaseg.engine.dino_pretrain.augment import color_augment, gaussian_blur, multi_crop, random_resized_crops
from ecaseg.engine.dino_pretrain.config import DINOPretrainConfig
from ecaseg.engine.dino_pretrain.data import ImageFolder
from ecaseg.engine.dino_pretrain.head import DINOHead
from ecaseg.engine.dino_pretrain.loop import pretrain_dino, resume_path
from ecaseg.engine.dino_pretrain.loss import dino_loss, ema_update, teacher_entropies, update_center
from ecaseg.engine.dino_pretrain.metrics import (
    affinity_auc,
    foreground_cue_auc,
    mann_whitney_auc,
    patch_majority,
)
from ecaseg.engine.dino_pretrain.schedule import cosine_schedule

__all__ = [
    "DINOHead",
    "DINOPretrainConfig",
    "ImageFolder",
    "affinity_auc",
    "color_augment",
    "cosine_schedule",
    "dino_loss",
    "ema_update",
    "foreground_cue_auc",
    "gaussian_blur",
    "mann_whitney_auc",
    "multi_crop",
    "patch_majority",
    "pretrain_dino",
    "random_resized_crops",
    "resume_path",
    "teacher_entropies",
    "update_center",
]

#: Former names of the command line, now in ``ecaseg.cli`` (a higher layer), resolved on first use.
_CLI_NAMES: dict[str, str] = {
    "build_parser": "build_pretrain_dino_parser",
    "main": "pretrain_dino_main",
    "run_from_args": "run_pretrain_dino",
}


def __getattr__(name: str) -> Any:
    target = _CLI_NAMES.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("ecaseg.cli"), target)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CLI_NAMES))
