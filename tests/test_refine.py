"""Tests for ecaseg.refine, the CARM settings that belong to each ViT, and the random-walk helpers."""

from __future__ import annotations

import math

import pytest
import torch

from ecaseg.affinity import cosine_affinity, propagate_with_background, random_walk
from ecaseg.cam import cam_probabilities, cam_to_label, minmax_normalize
from ecaseg.carm import CARMGenerator
from ecaseg.crf import CRFParams
from ecaseg.data import normalize
from ecaseg.dino_affinity import DINO_VARIANTS, DINOAffinity
from ecaseg.dino_features import PAPER_CARM_SETTINGS, CARMSettings, DINOFeatures
from ecaseg.metrics import SegmentationMetric
from ecaseg.par import PAR
from ecaseg.refine import (
    DEFAULT_METHOD,
    REFINE_METHODS,
    CAMRefiner,
    crf_params_for_size,
    refine_cams,
    search_carm_settings,
)
from ecaseg.utils.assets import list_packaged_assets, packaged_asset


@pytest.fixture(scope="module")
def dino() -> DINOAffinity:
    return DINOAffinity("vit_nano_p8_synthetic")


def _batch(seed: int = 0, b: int = 2, c: int = 3, size: int = 32) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, size, size, generator=gen)
    labels = torch.zeros(b, c)
    labels[:, 0] = 1.0
    labels[1, 2] = 1.0
    cams = minmax_normalize(torch.rand(b, c, size // 8, size // 8, generator=gen)) * labels[:, :, None, None]
    return images, cams, labels


# --- settings that belong to the ViT -----------------------------------------------------------------------


def test_variants_carry_their_carm_settings(dino: DINOAffinity) -> None:
    assert DINO_VARIANTS["dino_vits8"].carm == PAPER_CARM_SETTINGS
    assert (PAPER_CARM_SETTINGS.k, PAPER_CARM_SETTINGS.gamma, PAPER_CARM_SETTINGS.fg_cue) == (
        0.3,
        0.15,
        "cls",
    )
    for name in ("dino_vits16", "dino_vitb8", "dinov2_vits14", "mocov3_vits16", "sup_vits16"):
        assert DINO_VARIANTS[name].carm == PAPER_CARM_SETTINGS  # Table 5 ran with the paper's settings
    s = dino.carm_settings
    assert (s.gamma, s.fg_cue, s.calibrate) == (0.9, "contrast", False)


def test_for_affinity_uses_the_vit_settings_and_overrides(dino: DINOAffinity) -> None:
    gen = CARMGenerator.for_affinity(dino, num_classes=6)
    assert (gen.gamma, gen.fg_cue, gen.calibrate, gen.k) == (0.9, "contrast", False, 0.3)
    gen = CARMGenerator.for_affinity(dino, num_classes=6, gamma=0.8, fg_cue="none")
    assert (gen.gamma, gen.fg_cue) == (0.8, "none")
    # the paper's ViT calibrates only when the caller passes backbone features of a known width
    paper = CARMGenerator.for_affinity(PAPER_CARM_SETTINGS, num_classes=21)
    assert paper.calibrate is False and paper.gamma == 0.15
    assert CARMGenerator.for_affinity(PAPER_CARM_SETTINGS, num_classes=21, feature_dim=512).calibrate is True
    with pytest.raises(TypeError, match="unknown CARM setting"):
        CARMGenerator.for_affinity(dino, num_classes=6, gama=0.8)
    with pytest.raises(TypeError, match="carm_settings"):
        CARMGenerator.for_affinity(object(), num_classes=6)
    with pytest.raises(ValueError, match="gamma must be a cosine"):
        CARMGenerator.for_affinity(dino, num_classes=6, gamma=5.0)


def test_from_model_takes_settings() -> None:
    import timm

    vit = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1, embed_dim=48, num_heads=3)
    assert DINOAffinity.from_model(vit).carm_settings == PAPER_CARM_SETTINGS
    mine = CARMSettings(gamma=0.7, fg_cue="contrast", source="mine")
    assert DINOAffinity.from_model(vit, carm_settings=mine).carm_settings is mine


def test_carm_settings_validate() -> None:
    with pytest.raises(ValueError, match="k must be"):
        CARMSettings(k=0.0)
    with pytest.raises(ValueError, match="fg_cue"):
        CARMSettings(fg_cue="class")  # type: ignore[arg-type]
    assert CARMSettings().replace(gamma=-0.5).gamma == -0.5


# --- CAM -> probabilities, random walk ---------------------------------------------------------------------


def test_cam_probabilities_equal_a_loop_reference() -> None:
    _, cams, labels = _batch()
    probs = cam_probabilities(cams, labels, bg_score=0.4)
    b, c, h, w = cams.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                scores = [0.4] + [float(cams[i, k, y, x]) if labels[i, k] > 0 else 0.0 for k in range(c)]
                total = sum(scores)
                for k in range(c + 1):
                    assert math.isclose(
                        float(probs[i, k, y, x]), scores[k] / total, rel_tol=1e-5, abs_tol=1e-7
                    )
    # its argmax is the thresholded CAM (no ties in random data)
    present = torch.cat([torch.ones(b, 1), labels], 1).bool()
    argmax = probs.masked_fill(~present[:, :, None, None], -1).argmax(1)
    assert torch.equal(argmax, cam_to_label(cams, labels, alpha=0.4))


def test_random_walk_equals_a_loop_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(1, 2, 2, 3, generator=gen)
    aff = torch.rand(1, 6, 6, generator=gen)
    out = random_walk(probs, aff, power=3.0, iterations=2, eps=1e-5)
    p = probs.flatten(2)[0].tolist()
    a = [[float(aff[0, i, j]) ** 3 for j in range(6)] for i in range(6)]
    col = [sum(a[i][j] for i in range(6)) + 1e-5 for j in range(6)]
    t = [[a[i][j] / col[j] for j in range(6)] for i in range(6)]
    for _ in range(2):
        p = [[sum(p[k][i] * t[i][j] for i in range(6)) for j in range(6)] for k in range(2)]
    assert torch.allclose(out.flatten(2)[0], torch.tensor(p), atol=1e-6)


def test_random_walk_refuses_negative_affinity() -> None:
    keys = torch.tensor([[[1.0, 0.0], [-1.0, 0.1], [0.5, 0.5], [0.0, 1.0]]])
    cos = torch.nn.functional.normalize(keys, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).transpose(
        1, 2
    )
    probs = torch.rand(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"non-negative affinities.*clamp it at 0"):
        random_walk(probs, cos)
    with pytest.raises(ValueError, match="non-negative affinities"):
        propagate_with_background(torch.rand(1, 1, 2, 2), cos, torch.ones(1, 1), 0.5)
    clamped = cosine_affinity(keys)
    assert float(clamped.min()) == 0.0 and torch.allclose(clamped, cos.clamp_min(0))
    random_walk(probs, clamped)  # accepted


# --- CAMRefiner --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", REFINE_METHODS)
def test_each_method_labels_only_present_classes(method: str, dino: DINOAffinity) -> None:
    images, cams, labels = _batch()
    out = CAMRefiner(4, method, dino, crf_workers=0)(images, cams, labels)  # type: ignore[arg-type]
    assert out.label.shape == (2, 32, 32) and out.label.dtype == torch.long
    assert out.scores.shape == (2, 4, 32, 32)
    for i in range(2):
        allowed = {0} | {k + 1 for k in range(3) if labels[i, k] > 0}
        assert set(out.label[i].unique().tolist()) <= allowed
    assert (out.carm is not None) == method.startswith("carm")


def test_threshold_and_par_equal_the_blocks() -> None:
    images, cams, labels = _batch(2)
    up = torch.nn.functional.interpolate(cams, size=(32, 32), mode="bilinear", align_corners=False)
    out = refine_cams(images, cams, labels, "threshold", alpha=0.45)
    assert torch.equal(out.label, cam_to_label(up, labels, alpha=0.45))
    par = PAR(dilations=(1, 2), num_iter=3)
    out = CAMRefiner(4, "par", par=par)(images, cams, labels)
    maps = par(images, torch.cat([torch.full_like(up[:, :1], 0.5), up * labels[:, :, None, None]], 1))
    present = torch.cat([torch.ones(2, 1), labels], 1).bool()
    assert torch.equal(out.label, maps.masked_fill(~present[:, :, None, None], -1).argmax(1))


def test_carm_method_equals_the_generator(dino: DINOAffinity) -> None:
    images, cams, labels = _batch(3)
    out = CAMRefiner(4, "carm", dino)(images, cams, labels)
    carm = CARMGenerator.for_affinity(dino, 4)(cams, labels, dino(normalize(images))).carm
    assert out.carm is not None and torch.allclose(out.carm, carm)
    up = torch.nn.functional.interpolate(carm[:, 1:], size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(out.label, cam_to_label(up, labels, alpha=0.5))


def test_refiner_checks_inputs(dino: DINOAffinity) -> None:
    images, cams, labels = _batch()
    with pytest.raises(ValueError, match="needs the affinity ViT"):
        CAMRefiner(4, "carm")
    with pytest.raises(ValueError, match="method must be one of"):
        CAMRefiner(4, "magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="counts the background"):
        CAMRefiner(4, "threshold")(images, cams[:, :2], labels)
    with pytest.raises(ValueError, match="images"):
        CAMRefiner(4, "threshold")(images * 255, cams, labels)


def test_crf_params_for_size() -> None:
    p = crf_params_for_size(128, 96)
    assert p.bilateral_sxy == pytest.approx(64 * 128 / 500) and p.gaussian_sxy == 1.0  # 0.77 floored at 1 px
    assert crf_params_for_size(1000, 500).gaussian_sxy == pytest.approx(6.0)
    assert (p.bilateral_srgb, p.iterations) == (CRFParams().bilateral_srgb, CRFParams().iterations)
    assert crf_params_for_size(10, 10).gaussian_sxy == 1.0


def test_search_carm_settings_picks_the_best_row(dino: DINOAffinity) -> None:
    images, cams, labels = _batch(4)
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[0, 8:24, 8:24] = 1
    masks[1, 4:12, 4:28] = 3
    best, rows = search_carm_settings(
        dino, images, cams, labels, masks, gammas=(0.5, 0.9), fg_cues=("none", "contrast")
    )
    assert len(rows) == 4 and rows[0]["miou"] == max(r["miou"] for r in rows)
    assert (best.gamma, best.fg_cue) == (rows[0]["gamma"], rows[0]["fg_cue"])
    # each row's figure is the thresholded CARM of those settings
    row = rows[-1]
    gen = CARMGenerator.for_affinity(CARMSettings(gamma=row["gamma"], fg_cue=row["fg_cue"]), 4)
    carm = gen(cams, labels, dino(normalize(images))).carm
    up = torch.nn.functional.interpolate(carm[:, 1:], size=(32, 32), mode="bilinear", align_corners=False)
    metric = SegmentationMetric(4)
    metric.update(cam_to_label(up, labels), masks)
    assert row["miou"] == pytest.approx(metric.compute()["miou"])


def test_dinofeatures_callable_is_enough() -> None:
    """Any callable returning DINOFeatures works as the ViT (a user's own extractor)."""
    images, cams, labels = _batch(5)

    def extractor(x: torch.Tensor) -> DINOFeatures:
        keys = torch.nn.functional.avg_pool2d(x, 8).flatten(2).transpose(1, 2).repeat(1, 1, 4)
        return DINOFeatures(keys=keys, cls_query=keys.mean(1), grid=(4, 4))

    out = CAMRefiner(4, "carm_par", extractor, carm=CARMGenerator(4, calibrate=False, gamma=0.5))(
        images, cams, labels
    )
    assert out.label.shape == (2, 32, 32)


# --- the quick tour's claim: on CAMs ecaseg did not make, the default beats the threshold ---------------


def test_packaged_assets() -> None:
    assert {"dino_vit_nano_p8_synthetic.pth", "test_resnet_synthetic_classifier.pth"} <= set(
        list_packaged_assets()
    )
    assert packaged_asset("packaged:test_resnet_synthetic_cls.pth").is_file()
    with pytest.raises(FileNotFoundError, match="packaged:"):
        packaged_asset("nope.pth")
    with pytest.raises(FileNotFoundError):
        packaged_asset("../cli.py")


@pytest.mark.slow
def test_default_refinement_improves_outside_cams(dino: DINOAffinity) -> None:
    import timm

    from ecaseg.data.synthetic import SyntheticConfig, SyntheticWSSSDataset

    clf = timm.create_model("test_resnet", num_classes=5, output_stride=16, pretrained=False)
    clf.load_state_dict(torch.load(packaged_asset("test_resnet_synthetic_classifier.pth"), weights_only=True))
    clf.eval()
    val = SyntheticWSSSDataset("val", SyntheticConfig(seed=0, num_val=24))
    items = [val[i] for i in range(len(val))]
    images = torch.stack([torch.from_numpy(s["image"]).permute(2, 0, 1) for s in items]).float() / 255
    masks = torch.stack([torch.from_numpy(s["mask"]).long() for s in items])
    labels = torch.stack([s["label"].float() for s in items])
    with torch.no_grad():
        cams = torch.einsum("kc,bchw->bkhw", clf.fc.weight, clf.forward_features(normalize(images))).relu()
    cams = cams / cams.flatten(2).amax(-1).clamp_min(1e-5)[..., None, None] * labels[:, :, None, None]
    miou = {}
    for method in ("threshold", DEFAULT_METHOD):
        metric = SegmentationMetric(6)
        metric.update(CAMRefiner(6, method, dino)(images, cams, labels).label, masks)
        miou[method] = metric.compute()["miou"]
    assert miou[DEFAULT_METHOD] > miou["threshold"] + 0.2, miou
