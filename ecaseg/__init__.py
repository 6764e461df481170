"""ecaseg: weakly supervised semantic segmentation with DINO-derived class-aware affinity (ECA).

The method blocks are importable from the top level (``from ecaseg import CARMGenerator``); each lives in
its own module with a functional form beside the module class:

* :mod:`ecaseg.cam` — :class:`CAM`, :class:`MultiScaleCAM` (Eq. 1-2)
* :mod:`ecaseg.carm` — :class:`CARMGenerator`, the SAE module (Eq. 3-7, with calibration)
* :mod:`ecaseg.prototypes` — :class:`MomentumPrototypes` (Eq. 8-10)
* :mod:`ecaseg.cce_loss` — :class:`CCELoss` (Eq. 11)
* :mod:`ecaseg.seg_loss` — :class:`SegmentationLoss` (Eq. 12)
* :mod:`ecaseg.pseudo_label` — :class:`PseudoLabeler` (thresholding + PAR)
* :mod:`ecaseg.par` — :class:`PAR`; :mod:`ecaseg.affinity` — :class:`AffinityLoss`;
  :mod:`ecaseg.crf` — :class:`DenseCRF`
* :mod:`ecaseg.dino_affinity` — :class:`DINOAffinity`; :mod:`ecaseg.models` — :class:`ECANet`
* :mod:`ecaseg.engine` — :class:`ECATrainer`
"""

from ecaseg.affinity import AffinityLoss
from ecaseg.cam import CAM, MultiScaleCAM
from ecaseg.carm import CARMGenerator, CARMOutput
from ecaseg.cce_loss import CCELoss
from ecaseg.crf import CRFParams, DenseCRF
from ecaseg.dino_affinity import DINOAffinity, DINOFeatures
from ecaseg.engine.trainer import ECATrainer
from ecaseg.metrics import SegmentationMetric
from ecaseg.models import ECANet
from ecaseg.par import PAR
from ecaseg.prototypes import MomentumPrototypes
from ecaseg.pseudo_label import PseudoLabeler
from ecaseg.seg_loss import SegmentationLoss

__version__ = "0.1.0"

__all__ = [
    "CAM",
    "PAR",
    "AffinityLoss",
    "CARMGenerator",
    "CARMOutput",
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
