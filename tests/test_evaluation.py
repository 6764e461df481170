"""Evaluation and inference helpers."""

from __future__ import annotations

import numpy as np
import torch

from ecaseg.crf import CRFParams
from ecaseg.data import EvalTransform
from ecaseg.data.synthetic import SyntheticConfig, SyntheticWSSSDataset
from ecaseg.engine.evaluation import evaluate_segmentation
from ecaseg.engine.inference import predict_probs
from ecaseg.models import ECANet


def _setup() -> tuple[ECANet, SyntheticWSSSDataset]:
    torch.manual_seed(0)
    net = ECANet("mit_nano", num_classes=4)
    config = SyntheticConfig(image_size=48, num_fg_classes=3, num_train=2, num_val=3)
    return net, SyntheticWSSSDataset("val", config, transform=EvalTransform())


def test_crf_in_worker_processes_equals_in_process() -> None:
    net, data = _setup()
    kwargs = {"device": torch.device("cpu"), "crf": CRFParams(), "progress": False}
    serial = evaluate_segmentation(net, data, crf_workers=1, **kwargs)
    parallel = evaluate_segmentation(net, data, crf_workers=2, **kwargs)
    assert np.allclose(serial["confusion"], parallel["confusion"])
    plain = evaluate_segmentation(net, data, device=torch.device("cpu"), progress=False)
    assert np.asarray(plain["confusion"]).sum() == np.asarray(serial["confusion"]).sum() == 3 * 48 * 48


def test_msc_flip_probabilities_are_distributions_and_flip_equivariant() -> None:
    net, _ = _setup()
    net.eval()
    images = torch.randn(2, 3, 64, 96)
    probs = predict_probs(net, images, scales=(0.5, 1.0, 1.5), flip=True)
    assert probs.shape == (2, 4, 64, 96)
    assert torch.allclose(probs.sum(1), torch.ones(2, 64, 96), atol=1e-5)
    flipped = predict_probs(net, images.flip(-1), scales=(0.5, 1.0, 1.5), flip=True)
    assert torch.allclose(flipped.flip(-1), probs, atol=1e-5)


def test_wsss_classifier_f1_matches_thresholded_logits() -> None:
    from ecaseg.engine.evaluation import evaluate_wsss
    from ecaseg.engine.pseudo import PseudoLabelPipeline

    net, data = _setup()
    net.eval()
    with torch.no_grad():  # make the classifier say "present" for class 0 only
        net.classifier.weight.zero_()
        net.classifier.weight[0] += 1.0
    pipeline = PseudoLabelPipeline(net, None, cam_scales=(1.0,), cam_flip=False, par_downsample=1)
    result = evaluate_wsss(net, data, pipeline, device=torch.device("cpu"), progress=False)
    logits = torch.stack([net(data[i]["image"][None]).cls_logits[0] for i in range(len(data))])
    labels = torch.stack([data[i]["label"] for i in range(len(data))])
    pred = logits > 0
    f1 = []
    for c in range(labels.shape[1]):
        tp = float((pred[:, c] & (labels[:, c] > 0)).sum())
        fp = float((pred[:, c] & (labels[:, c] == 0)).sum())
        fn = float((~pred[:, c] & (labels[:, c] > 0)).sum())
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else float("nan"))
    expected = float(np.nanmean(f1))
    assert abs(result["cls_f1"] - expected) < 1e-6, (result["cls_f1"], f1)


# --- AFA's inference protocol (scripts/test_msc_flip.py), re-derived on identical inputs -----------------


def _afa_reference_logits(
    net: ECANet, image: torch.Tensor, scales: list[float], resize_long: int
) -> torch.Tensor:
    """What AFA's ``validate`` computes for one image, written out step by step from its description:

    resize the long side to ``resize_long`` (int() of the scaled sides); run the image and its flip; the
    first (scale 1) logits set the grid; each other scale is made with ``scale_factor=s``; every pair is
    brought to the grid, the flip flipped back and the two averaged; the maximum over scales is taken and
    brought to the label's size.
    """
    _, _, h, w = image.shape
    ratio = resize_long / max(h, w)
    inputs = torch.nn.functional.interpolate(
        image, size=(int(h * ratio), int(w * ratio)), mode="bilinear", align_corners=False
    )
    segs_list = []
    segs_cat = net.forward_seg(torch.cat([inputs, inputs.flip(-1)], dim=0))
    segs_list.append((segs_cat[0] + segs_cat[1].flip(-1)) / 2)
    gh, gw = segs_cat.shape[-2:]
    for s in scales:
        if s == 1.0:
            continue
        small = torch.nn.functional.interpolate(inputs, scale_factor=s, mode="bilinear", align_corners=False)
        segs_cat = net.forward_seg(torch.cat([small, small.flip(-1)], dim=0))
        segs_cat = torch.nn.functional.interpolate(
            segs_cat, size=(gh, gw), mode="bilinear", align_corners=False
        )
        segs_list.append((segs_cat[0] + segs_cat[1].flip(-1)) / 2)
    merged = torch.max(torch.stack(segs_list, dim=0), dim=0)[0].unsqueeze(0)
    return torch.nn.functional.interpolate(merged, size=(h, w), mode="bilinear", align_corners=False)


