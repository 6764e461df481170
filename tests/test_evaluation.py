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
    config = SyntheticConfig(image_size=48, num_classes=3, num_train=2, num_val=3)
    return net, SyntheticWSSSDataset("val", config, transform=EvalTransform())


def test_crf_in_worker_processes_equals_in_process() -> None:
    net, data = _setup()
    kwargs = {"device": torch.device("cpu"), "crf": CRFParams(), "progress": False}
    serial = evaluate_segmentation(net, data, crf_workers=0, **kwargs)
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
