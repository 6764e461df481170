"""The online pseudo-label path of Figure 2: multi-scale CAM -> CARM -> PAR-refined pseudo-labels.

:class:`PseudoLabelPipeline` is used by the trainer at every step, by validation and by the ``pseudo-labels``
command, so the three always produce the same labels from the same network state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ecaseg.affinity import propagate_with_background
from ecaseg.cam import CAMRule, cam_to_label, crop_box_mask, multiscale_cam
from ecaseg.carm import CARMGenerator
from ecaseg.data import denormalize
from ecaseg.dino_affinity import DINOAffinity
from ecaseg.models import ECANet
from ecaseg.pseudo_label import refine_pseudo_label

__all__ = ["PseudoLabelPipeline", "PseudoLabels", "par_slots"]


def par_slots(max_labels: int, num_fg: int) -> int:
    """A fixed slot count for ``max_labels`` labelled channels: the next power of two, at most ``num_fg``.

    The compact PAR path (``max_labels`` of :class:`PseudoLabelPipeline`) refines one slot per label of the
    most-labelled image; its channel count changes from batch to batch, and a compiled or graphed
    pseudo-label block recompiles for every new count. Rounding it up to one of a few sizes is exact: the
    extra slots hold absent classes, which are zero (probability 0) and stay zero through PAR.

    Example:
        >>> [par_slots(n, 20) for n in (1, 2, 3, 4, 5, 9, 17, 20)]
        [1, 2, 4, 4, 8, 16, 20, 20]
        >>> par_slots(3, 3)
        3
    """
    if max_labels < 1:
        return 1
    return min(num_fg, 1 << (int(max_labels) - 1).bit_length())


@dataclass
class PseudoLabels:
    """Everything the losses and the visualisations need from one pseudo-labelling pass.

    Attributes:
        cams: ``[B, C, h, w]`` normalised multi-scale CAM at the feature grid.
        cam_label: ``[B, H, W]`` PAR-refined CAM pseudo-label with the hard threshold alpha.
        cam_label_band: ``[B, H, W]`` the same with the uncertain band ignored (255), for CCE and
            affinity labels; ``None`` when not requested.
        carm: ``[B, K, h, w]`` calibrated CARM (``None`` without DINO).
        carm_raw: ``[B, K, h, w]`` CARM before calibration.
        carm_label: ``[B, H, W]`` PAR-refined CARM pseudo-label (alpha).
        carm_label_band: ``[B, H, W]`` CARM pseudo-label with the uncertain band ignored.
        cams_refined: the CAM that PAR refined: at the image size under ``cam_rule="afa"``, else ``cams``.
    """

    cams: Tensor
    cam_label: Tensor
    cam_label_band: Tensor | None = None
    carm: Tensor | None = None
    carm_raw: Tensor | None = None
    carm_label: Tensor | None = None
    carm_label_band: Tensor | None = None
    cams_refined: Tensor | None = None


class PseudoLabelPipeline:
    """Produces CAM and CARM pseudo-labels for a batch (no gradient).

    Args:
        net: the segmentation network (its ``forward_cam`` gives the CAMs).
        par: pixel-adaptive refinement, any callable ``(images, maps) -> maps``, or ``None``.
        dino: the frozen affinity ViT, or ``None`` for CAM-only methods.
        carm_generator: the SAE module, or ``None`` for CAM-only methods.
        cam_scales: scales of the multi-scale CAM.
        cam_flip: add horizontally flipped inputs to the multi-scale CAM.
        alpha: hard background threshold of the pseudo-labels.
        band: ``(low, high)`` uncertain band of the ``*_band`` labels.
        par_downsample: PAR runs on images downsampled by this factor (AFA uses 2), labels are upsampled
            back with nearest neighbours.
        carm_background: background score of the CARM pseudo-label: ``"alpha"`` (the constant threshold,
            the same path as the CAM, the default) or ``"map"`` (the calibrated background CARM,
            Eq. (7) with c = 0; the band is not used then).
        cam_rule: multi-scale CAM rule, ``"sum"`` (ecaseg 0.1) or ``"afa"`` (AFA's ``multi_scale_cam``, CAM
            at the image size; see :func:`ecaseg.cam.multiscale_cam`).
        par_input: what PAR refines: ``"scores"`` (the thresholds and scores themselves, one shared
            refinement, ecaseg 0.1) or ``"softmax"`` (a softmax over the background threshold and the
            labelled classes first, one refinement per threshold, as AFA's ``refine_cams_with_bkg_v2``).
    """

    def __init__(
        self,
        net: ECANet,
        par: torch.nn.Module | None,
        dino: DINOAffinity | None = None,
        carm_generator: CARMGenerator | None = None,
        cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5),
        cam_flip: bool = True,
        alpha: float = 0.5,
        band: tuple[float, float] = (0.35, 0.55),
        par_downsample: int = 2,
        carm_background: str = "alpha",
        cam_rule: CAMRule = "sum",
        par_input: Literal["scores", "softmax"] = "scores",
    ) -> None:
        if par_input not in ("scores", "softmax"):
            raise ValueError(f"par_input must be 'scores' or 'softmax', got {par_input!r}")
        self.cam_rule: CAMRule = cam_rule
        self.par_input = par_input
        if carm_background not in ("alpha", "map"):
            raise ValueError(f"carm_background must be 'alpha' or 'map', got {carm_background!r}")
        self.carm_background = carm_background
        self.net = net
        self.par = par
        self.dino = dino
        self.carm_generator = carm_generator
        self.cam_scales = cam_scales
        self.cam_flip = cam_flip
        self.alpha = alpha
        self.band = band
        self.par_downsample = par_downsample

    def _refine_scores(
        self, rgb: Tensor, sources: list[Tensor], labels: Tensor, max_labels: int | None = None
    ) -> list[Tensor]:
        """Refine foreground score maps with one PAR call; returns ``[B, C, H', W']`` per source.

        Exact shortcuts, all because PAR is linear in the maps, channel-independent, and keeps constant
        maps constant:

        * refining ``[alpha, S]`` gives ``[alpha, PAR(S)]``, so one refinement of the foreground scores
          serves the hard threshold and both band thresholds (AFA refines once per threshold);
        * absent classes are zero and stay zero, so only the labelled channels are refined: with
          ``max_labels`` (the most labels of an image in the batch, known on the host) the labelled
          channels are gathered into ``max_labels`` slots (VOC: 1-4 instead of 20) and scattered back;
        * the CAM and the CARM share the image kernel: their maps are refined in the same call.
        """
        size = (rgb.shape[-2], rgb.shape[-1])
        batch, num_fg = labels.shape
        slots = num_fg if max_labels is None else max(1, min(int(max_labels), num_fg))
        with torch.autocast(device_type=rgb.device.type, enabled=False):
            weights = labels.float()[:, :, None, None]
            order = labels.float().argsort(dim=1, descending=True, stable=True)[:, :slots]  # labelled first
            maps = []
            for scores in sources:
                fg = scores.float() * weights
                if slots < num_fg:
                    fg = fg.gather(1, order[:, :, None, None].expand(-1, -1, *fg.shape[-2:]))
                maps.append(F.interpolate(fg, size=size, mode="bilinear", align_corners=False))
            stacked = torch.cat(maps, dim=1)
            refined = self.par(rgb, stacked) if self.par is not None else stacked
            outs = []
            for part in refined.split(slots, dim=1):
                if slots < num_fg:
                    full = part.new_zeros(batch, num_fg, *size)
                    part = full.scatter(1, order[:, :, None, None].expand(-1, -1, *size), part)
                outs.append(part)
            return outs

    def _label(
        self,
        refined: Tensor,
        labels: Tensor,
        crop_box: Tensor | None,
        out_hw: tuple[int, int],
        band: bool,
    ) -> Tensor:
        box = None
        if crop_box is not None:
            box = torch.div(crop_box, self.par_downsample, rounding_mode="floor")
        label = cam_to_label(
            refined, labels, alpha=self.alpha, band=self.band if band else None, crop_box=box
        )
        return self._resize_label(label, out_hw)

    def _softmax_labels(
        self,
        rgb: Tensor,
        sources: list[Tensor],
        labels: Tensor,
        crop_box: Tensor | None,
        out_hw: tuple[int, int],
        with_band: bool,
        max_labels: int | None = None,
    ) -> list[tuple[Tensor, Tensor | None]]:
        """AFA's path (``refine_cams_with_bkg_v2``) for every source: softmax over ``[threshold, labelled
        scores]`` at the PAR size, PAR, refined maps brought bilinearly to the image size, argmax; once per
        threshold (the hard ``alpha`` and, with ``with_band``, both band thresholds).

        The labels equal those of :func:`~ecaseg.pseudo_label.refine_pseudo_label` with ``softmax=True``
        called per source and threshold (``tests/test_pseudo_pipeline.py`` checks it), computed in one PAR
        call: PAR is channel-independent, so all the maps share the image kernel, and absent classes have
        probability 0 and stay 0, so only the background and the labelled channels are refined (gathered,
        labelled classes first in class order, into ``max_labels`` slots when the host knows it).

        Returns:
            One ``(hard label, band label or None)`` pair per source, ``[B, H, W]`` each.
        """
        size = (rgb.shape[-2], rgb.shape[-1])
        num_fg = labels.shape[1]
        slots = num_fg if max_labels is None else max(1, min(int(max_labels), num_fg))
        thresholds = [self.alpha, *((self.band[1], self.band[0]) if with_band else ())]
        with torch.autocast(device_type=rgb.device.type, enabled=False):
            order = labels.float().argsort(dim=1, descending=True, stable=True)[:, :slots]  # labelled first
            present = torch.cat(
                [torch.ones_like(order[:, :1], dtype=torch.bool), labels.gather(1, order) > 0], 1
            )
            index = order[:, :, None, None].expand(-1, -1, *size)
            maps = []
            for scores in sources:
                fg = F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)
                fg = fg.gather(1, index)
                for threshold in thresholds:
                    logits = torch.cat([torch.full_like(fg[:, :1], threshold), fg], dim=1)
                    maps.append(logits.masked_fill(~present[:, :, None, None], float("-inf")).softmax(1))
            refined = torch.cat(maps, dim=1)
            if self.par is not None:
                refined = self.par(rgb, refined)
            if (refined.shape[-2], refined.shape[-1]) != out_hw:
                refined = F.interpolate(refined, size=out_hw, mode="bilinear", align_corners=False)
            to_class = torch.cat([torch.zeros_like(order[:, :1]), order + 1], dim=1)  # slot -> class id
            per_map = []
            for part in refined.split(slots + 1, dim=1):
                slot = part.masked_fill(~present[:, :, None, None], float("-inf")).argmax(dim=1)
                per_map.append(to_class.gather(1, slot.flatten(1)).view_as(slot))
        inside = None if crop_box is None else crop_box_mask(crop_box.to(labels.device), out_hw)
        out: list[tuple[Tensor, Tensor | None]] = []
        for i in range(len(sources)):
            found = per_map[i * len(thresholds) : (i + 1) * len(thresholds)]
            hard, band = found[0], None
            if with_band:
                high, low = found[1], found[2]
                band = torch.where(low == 0, torch.zeros_like(high), torch.full_like(high, 255))
                band = torch.where(high > 0, high, band)
            if inside is not None:
                hard = torch.where(inside, hard, torch.full_like(hard, 255))
                band = None if band is None else torch.where(inside, band, torch.full_like(band, 255))
            out.append((hard, band))
        return out

    @torch.no_grad()
    def random_walk_label(
        self, images: Tensor, labels: Tensor, cams: Tensor, crop_box: Tensor | None = None, radius: int = 8
    ) -> Tensor:
        """AFA's segmentation label after its switch iteration: CAM propagated on the predicted affinity.

        As AFA's ``dist_train_voc.py`` computes it: the affinity is predicted at the largest CAM scale
        (``int(s * H) x int(s * W)``); the labelled CAMs are resized to its stride-16 grid and propagated
        with a constant background at each band threshold (:func:`ecaseg.affinity.propagate_with_background`);
        each result is brought to the image size, refined by PAR at ``1 / par_downsample`` of it (the maps
        resized with ``align_corners=True``, as AFA's PAR does), brought back and arg-maxed over the
        background and the labelled classes; the two labels are combined as the uncertain band (high
        threshold's foreground, background where both say so, ``ignore_index`` elsewhere) and pixels outside
        ``crop_box`` are ignored. AFA refines each image inside its crop box; this runs on the whole crop.

        Args:
            images: ``[B, 3, H, W]`` normalised images.
            labels: ``[B, C]`` multi-hot labels.
            cams: ``[B, C, h, w]`` normalised CAMs (any grid; AFA's are at the image size).
            crop_box: ``[B, 4]`` ``(y0, y1, x0, x1)`` image content inside padded crops, or ``None``.
            radius: affinity window radius (AFA: 8).

        Returns:
            ``[B, H, W]`` long labels in ``{0..C, 255}``.
        """
        height, width = images.shape[-2:]
        scale = max(self.cam_scales)
        x = images
        if scale != 1.0:
            size = (max(1, int(scale * height)), max(1, int(scale * width)))
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        out = self.net(x, with_seg=False, with_aff=True)
        assert out.aff_pred is not None
        grid = (out.features.shape[-2], out.features.shape[-1])
        valid = F.interpolate(
            cams.float() * labels[:, :, None, None].float(), size=grid, mode="bilinear", align_corners=False
        )
        rgb = denormalize(images)
        if self.par_downsample > 1:
            small_hw = (height // self.par_downsample, width // self.par_downsample)
            rgb = F.interpolate(rgb, size=small_hw, mode="bilinear", align_corners=False)
        present = torch.cat([torch.ones_like(labels[:, :1], dtype=torch.bool), labels > 0], dim=1)
        # both thresholds' maps side by side: resizing and PAR are channel-independent, so one PAR call
        # (one image kernel) refines both, as two calls would
        rw = torch.cat(
            [
                propagate_with_background(
                    valid, out.aff_pred.float(), labels, threshold, radius=radius, validate=False
                )
                for threshold in (self.band[1], self.band[0])
            ],
            dim=1,
        )
        rw = F.interpolate(rw, size=(height, width), mode="bilinear", align_corners=False)
        if self.par is not None:
            rw = F.interpolate(rw, size=rgb.shape[-2:], mode="bilinear", align_corners=True)
            rw = F.interpolate(self.par(rgb, rw), size=(height, width), mode="bilinear", align_corners=False)
        high, low = (
            part.masked_fill(~present[:, :, None, None], float("-inf")).argmax(dim=1)
            for part in rw.split(labels.shape[1] + 1, dim=1)
        )
        label = torch.where(low == 0, torch.zeros_like(high), torch.full_like(high, 255))
        label = torch.where(high > 0, high, label)
        if crop_box is not None:
            inside = crop_box_mask(crop_box.to(label.device), (height, width))
            label = torch.where(inside, label, torch.full_like(label, 255))
        return label

    @staticmethod
    def _resize_label(label: Tensor, out_hw: tuple[int, int]) -> Tensor:
        if label.shape[-2:] != out_hw:
            label = F.interpolate(label[:, None].float(), size=out_hw, mode="nearest")[:, 0].long()
        return label

    @torch.no_grad()
    def __call__(
        self,
        images: Tensor,
        labels: Tensor,
        crop_box: Tensor | None = None,
        features: Tensor | None = None,
        with_band: bool = True,
        with_carm: bool = True,
        update_prototypes: bool = False,
        max_labels: int | None = None,
        raw_at_one: Tensor | None = None,
    ) -> PseudoLabels:
        """Pseudo-label a batch.

        Args:
            images: ``[B, 3, H, W]`` ImageNet-normalised images.
            labels: ``[B, C]`` multi-hot image-level labels.
            crop_box: ``[B, 4]`` (y0, y1, x0, x1) image content inside padded crops, or ``None``.
            features: ``[B, D, h, w]`` backbone stage-4 features for the prototypes; computed if ``None``.
            with_band: also produce the band labels (uncertain pixels ignored).
            with_carm: produce CARM and its labels (needs ``dino`` and ``carm_generator``).
            update_prototypes: update the momentum prototypes (Eq. 8), only during training.
            max_labels: the largest number of labels of one image in the batch, if known on the host
                (from the CPU batch): PAR then refines only that many channels per image (exact).
                ``None`` refines all C channels (no host sync either way).
            raw_at_one: the network's CAM of ``images`` at scale 1.0, already computed (see
                :func:`ecaseg.cam.multiscale_cam`); ``None`` computes it.
        """
        height, width = images.shape[-2:]
        cams = multiscale_cam(
            self.net,
            images,
            labels,
            scales=self.cam_scales,
            flip=self.cam_flip,
            rule=self.cam_rule,
            raw_at_one=raw_at_one,
        )
        cams_par = cams  # what PAR refines: AFA's rule keeps the image-size CAM for it
        if features is None and with_carm and self.carm_generator is not None:
            features = self.net(images, with_seg=False, with_aff=False).features
        if cams.shape[-2:] != (features.shape[-2:] if features is not None else cams.shape[-2:]):
            assert features is not None
            cams = F.interpolate(cams, size=features.shape[-2:], mode="bilinear", align_corners=False)
            if self.cam_rule != "afa":
                cams_par = cams
        rgb = denormalize(images)
        if self.par_downsample > 1:
            size = (height // self.par_downsample, width // self.par_downsample)
            rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False)
        out_hw = (height, width)
        sources = [cams_par]
        carm: Tensor | None = None
        carm_raw: Tensor | None = None
        carm_label: Tensor | None = None
        carm_label_band: Tensor | None = None
        if with_carm and self.dino is not None and self.carm_generator is not None:
            assert features is not None
            dino = self.dino(images, with_tokens=False)  # the prototypes use the backbone's features
            result = self.carm_generator(
                cams, labels, dino, features.detach().float(), update_prototypes=update_prototypes
            )
            carm, carm_raw = result.carm, result.carm_raw
            if self.carm_background == "map":  # background CARM as the background score: PAR on [bg, fg]
                box = (
                    None
                    if crop_box is None
                    else torch.div(crop_box, self.par_downsample, rounding_mode="floor")
                )
                label = refine_pseudo_label(
                    self.par,
                    rgb,
                    result.carm[:, 1:],
                    labels,
                    crop_box=box,
                    bg_scores=result.carm[:, :1],
                    validate=False,
                    softmax=self.par_input == "softmax",
                )
                carm_label = self._resize_label(label, out_hw)
                carm_label_band = carm_label if with_band else None
            else:
                sources.append(result.carm[:, 1:])
        if self.par_input == "softmax":
            labelled = self._softmax_labels(rgb, sources, labels, crop_box, out_hw, with_band, max_labels)
            cam_label, cam_label_band = labelled[0]
            if len(labelled) > 1:
                carm_label, carm_label_band = labelled[1]
            return PseudoLabels(
                cams=cams,
                cam_label=cam_label,
                cam_label_band=cam_label_band,
                carm=carm,
                carm_raw=carm_raw,
                carm_label=carm_label,
                carm_label_band=carm_label_band,
                cams_refined=cams_par,
            )
        refined = self._refine_scores(rgb, sources, labels, max_labels)
        if len(refined) > 1:
            carm_label = self._label(refined[1], labels, crop_box, out_hw, False)
            if with_band:
                carm_label_band = self._label(refined[1], labels, crop_box, out_hw, True)
        return PseudoLabels(
            cams=cams,
            cam_label=self._label(refined[0], labels, crop_box, out_hw, False),
            cam_label_band=self._label(refined[0], labels, crop_box, out_hw, True) if with_band else None,
            carm=carm,
            carm_raw=carm_raw,
            carm_label=carm_label,
            carm_label_band=carm_label_band,
            cams_refined=cams_par,
        )
