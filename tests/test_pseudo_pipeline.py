"""The trainer's pseudo-label pipeline refines each score source once; that must equal the per-threshold
refinement of :func:`ecaseg.pseudo_label.refine_pseudo_label` (AFA's way) exactly."""

from __future__ import annotations

import torch

from ecaseg.cam import cam_to_label
from ecaseg.engine.pseudo import PseudoLabelPipeline
from ecaseg.models import ECANet
from ecaseg.par import PAR
from ecaseg.pseudo_label import refine_pseudo_label


def test_single_refinement_equals_refinement_per_threshold() -> None:
    torch.manual_seed(0)
    par = PAR(dilations=(1, 2, 4), num_iter=3)
    pipeline = PseudoLabelPipeline(
        ECANet("mit_nano", num_classes=4), par, alpha=0.5, band=(0.35, 0.55), par_downsample=1
    )
    rgb = torch.rand(2, 3, 24, 28)
    scores = torch.rand(2, 3, 6, 7)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    crop_box = torch.tensor([[0, 20, 2, 28], [3, 24, 0, 25]])
    (refined,) = pipeline._refine_scores(rgb, [scores], labels)
    for band in (None, (0.35, 0.55)):
        ours = cam_to_label(refined, labels, alpha=0.5, band=band, crop_box=crop_box)
        reference = refine_pseudo_label(par, rgb, scores, labels, alpha=0.5, band=band, crop_box=crop_box)
        assert torch.equal(ours, reference), band
    assert refined[0, 1].abs().max() == 0  # absent classes stay zero through PAR


def test_pipeline_outputs_and_shapes() -> None:
    torch.manual_seed(0)
    net = ECANet("mit_nano", num_classes=4).eval()
    pipeline = PseudoLabelPipeline(
        net, PAR(dilations=(1, 2), num_iter=2), cam_scales=(1.0, 0.5), par_downsample=2
    )
    images = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    crop_box = torch.tensor([[0, 64, 0, 48], [0, 32, 0, 64]])
    out = pipeline(images, labels, crop_box=crop_box, with_carm=False)
    assert out.cams.shape == (2, 3, 4, 4)
    assert out.cam_label.shape == (2, 64, 64) and out.cam_label_band is not None
    assert (out.cam_label[0, :, 48:] == 255).all() and (out.cam_label[1, 32:] == 255).all()
    present = {int(v) for v in out.cam_label[1].unique()}
    assert present <= {0, 2, 255}  # only background, the labelled class and ignore
    assert out.carm is None and out.carm_label is None


def test_compact_refinement_of_labelled_channels_is_exact() -> None:
    torch.manual_seed(1)
    par = PAR(dilations=(1, 2), num_iter=3)
    pipeline = PseudoLabelPipeline(ECANet("mit_nano", num_classes=6), par, par_downsample=1)
    rgb = torch.rand(3, 3, 20, 20)
    cams, carm = torch.rand(3, 5, 5, 5), torch.rand(3, 5, 5, 5)
    labels = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [1, 1, 0, 1, 0]])
    full = pipeline._refine_scores(rgb, [cams, carm], labels)
    compact = pipeline._refine_scores(rgb, [cams, carm], labels, max_labels=3)
    for a, b in zip(full, compact):
        assert torch.allclose(a, b, atol=1e-6)
        assert b[1, [0, 1, 3, 4]].abs().max() == 0  # absent classes stay empty after the scatter


def test_afa_rules_and_random_walk_label() -> None:
    """AFA's CAM rule and softmax PAR path in the pipeline, and the propagated label of AFA's baseline."""
    torch.manual_seed(0)
    net = ECANet("mit_nano", num_classes=4).eval()
    pipeline = PseudoLabelPipeline(
        net, PAR(dilations=(1, 2), num_iter=2), cam_scales=(1.0, 1.5), par_downsample=2, cam_rule="afa",
        par_input="softmax",
    )  # fmt: skip
    images = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    crop_box = torch.tensor([[0, 64, 0, 48], [0, 32, 0, 64]])
    out = pipeline(images, labels, crop_box=crop_box, with_carm=False)
    assert out.cams.shape == (2, 3, 64, 64) and out.cams_refined is not None  # AFA's CAM: image size
    assert out.cam_label_band is not None and (out.cam_label_band[0, :, 48:] == 255).all()
    label = pipeline.random_walk_label(images, labels, out.cams_refined, crop_box)
    assert label.shape == (2, 64, 64)
    assert (label[0, :, 48:] == 255).all() and (label[1, 32:] == 255).all()
    assert {int(v) for v in label[1].unique()} <= {0, 2, 255}
    assert {int(v) for v in label[0].unique()} <= {0, 1, 3, 255}


