"""Checked by ``mypy --strict`` in scripts/test.sh (not run by pytest): the public calls are typed.

``assert_type`` fails the type check when an expression is ``Any`` (as module calls were in 0.1), so a
typo such as ``out.carmm`` is caught in a user's code.
"""

from __future__ import annotations

import numpy as np
import torch
from typing_extensions import assert_type

from ecaseg import (
    CAM,
    PAR,
    AffinityLoss,
    CARMGenerator,
    CARMOutput,
    CCELoss,
    DenseCRF,
    DINOAffinity,
    DINOFeatures,
    MomentumPrototypes,
    MultiScaleCAM,
    PseudoLabeler,
    SegmentationLoss,
)
from ecaseg.carm import FgCue


def check_calls() -> None:
    images = torch.rand(1, 3, 32, 32)
    labels = torch.ones(1, 2)
    dino = DINOAffinity("vit_nano_p8", allow_random_init=True)
    feats = dino(images)
    assert_type(feats, DINOFeatures)
    cue: FgCue = "cls"
    gen = CARMGenerator(num_classes=3, feature_dim=96, fg_cue=cue)
    cams = torch.rand(1, 2, 4, 4)
    out = gen(cams, labels, feats)
    assert_type(out, CARMOutput)
    assert_type(out.carm, torch.Tensor)
    assert_type(gen(cams, labels, feats, None, update_prototypes=False), CARMOutput)
    assert_type(MomentumPrototypes(3, 4)(torch.rand(1, 3, 5), torch.rand(1, 5, 4), labels), torch.Tensor)
    geo = torch.zeros(1, 1, 5)
    assert_type(
        CCELoss()(torch.rand(1, 1, 2, 2, 2), geo, torch.zeros(1, 4, 4, dtype=torch.long)), torch.Tensor
    )
    assert_type(PAR()(images, torch.rand(1, 3, 32, 32)), torch.Tensor)
    assert_type(PseudoLabeler(PAR())(images, cams, labels), torch.Tensor)
    assert_type(CAM()(torch.rand(1, 8, 4, 4), torch.rand(2, 8)), torch.Tensor)
    assert_type(
        SegmentationLoss()(torch.rand(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)), torch.Tensor
    )
    assert_type(AffinityLoss()(torch.rand(1, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long)), torch.Tensor)
    assert_type(DenseCRF()(np.zeros((1, 3, 4, 4), np.uint8), torch.rand(1, 3, 4, 4)), torch.Tensor)
    _ = MultiScaleCAM()
