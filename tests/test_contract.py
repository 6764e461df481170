"""The 0.2 library contract: every defect a new user met in 0.1 is a clear error or fixed behaviour now.

One test (or more) per item of issue 14's list; each failed on 0.1 (6103ddc).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from ecaseg.cam import minmax_normalize
from ecaseg.carm import CARMGenerator
from ecaseg.cce_loss import CCELoss, cce_loss
from ecaseg.dino_features import DINOFeatures
from ecaseg.prototypes import MomentumPrototypes
from ecaseg.pseudo_label import refine_pseudo_label


def _dino(b: int = 2, grid: tuple[int, int] = (4, 4), d: int = 8, seed: int = 0) -> DINOFeatures:
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    return DINOFeatures(
        keys=torch.randn(b, n, d, generator=gen),
        cls_query=torch.randn(b, d, generator=gen),
        grid=grid,
        tokens=torch.randn(b, n, 6, generator=gen),
    )


def _cams(b: int = 2, c: int = 3, hw: tuple[int, int] = (4, 4), seed: int = 1) -> torch.Tensor:
    return minmax_normalize(torch.rand(b, c, *hw, generator=torch.Generator().manual_seed(seed)))


BG = "num_classes={} counts the background: expected {} {}, got {}"
LABELS = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


# --- CAM values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scale", "match"),
    [(25.0, r"cams must lie in \[0, 1\].*minmax_normalize"), (0.4, "not normalised per image and class")],
)
def test_unnormalised_cams_are_refused(scale: float, match: str) -> None:
    gen = CARMGenerator(num_classes=4, feature_dim=6)
    with pytest.raises(ValueError, match=match):
        gen(_cams() * scale, LABELS, _dino())


def test_negative_and_non_finite_cams_are_refused() -> None:
    gen = CARMGenerator(num_classes=4, feature_dim=6)
    with pytest.raises(ValueError, match=r"cams must lie in \[0, 1\], got values in \[-1"):
        gen(_cams() - 1.0, LABELS, _dino())
    cams = _cams()
    cams[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="cams holds 1 non-finite value"):
        gen(cams, LABELS, _dino())


def test_labels_must_be_zero_or_one() -> None:
    gen = CARMGenerator(num_classes=4, feature_dim=6)
    with pytest.raises(ValueError, match="labels must be multi-hot"):
        gen(_cams(), LABELS * 0.7, _dino())


def test_validate_false_skips_value_checks_but_not_shapes() -> None:
    gen = CARMGenerator(num_classes=4, feature_dim=6, validate=False)
    gen(_cams() * 25.0, LABELS, _dino())  # the caller vouches for the values
    with pytest.raises(ValueError, match=BG.format(4, 3, "CAM channels", 4)):
        gen(_cams(c=4), LABELS, _dino())


# --- non-finite inputs and state --------------------------------------------------------------------


def test_non_finite_keys_and_features_are_refused() -> None:
    gen = CARMGenerator(num_classes=4, feature_dim=6)
    dino = _dino()
    dino.keys[0, 3, 1] = float("inf")
    with pytest.raises(ValueError, match=r"dino\.keys holds 1 non-finite"):
        gen(_cams(), LABELS, dino)
    features = torch.randn(2, 6, 4, 4)
    features[1, 2] = float("nan")
    with pytest.raises(ValueError, match="features holds 16 non-finite"):
        gen(_cams(), LABELS, _dino(), features)


def test_one_non_finite_batch_cannot_poison_the_prototypes() -> None:
    gen = CARMGenerator(num_classes=4, feature_dim=6, validate=False)  # no host-side check at all
    clean = torch.randn(2, 6, 4, 4)
    gen(_cams(), LABELS, _dino(), clean)
    before = gen.prototypes.prototypes.clone() if gen.prototypes is not None else None
    poisoned = clean.clone()
    poisoned[:, :, 1:3] = float("nan")
    gen(_cams(), LABELS, _dino(), poisoned)
    assert gen.prototypes is not None and before is not None
    assert torch.isfinite(gen.prototypes.prototypes).all()
    assert all(torch.isfinite(v).all() for v in gen.state_dict().values() if v.is_floating_point())
    out = gen(_cams(), LABELS, _dino(), clean, update_prototypes=False)
    assert torch.isfinite(out.carm).all() and out.carm.amax() == 1.0
    gen(_cams(), LABELS, _dino(), clean)  # and it keeps learning from clean batches
    assert not torch.equal(gen.prototypes.prototypes, before)


def test_only_the_classes_touched_by_non_finite_tokens_skip_the_update() -> None:
    protos = MomentumPrototypes(num_classes=3, dim=2, momentum=0.5)
    tokens = torch.tensor([[[1.0, 0.0], [float("nan"), 0.0], [0.0, 2.0]]])
    seeds = torch.tensor([[[True, False, False], [False, True, False], [False, False, True]]])
    protos.update(tokens, seeds)
    assert protos.initialized.tolist() == [True, False, True]
    assert protos.prototypes.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]


def test_poisoned_state_dict_is_refused() -> None:
    protos = MomentumPrototypes(num_classes=3, dim=2)
    state = protos.state_dict()
    state["prototypes"] = torch.full((3, 2), float("nan"))
    with pytest.raises(ValueError, match="prototypes holds non-finite"):
        protos.load_state_dict(state)
    gen = CARMGenerator(num_classes=3, feature_dim=2)
    state = gen.state_dict()
    state["prototypes.prototypes"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"prototypes\.prototypes holds non-finite"):
        gen.load_state_dict(state)


def test_non_finite_scores_are_refused_by_the_pseudo_labeler() -> None:
    scores = torch.rand(1, 2, 4, 4)
    scores[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="scores holds 1 non-finite"):
        refine_pseudo_label(None, torch.rand(1, 3, 4, 4), scores, torch.ones(1, 2))


# --- one DINO object, grid and batch -------------------------------------------------------------------


def test_a_swapped_grid_is_refused() -> None:
    gen = CARMGenerator(num_classes=4, feature_dim=6)
    with pytest.raises(ValueError, match=r"CAM grid \(4, 16\) and the DINO grid \(16, 4\)"):
        gen(_cams(hw=(4, 16)), LABELS, _dino(grid=(16, 4)))
    out = gen(_cams(hw=(4, 16)), LABELS, _dino(grid=(4, 16)))
    assert out.carm.shape == (2, 4, 4, 16)


def test_dino_features_cannot_disagree() -> None:
    with pytest.raises(ValueError, match=r"grid \(3, 5\) has 15 patches but keys"):
        DINOFeatures(keys=torch.zeros(1, 16, 4), cls_query=torch.zeros(1, 4), grid=(3, 5))
    with pytest.raises(ValueError, match="cls_query must be"):
        DINOFeatures(keys=torch.zeros(1, 16, 4), cls_query=torch.zeros(2, 4), grid=(4, 4))
    gen = CARMGenerator(num_classes=4, feature_dim=6)
    with pytest.raises(ValueError, match="dino holds 1 images but cams hold 2"):
        gen(_cams(), LABELS, _dino(b=1))
    with pytest.raises(TypeError, match="dino must be the DINOFeatures"):
        gen(_cams(), LABELS, _dino().keys)  # type: ignore[arg-type]


def test_features_are_optional() -> None:
    raw = CARMGenerator(num_classes=4, calibrate=False)(_cams(), LABELS, _dino())
    assert torch.equal(raw.carm, raw.carm_raw)
    gen = CARMGenerator(num_classes=4, feature_dim=6)
    out = gen(_cams(), LABELS, _dino())  # prototypes from the DINO patch tokens
    assert gen.prototypes is not None and bool(gen.prototypes.initialized[0])
    assert out.carm.shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="feature_dim=5; build CARMGenerator"):
        CARMGenerator(num_classes=4, feature_dim=5)(_cams(), LABELS, _dino())
    with pytest.raises(ValueError, match="feature_dim is required with calibrate=True"):
        CARMGenerator(num_classes=4)


def test_eval_mode_stops_prototype_updates() -> None:
    gen = CARMGenerator(num_classes=4, feature_dim=6).eval()
    a = gen(_cams(), LABELS, _dino())
    b = gen(_cams(), LABELS, _dino())
    assert torch.equal(a.carm, b.carm)
    assert gen.prototypes is not None and not gen.prototypes.initialized.any()
    gen(_cams(), LABELS, _dino(), update_prototypes=True)  # an explicit request still updates
    assert gen.prototypes.initialized.any()
    gen.train()
    state = gen.prototypes.prototypes.clone()
    gen(_cams(), LABELS, _dino(seed=5))
    assert not torch.equal(gen.prototypes.prototypes, state)


def test_num_classes_counts_the_background_everywhere() -> None:
    gen = CARMGenerator(num_classes=21, feature_dim=6)
    with pytest.raises(ValueError, match=BG.format(21, 20, "CAM channels", 21)):
        gen(torch.zeros(1, 21, 4, 4), torch.zeros(1, 20), _dino(b=1))
    with pytest.raises(ValueError, match=BG.format(21, 20, "label columns", 21)):
        gen(torch.zeros(1, 20, 4, 4), torch.zeros(1, 21), _dino(b=1))
    from ecaseg.metrics import MultiLabelMetric

    with pytest.raises(ValueError, match="num_classes=21 counts the background"):
        MultiLabelMetric(num_classes=21).update(torch.zeros(1, 21), torch.zeros(1, 21))


# --- CCE: one signature, no silent zero ----------------------------------------------------------------


def _cce_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    cams = torch.randn(2, 2, 3, 4, 4, generator=gen)
    geo = torch.tensor([[0.0, 0.0, 32.0, 32.0, 0.0], [16.0, 8.0, 24.0, 24.0, 1.0]]).repeat(2, 1, 1)
    label = torch.randint(0, 4, (2, 8, 8), generator=gen)  # at CAM resolution of a 64 x 64 image
    return cams, geo, label


def test_cce_function_and_module_take_the_same_arguments() -> None:
    cams, geo, label = _cce_inputs()
    labels = torch.ones(2, 3)
    a = cce_loss(cams, geo, label, global_hw=(64, 64), labels=labels)
    b = CCELoss()(cams, geo, label, global_hw=(64, 64), labels=labels)
    torch.testing.assert_close(a, b)
    with pytest.raises(TypeError):
        cce_loss(cams, geo, label, labels)  # type: ignore[misc]
    with pytest.raises(TypeError):
        CCELoss()(cams, geo, label, labels)  # type: ignore[misc]


def test_cce_label_at_cam_resolution_needs_global_hw() -> None:
    cams, geo, label = _cce_inputs()
    with pytest.raises(ValueError, match=r"boxes reach .* global_hw is \(8, 8\).*pass global_hw=\(H, W\)"):
        cce_loss(cams, geo, label)
    assert float(cce_loss(cams, geo, label, global_hw=(64, 64))) > 0.0
    with pytest.raises(ValueError, match="global_label must hold integer class indices"):
        cce_loss(cams, geo, label.float(), global_hw=(64, 64))
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        cce_loss(cams, geo, label + 7, global_hw=(64, 64))


# --- light imports -------------------------------------------------------------------------------------

HEAVY = (
    "timm",
    "cv2",
    "pydensecrf",
    "tensorboard",
    "torch.utils.tensorboard",
    "torchvision",
    "ecaseg.engine",
)


@pytest.mark.parametrize(
    "statement",
    [
        "from ecaseg import CARMGenerator",
        "import ecaseg.carm",
        "import ecaseg.par",
        "import ecaseg.cce_loss",
        "import ecaseg.prototypes",
        "import ecaseg.pseudo_label",
        "import ecaseg.cam",
    ],
)
def test_method_blocks_import_light(statement: str) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        {statement}
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        print(",".join(heavy))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{statement} imported {out.stdout.strip()}"


def test_lazy_top_level_names_resolve() -> None:
    import ecaseg

    assert ecaseg.CARMGenerator is CARMGenerator
    assert set(ecaseg.__all__) <= set(dir(ecaseg))
    with pytest.raises(AttributeError, match="no attribute 'CARMGenerater'"):
        _ = ecaseg.CARMGenerater  # type: ignore[attr-defined]


# --- typing and layouts ---------------------------------------------------------------------------------


def test_string_options_are_literals() -> None:
    import typing

    from ecaseg.carm import FG_CUES, FgCue

    hints = typing.get_type_hints(CARMGenerator.__init__)
    assert hints["fg_cue"] == FgCue and typing.get_args(FgCue) == FG_CUES == ("cls", "contrast", "none")


def test_crf_takes_channels_first_images_like_every_other_block() -> None:
    import numpy as np

    from ecaseg.crf import DenseCRF

    gen = torch.Generator().manual_seed(4)
    hwc = torch.randint(0, 256, (2, 6, 7, 3), generator=gen, dtype=torch.uint8)
    probs = torch.rand(2, 3, 6, 7, generator=gen).softmax(dim=1)
    crf = DenseCRF(num_workers=0)
    expected = crf(hwc.numpy(), probs)
    assert torch.equal(crf(hwc.permute(0, 3, 1, 2), probs), expected)
    assert torch.equal(crf(hwc.permute(0, 3, 1, 2).float() / 255.0, probs), expected)
    with pytest.raises(ValueError, match=r"float images must be RGB in \[0, 1\]"):
        crf(hwc.permute(0, 3, 1, 2).float(), probs)
    with pytest.raises(ValueError, match="probs must be finite class probabilities"):
        crf(hwc.numpy(), probs * float("nan"))
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        crf(np.zeros((2, 6, 7), np.uint8), probs)


def test_unlabelled_channels_may_hold_anything_finite() -> None:
    """The contract table: absent classes are zeroed, so only labelled maps must be normalised."""
    gen = CARMGenerator(num_classes=4, feature_dim=6)
    cams = _cams()
    cams[0, 1] = 7.0  # class 2 is not labelled in image 0
    out = gen(cams, LABELS, _dino())
    assert torch.all(out.carm[0, 2] == 0)
    cams[0, 0, 0, 0] = 7.0  # class 1 is labelled in image 0
    with pytest.raises(ValueError, match=r"cams must lie in \[0, 1\]"):
        gen(cams, LABELS, _dino())
    cams[0, 0, 0, 0] = 0.5
    cams[0, 1, 0, 0] = float("nan")  # non-finite values are refused everywhere
    with pytest.raises(ValueError, match="non-finite"):
        gen(cams, LABELS, _dino())
