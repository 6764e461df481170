"""ecaseg: weakly supervised semantic segmentation with DINO-derived class-aware affinity (ECA).

The method blocks are importable from the top level (``from ecaseg import CARMGenerator``); each lives in
its own module with a functional form beside the module class:

* :mod:`ecaseg.cam` — :class:`~ecaseg.cam.CAM`, :class:`~ecaseg.cam.MultiScaleCAM` (Eq. 1-2)
* :mod:`ecaseg.carm` — :class:`~ecaseg.carm.CARMGenerator`, the SAE module (Eq. 3-7, with calibration)
* :mod:`ecaseg.prototypes` — :class:`~ecaseg.prototypes.MomentumPrototypes` (Eq. 8-10)
* :mod:`ecaseg.cce_loss` — :class:`~ecaseg.cce_loss.CCELoss` (Eq. 11)
* :mod:`ecaseg.seg_loss` — :class:`~ecaseg.seg_loss.SegmentationLoss` (Eq. 12)
* :mod:`ecaseg.pseudo_label` — :class:`~ecaseg.pseudo_label.PseudoLabeler` (thresholding + PAR)
* :mod:`ecaseg.refine` — :class:`~ecaseg.refine.CAMRefiner` (CAMs made anywhere -> pseudo-labels: threshold,
  CRF, PAR, random walk, CARM, CARM + PAR)
* :mod:`ecaseg.par` — :class:`~ecaseg.par.PAR`; :mod:`ecaseg.affinity` —
  :class:`~ecaseg.affinity.AffinityLoss`; :mod:`ecaseg.crf` — :class:`~ecaseg.crf.DenseCRF`
* :mod:`ecaseg.dino_affinity` — :class:`~ecaseg.dino_affinity.DINOAffinity`; :mod:`ecaseg.models` —
  :class:`~ecaseg.models.ECANet`
* :mod:`ecaseg.engine` — :class:`~ecaseg.engine.ECATrainer`

Top-level names are resolved lazily (PEP 562): ``from ecaseg import CARMGenerator`` imports
:mod:`ecaseg.carm` and torch only, not timm, OpenCV, pydensecrf, TensorBoard or the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: Top-level name -> the module that defines it.
_LAZY: dict[str, str] = {
    "AffinityLoss": "ecaseg.affinity",
    "CAM": "ecaseg.cam",
    "MultiScaleCAM": "ecaseg.cam",
    "CARMGenerator": "ecaseg.carm",
    "CARMOutput": "ecaseg.carm",
    "CARMSettings": "ecaseg.dino_features",
    "CAMRefiner": "ecaseg.refine",
    "CCELoss": "ecaseg.cce_loss",
    "CRFParams": "ecaseg.crf",
    "DenseCRF": "ecaseg.crf",
    "DINOAffinity": "ecaseg.dino_affinity",
    "DINOFeatures": "ecaseg.dino_features",
    "ECATrainer": "ecaseg.engine.trainer",
    "SegmentationMetric": "ecaseg.metrics",
    "ECANet": "ecaseg.models",
    "PAR": "ecaseg.par",
    "MomentumPrototypes": "ecaseg.prototypes",
    "PseudoLabeler": "ecaseg.pseudo_label",
    "SegmentationLoss": "ecaseg.seg_loss",
}

__all__ = [
    "CAM",
    "PAR",
    "AffinityLoss",
    "CAMRefiner",
    "CARMGenerator",
    "CARMOutput",
    "CARMSettings",
    "CCELoss",
    "CRFParams",
    "DINOAffinity",
    "DINOFeatures",
    "DenseCRF",
    "ECANet",
    "ECATrainer",
    "MomentumPrototypes",
    "MultiScaleCAM",
    "PseudoLabeler",
    "SegmentationLoss",
    "SegmentationMetric",
    "__version__",
]

if TYPE_CHECKING:
    from ecaseg.affinity import AffinityLoss
    from ecaseg.cam import CAM, MultiScaleCAM
    from ecaseg.carm import CARMGenerator, CARMOutput
    from ecaseg.cce_loss import CCELoss
    from ecaseg.crf import CRFParams, DenseCRF
    from ecaseg.dino_affinity import DINOAffinity
    from ecaseg.dino_features import CARMSettings, DINOFeatures
    from ecaseg.engine.trainer import ECATrainer
    from ecaseg.metrics import SegmentationMetric
    from ecaseg.models import ECANet
    from ecaseg.par import PAR
    from ecaseg.prototypes import MomentumPrototypes
    from ecaseg.pseudo_label import PseudoLabeler
    from ecaseg.refine import CAMRefiner
    from ecaseg.seg_loss import SegmentationLoss


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ecaseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
