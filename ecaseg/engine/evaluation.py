"""Evaluation: segmentation mIoU (msc, flip, CRF) and the WSSS diagnostics (CAM, CARM, pseudo-labels)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ecaseg.cam import cam_to_label
from ecaseg.crf import CRFBackend, CRFParams
from ecaseg.data import worker_init
from ecaseg.engine.inference import MergeRule, autocast_context, predict_batched
from ecaseg.engine.pseudo import PseudoLabelPipeline
from ecaseg.errors import DatasetError
from ecaseg.metrics import MultiLabelMetric, SegmentationMetric
from ecaseg.models import ECANet
from ecaseg.utils.dist import get_rank, get_world_size, is_main_process

__all__ = ["eval_loader", "evaluate_segmentation", "evaluate_wsss"]


def _collate_one(batch: list[dict[str, Any]]) -> dict[str, Any]:
    (sample,) = batch
    return sample


def eval_loader(
    dataset: Dataset[dict[str, Any]], max_images: int = 0, num_workers: int = 0
) -> DataLoader[Any]:
    """One image at a time (sizes differ), the first ``max_images`` (0: all), sharded over processes."""
    n = len(dataset)  # type: ignore[arg-type]
    if max_images > 0:
        n = min(n, max_images)
    indices = list(range(get_rank(), n, get_world_size()))
    return DataLoader(
        Subset(dataset, indices),
        batch_size=1,
        num_workers=num_workers,
        collate_fn=_collate_one,
        worker_init_fn=worker_init,
    )


@torch.no_grad()
def evaluate_segmentation(
    net: ECANet,
    dataset: Dataset[dict[str, Any]],
    *,
    device: torch.device,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: CRFParams | None = None,
    crf_workers: int = 0,
    max_images: int = 0,
    amp: str = "none",
    num_workers: int = 0,
    progress: bool = True,
    merge: MergeRule = "mean",
    resize_long: int = 0,
    batch_size: int = 0,
    crf_backend: CRFBackend = "auto",
) -> dict[str, Any]:
    """mIoU of the segmentation decoder on a dataset with masks (the evaluation transform applied).

    ``scales``, ``flip``, ``merge``, ``resize_long`` and ``crf`` are the inference protocol (see
    :func:`ecaseg.engine.inference.predict_probs`; the paper configs' ``eval`` section holds AFA's);
    ``crf_backend`` and ``crf_workers`` say how the CRF runs. Images of the same size run ``batch_size`` at
    a time and the CRF pool works while the network runs
    (:func:`ecaseg.engine.inference.predict_batched`); the figures do not depend on ``batch_size``.

    Returns:
        :meth:`~ecaseg.metrics.SegmentationMetric.compute`'s dict (``miou``, ``per_class_iou``,
        ``pixel_accuracy``, ``mean_accuracy``, ...), reduced over processes.
    """
    metric = SegmentationMetric(net.num_classes)
    was_training = net.training
    net.eval()
    loader = eval_loader(dataset, max_images, num_workers)

    def items() -> Iterator[tuple[Tensor, Tensor]]:
        for sample in tqdm(
            loader, desc="evaluate", disable=not (progress and is_main_process()), leave=False
        ):
            if "mask" not in sample:
                raise DatasetError(
                    "evaluation needs ground-truth masks and this split has none (a folder dataset needs "
                    "data.masks_dir); ecaseg predict segments images without masks"
                )
            yield sample["mask"], sample["image"]

    try:
        for target, label in predict_batched(
            net,
            items(),
            device=device,
            batch_size=batch_size,
            scales=scales,
            flip=flip,
            merge=merge,
            resize_long=resize_long,
            amp=amp,
            crf=crf,
            crf_workers=crf_workers,
            crf_backend=crf_backend,
        ):
            metric.update(label[None].to(device), target[None].to(device))
    finally:
        net.train(was_training)
    return metric.compute()


@torch.no_grad()
def evaluate_wsss(
    net: ECANet,
    dataset: Dataset[dict[str, Any]],
    labeler: PseudoLabelPipeline,
    *,
    device: torch.device,
    max_images: int = 0,
    amp: str = "none",
    num_workers: int = 0,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """The WSSS diagnostics of the paper's tables on a split with masks.

    Returns a dict with ``cam_miou`` (multi-scale CAM thresholded at alpha, Table 4's "CAM"),
    ``cam_pseudo_miou`` (PAR-refined CAM pseudo-label), ``carm_miou`` (calibrated CARM thresholded at alpha)
    and ``carm_pseudo_miou`` (PAR-refined CARM pseudo-label) when the labeler has DINO, ``seg_miou``
    (single-scale decoder) and ``cls_map`` / ``cls_f1`` (classifier). Pseudo-labels use the ground-truth
    image-level labels, as during training. A split without masks (a folder dataset of image-level labels)
    gets the classifier's figures only.
    """
    num_classes = net.num_classes
    metrics = {
        name: SegmentationMetric(num_classes) for name in ("cam", "cam_pseudo", "carm", "carm_pseudo", "seg")
    }
    cls_metric = MultiLabelMetric(num_classes)
    was_training = net.training
    net.eval()
    has_carm = labeler.dino is not None and labeler.carm_generator is not None
    loader = eval_loader(dataset, max_images, num_workers)
    for sample in tqdm(loader, desc="validate", disable=not (progress and is_main_process()), leave=False):
        if should_stop is not None and should_stop():
            break  # interrupted: the figures of the images seen so far
        images = sample["image"][None].to(device)
        labels = sample["label"][None].to(device)
        height, width = images.shape[-2:]
        with autocast_context(device, amp):
            out = net(images, with_seg=True, with_aff=False)
        cls_metric.update(out.cls_logits.float(), labels)  # logits: the metric applies the sigmoid
        if "mask" not in sample:  # image-level labels only: the classifier is all that can be scored
            continue
        target = sample["mask"][None].to(device)
        assert out.seg_logits is not None
        seg = torch.nn.functional.interpolate(out.seg_logits.float(), size=(height, width), mode="bilinear")
        metrics["seg"].update(seg.argmax(1), target)
        pseudo = labeler(images, labels, features=out.features.float(), with_band=False, with_carm=has_carm)
        cams_full = torch.nn.functional.interpolate(pseudo.cams, size=(height, width), mode="bilinear")
        metrics["cam"].update(cam_to_label(cams_full, labels, alpha=labeler.alpha), target)
        metrics["cam_pseudo"].update(pseudo.cam_label, target)
        if pseudo.carm is not None and pseudo.carm_label is not None:
            carm_full = torch.nn.functional.interpolate(
                pseudo.carm[:, 1:], size=(height, width), mode="bilinear"
            )
            metrics["carm"].update(cam_to_label(carm_full, labels, alpha=labeler.alpha), target)
            metrics["carm_pseudo"].update(pseudo.carm_label, target)
    net.train(was_training)
    result: dict[str, float] = {}
    for name, metric in metrics.items():
        if name.startswith("carm") and not has_carm:
            continue
        scores = metric.compute()  # on every rank (a collective under DDP), masks or not
        if float(np.asarray(scores["confusion"]).sum()) > 0:  # no masks: no segmentation figure
            result[f"{name}_miou"] = float(scores["miou"])
    cls = cls_metric.compute()
    result["cls_map"] = float(cls["map"])
    result["cls_f1"] = float(cls["mean_f1"])
    return result