def test_max_merge_equals_afa_test_script_on_identical_inputs() -> None:
    from ecaseg.engine.inference import predict_logits_max

    net, _ = _setup()
    net.eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for h, w in ((75, 100), (100, 60), (64, 64)):  # landscape, portrait, square; VOC-like odd sizes
            image = torch.randn(1, 3, h, w, generator=gen)
            ours = predict_logits_max(net, image, scales=(1.0, 0.5, 0.75), flip=True, resize_long=128)
            ref = _afa_reference_logits(net, image, [1.0, 0.5, 0.75], 128)
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
            probs = predict_probs(
                net, image, scales=(1.0, 0.5, 0.75), flip=True, merge="max", resize_long=128
            )
            assert torch.equal(probs.argmax(1), ref.argmax(1))


def test_mean_merge_is_the_0_1_rule_and_differs_from_max() -> None:
    net, _ = _setup()
    net.eval()
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    mean = predict_probs(net, images, scales=(1.0, 0.5, 0.75), flip=True, merge="mean")
    manual = torch.zeros_like(mean)
    with torch.no_grad():
        for s in (1.0, 0.5, 0.75):
            size = (max(round(64 * s), 16), max(round(96 * s), 16))
            for flipped in (False, True):
                x = (
                    torch.nn.functional.interpolate(images, size=size, mode="bilinear")
                    if s != 1.0
                    else images
                )
                x = x.flip(-1) if flipped else x
                logits = torch.nn.functional.interpolate(net.forward_seg(x), size=(64, 96), mode="bilinear")
                p = logits.softmax(1)
                manual += p.flip(-1) if flipped else p
    torch.testing.assert_close(mean, manual / 6)
    maxed = predict_probs(net, images, scales=(1.0, 0.5, 0.75), flip=True, merge="max", resize_long=0)
    assert not torch.allclose(mean, maxed)


def test_batched_prediction_equals_image_by_image() -> None:
    """predict_batched groups same-size images (and flushes early when too many wait): the labels are those
    of predict_labels image by image, CRF included, whatever the batch size."""
    from ecaseg.crf import dense_crf
    from ecaseg.engine.inference import _rgb_uint8, predict_batched, predict_labels

    torch.manual_seed(0)
    net = ECANet("mit_nano", num_classes=3).eval()
    sizes = [(32, 40), (40, 32), (32, 40), (36, 36), (32, 40), (40, 32), (32, 40)]
    images = [torch.randn(3, h, w) for h, w in sizes]
    protocol = {"scales": (1.0, 0.5), "flip": True, "merge": "max", "resize_long": 48}
    reference = {i: predict_labels(net, x[None], **protocol)[0] for i, x in enumerate(images)}  # type: ignore[arg-type]
    for batch_size, max_buffered in ((1, None), (3, None), (4, 4), (8, None)):
        got = dict(
            predict_batched(
                net, enumerate(images), device=torch.device("cpu"), batch_size=batch_size,
                max_buffered=max_buffered, **protocol,  # type: ignore[arg-type]
            )
        )  # fmt: skip
        assert sorted(got) == list(range(len(images)))
        for i, label in got.items():
            assert label.shape == sizes[i]
            assert (label == reference[i]).float().mean() > 0.999, (batch_size, i)
    params = CRFParams(iterations=2)
    crf = dict(
        predict_batched(net, enumerate(images[:3]), device=torch.device("cpu"), batch_size=2, crf=params,
                        crf_workers=2, **protocol)  # type: ignore[arg-type]
    )  # fmt: skip
    for i in range(3):
        probs = predict_probs(net, images[i][None], **protocol)[0].numpy()  # type: ignore[arg-type]
        expected = dense_crf(_rgb_uint8(images[i][None])[0], probs, params)
        assert (crf[i].numpy() == expected).mean() > 0.999