def test_fused_softmax_refinement_equals_refinement_per_source_and_threshold() -> None:
    """AFA's softmax path, all sources and thresholds in one compact PAR call, labels equal to one
    :func:`refine_pseudo_label` call per source and threshold (absent classes refined there too)."""
    torch.manual_seed(2)
    par = PAR(dilations=(1, 2), num_iter=3)
    pipeline = PseudoLabelPipeline(
        ECANet("mit_nano", num_classes=6), par, alpha=0.45, band=(0.3, 0.6), par_downsample=1,
        par_input="softmax",
    )  # fmt: skip
    rgb = torch.rand(3, 3, 20, 22)
    sources = [torch.rand(3, 5, 5, 6), torch.rand(3, 5, 5, 6)]
    labels = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [1, 1, 0, 1, 0]])
    crop_box = torch.tensor([[0, 36, 0, 40], [2, 40, 4, 44], [0, 40, 0, 44]])
    out_hw = (40, 44)
    common = {"crop_box": crop_box, "softmax": True, "out_size": out_hw}
    for max_labels in (None, 3):
        fused = pipeline._softmax_labels(rgb, sources, labels, crop_box, out_hw, True, max_labels)
        for (hard, band), scores in zip(fused, sources):
            ref_hard = refine_pseudo_label(par, rgb, scores, labels, alpha=0.45, **common)
            ref_band = refine_pseudo_label(par, rgb, scores, labels, band=(0.3, 0.6), **common)
            assert band is not None and hard.shape == (3, *out_hw)
            assert torch.equal(hard, ref_hard) and torch.equal(band, ref_band), max_labels
            assert (band == 255).any() and (hard[0, 36:] == 255).all()
    (only_hard,) = pipeline._softmax_labels(rgb, sources[:1], labels, None, out_hw, False, 3)
    assert only_hard[1] is None
    assert torch.equal(only_hard[0], refine_pseudo_label(par, rgb, sources[0], labels, alpha=0.45,
                                                         softmax=True, out_size=out_hw))  # fmt: skip


def test_random_walk_label_refines_both_thresholds_in_one_call_exactly() -> None:
    """AFA's propagated label: one PAR call for both band thresholds equals one call per threshold."""
    import torch.nn.functional as F

    from ecaseg.affinity import propagate_with_background
    from ecaseg.data import denormalize

    torch.manual_seed(3)
    net = ECANet("mit_nano", num_classes=4).eval()
    par = PAR(dilations=(1, 2), num_iter=2)
    pipeline = PseudoLabelPipeline(net, par, cam_scales=(1.0,), par_downsample=2, band=(0.3, 0.6))
    images = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    cams = torch.rand(2, 3, 64, 64)
    calls: list[int] = []
    original = par.forward
    par.forward = lambda rgb, maps: calls.append(maps.shape[1]) or original(rgb, maps)  # type: ignore[method-assign]
    got = pipeline.random_walk_label(images, labels, cams, radius=2)
    assert calls == [8]  # both thresholds, background + 3 classes each, in one call
    with torch.no_grad():  # the per-threshold reference (AFA's loop)
        out = net(images, with_seg=False, with_aff=True)
        valid = F.interpolate(cams * labels[:, :, None, None], size=out.features.shape[-2:], mode="bilinear",
                              align_corners=False)  # fmt: skip
        rgb = F.interpolate(denormalize(images), size=(32, 32), mode="bilinear", align_corners=False)
        present = torch.cat([torch.ones(2, 1, dtype=torch.bool), labels > 0], dim=1)
        found = []
        for threshold in (0.6, 0.3):
            rw = propagate_with_background(valid, out.aff_pred, labels, threshold, radius=2)
            rw = F.interpolate(rw, size=(64, 64), mode="bilinear", align_corners=False)
            rw = F.interpolate(rw, size=(32, 32), mode="bilinear", align_corners=True)
            rw = F.interpolate(original(rgb, rw), size=(64, 64), mode="bilinear", align_corners=False)
            found.append(rw.masked_fill(~present[:, :, None, None], float("-inf")).argmax(1))
        high, low = found
        ref = torch.where(low == 0, torch.zeros_like(high), torch.full_like(high, 255))
        ref = torch.where(high > 0, high, ref)
    assert torch.equal(got, ref)


def test_fixed_par_slot_sizes_give_the_same_labels() -> None:
    """par_slots rounds the compact PAR channel count up to a power of two: the extra slots hold absent
    classes, and every label and refined map equals the tight count's (and the full path's)."""
    from ecaseg.engine.pseudo import par_slots

    torch.manual_seed(5)
    net = ECANet("mit_nano", num_classes=7).eval()
    images = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 0, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0]])  # at most 3 labels -> 4 slots
    assert par_slots(3, 6) == 4
    for par_input in ("scores", "softmax"):
        pipeline = PseudoLabelPipeline(
            net, PAR(dilations=(1, 2), num_iter=2), cam_scales=(1.0,), par_downsample=2, par_input=par_input
        )
        outs = [pipeline(images, labels, with_band=True, with_carm=False, max_labels=n) for n in (3, 4, None)]
        for other in outs[1:]:
            assert torch.equal(outs[0].cam_label, other.cam_label), par_input
            assert outs[0].cam_label_band is not None and other.cam_label_band is not None
            assert torch.equal(outs[0].cam_label_band, other.cam_label_band), par_input
