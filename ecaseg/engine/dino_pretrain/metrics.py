"""How meaningful a ViT's affinity is: :func:`affinity_auc` and its pieces.

* :func:`affinity_auc` -- ROC AUC of :func:`ecaseg.carm.affinity_graph` values (the affinity of Eq. (4) of
  the ECA paper) for same-object versus different-class patch pairs of ground-truth masks (masks are used
  for the measurement only).
* :func:`foreground_cue_auc` -- ROC AUC of the foreground cues (the class-token cue of Eq. (5), per head
  too, and :func:`ecaseg.carm.contrast_cue`) for foreground versus background patches.
* :func:`mann_whitney_auc` -- the rank-based AUC.
* :func:`patch_majority` -- the majority label of every patch.

Layout: engine layer; imports ``ecaseg.carm``, ``ecaseg.data`` and ``ecaseg.dino_affinity``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ecaseg.carm import affinity_graph, contrast_cue, foreground_cue
from ecaseg.data import normalize
from ecaseg.data.synthetic import SyntheticConfig, SyntheticWSSSDataset, render_sample
from ecaseg.dino_affinity import DINOAffinity
from ecaseg.engine.dino_pretrain.data import _unit_image
from ecaseg.errors import DatasetError

__all__ = ["affinity_auc", "foreground_cue_auc", "mann_whitney_auc", "patch_majority"]


def mann_whitney_auc(positives: Tensor, negatives: Tensor) -> Tensor:
    """ROC AUC from ranks (Mann-Whitney U): ``P(score_pos > score_neg) + 0.5 P(equal)``.

    All scores are ranked together, tied values get the mean of their ranks, and
    ``AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` with ``R_pos`` the sum of the positives' ranks.

    Args:
        positives: ``[P]`` scores of positive pairs (P >= 1).
        negatives: ``[Q]`` scores of negative pairs (Q >= 1).

    Returns:
        0-dim float64 tensor in [0, 1].

    Example:
        >>> mann_whitney_auc(torch.tensor([0.9, 0.5]), torch.tensor([0.5, 0.1])).item()
        0.875
    """
    if positives.numel() == 0 or negatives.numel() == 0:
        raise ValueError("mann_whitney_auc needs at least one positive and one negative score")
    scores = torch.cat((positives.reshape(-1), negatives.reshape(-1))).double()
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    before = torch.cumsum(counts, 0) - counts  # scores strictly below each distinct value
    mean_rank = before.double() + (counts.double() + 1.0) / 2.0  # 1-based average rank of each value
    n_pos, n_neg = positives.numel(), negatives.numel()
    rank_sum = mean_rank[inverse[:n_pos]].sum()
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def patch_majority(labels: Tensor, patch: int, ignore_index: int = 255) -> Tensor:
    """Majority label of every ``patch x patch`` cell of a label map (ties: the smallest label).

    Args:
        labels: ``[H, W]`` integer map with H and W multiples of ``patch``.
        patch: Cell side.
        ignore_index: Label not counted; a cell holding only it gets -1.

    Returns:
        ``[h * w]`` long, row-major, -1 for fully ignored cells.

    Example:
        >>> patch_majority(torch.tensor([[1, 1, 0, 0], [1, 2, 0, 255]]), 2).tolist()
        [1, 0]
    """
    if labels.ndim != 2 or labels.shape[0] % patch or labels.shape[1] % patch:
        raise ValueError(f"labels must be [H, W] with sides multiple of {patch}, got {tuple(labels.shape)}")
    lab = labels.long()
    valid = lab != ignore_index
    lab = torch.where(valid, lab, torch.zeros_like(lab))
    num = int(lab.max()) + 1
    onehot = F.one_hot(lab, num).permute(2, 0, 1).float() * valid.float()
    counts = F.avg_pool2d(onehot[None], patch)[0].flatten(1)  # [num, N]
    best = counts.argmax(dim=0)
    return torch.where(counts.sum(dim=0) > 0, best, torch.full_like(best, -1))


def _item_arrays(item: dict[str, Any], index: int) -> tuple[Tensor, Tensor]:
    if "mask" not in item:
        raise DatasetError(f"item {index} has no 'mask'; affinity_auc needs ground-truth masks")
    image = _unit_image(item["image"], index)
    mask = item["mask"]
    mask_t = torch.from_numpy(np.asarray(mask)) if isinstance(mask, np.ndarray) else torch.as_tensor(mask)
    if mask_t.shape != image.shape[-2:]:
        raise DatasetError(f"item {index}: mask {tuple(mask_t.shape)} and image {tuple(image.shape)} differ")
    return normalize(image), mask_t.long()


def _instances(dataset: Any, item: dict[str, Any], index: int) -> Tensor | None:
    """The item's instance map: its ``"instances"`` entry, else the synthetic generator's, else None."""
    if "instances" in item:
        inst = item["instances"]
        return torch.from_numpy(np.asarray(inst)).long() if isinstance(inst, np.ndarray) else inst.long()
    if isinstance(dataset, SyntheticWSSSDataset) and isinstance(dataset.config, SyntheticConfig):
        return torch.from_numpy(render_sample(dataset.config, dataset.split, index).instances).long()
    return None


@torch.no_grad()
def affinity_auc(
    dino: DINOAffinity,
    dataset: Any,
    num_images: int = 50,
    max_pairs_per_image: int = 2000,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """How well the affinity graph of Eq. (4) separates same-object from different-class patch pairs.

    For each of the first ``num_images`` items: the image goes through ``dino`` and
    :func:`ecaseg.carm.affinity_graph` gives the cosine similarity of every pair of patch keys. Every patch
    gets the majority class of its pixels in the ground-truth mask (and the majority object of the instance
    map, see below); over the unordered pairs ``i < j``:

    * **positives**: both patches in the same object -- same non-zero majority instance of an instance map
      (the item's ``"instances"`` entry if it has one, else, for
      :class:`~ecaseg.data.synthetic.SyntheticWSSSDataset`, the generator's map from
      :func:`ecaseg.data.synthetic.render_sample`), otherwise the same foreground class; two objects of the
      same class form neither positives nor negatives;
    * **negatives**: the patches' majority classes differ -- both foreground (``auc_fg``) or one background
      (``auc_bg``); ``auc`` uses both kinds together.

    At most ``max_pairs_per_image`` positives and as many negatives per image are drawn at random (without
    replacement); the AUC is :func:`mann_whitney_auc` over the pooled pairs of all images (0.5 = chance).

    Args:
        dino: The frozen ViT (its device is used).
        dataset: Items with ``"image"`` (uint8 ``[H, W, 3]`` or a normalised ``[3, H, W]`` tensor),
            ``"mask"`` (``[H, W]``, ``ignore_index`` for unlabelled pixels) and optionally ``"instances"``
            (``[H, W]`` integer object ids, 0 = no object).
        num_images: How many items, from the first.
        max_pairs_per_image: Cap on positives and on negatives per image.
        generator: CPU generator of the pair sampling (``None``: seeded with 0).
        ignore_index: Mask value of unlabelled pixels; fully ignored patches take part in no pair.

    Returns:
        ``{"auc", "auc_fg", "auc_bg"}`` (floats, NaN when a kind has no pairs), ``"mean_positive"``,
        ``"mean_negative"`` (mean similarities), ``"num_positive"``, ``"num_negative"``,
        ``"num_negative_fg"``, ``"num_images"`` and ``"positives"`` (``"same object"`` or ``"same class"``).

    Example:
        >>> from ecaseg.data.synthetic import SyntheticConfig, SyntheticWSSSDataset
        >>> ds = SyntheticWSSSDataset("val", SyntheticConfig(image_size=64, num_val=2))
        >>> dino = DINOAffinity("vit_nano_p8", allow_random_init=True)
        >>> res = affinity_auc(dino, ds, num_images=2, max_pairs_per_image=100)
        >>> res["positives"], 0.0 <= res["auc"] <= 1.0
        ('same object', True)
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = dino.vit.patch_embed.proj.weight.device
    patch = dino.patch_size
    pos_all: list[Tensor] = []
    neg_all: list[Tensor] = []
    neg_fg_all: list[Tensor] = []
    count = min(num_images, len(dataset))
    if count < 1:
        raise DatasetError("affinity_auc needs at least one image")
    kind = "same class"
    for index in range(count):
        item = dataset[index]
        image, mask = _item_arrays(item, index)
        inst = _instances(dataset, item, index)
        if inst is not None and inst.shape != mask.shape:
            raise DatasetError(
                f"item {index}: instances {tuple(inst.shape)} and mask {tuple(mask.shape)} differ"
            )
        feats = dino(image[None].to(device))
        h, w = feats.grid
        size = (h * patch, w * patch)
        if tuple(mask.shape) != size:
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
            if inst is not None:
                inst = F.interpolate(inst[None, None].float(), size=size, mode="nearest")[0, 0].long()
        cls = patch_majority(mask, patch, ignore_index)
        graph = affinity_graph(feats.keys)[0].cpu()
        i, j = torch.triu_indices(h * w, h * w, offset=1)
        ci, cj = cls[i], cls[j]
        labelled = (ci >= 0) & (cj >= 0)
        if inst is not None:
            kind = "same object"
            obj = patch_majority(inst, patch, ignore_index=-1)
            positive = (obj[i] == obj[j]) & (obj[i] > 0) & (ci > 0) & (cj > 0)
        else:
            positive = (ci == cj) & (ci > 0)
        negative = labelled & (ci != cj) & ~positive
        values = graph[i, j]
        pos_idx = torch.nonzero(positive).flatten()
        neg_idx = torch.nonzero(negative).flatten()
        if pos_idx.numel() > max_pairs_per_image:
            pos_idx = pos_idx[torch.randperm(pos_idx.numel(), generator=gen)[:max_pairs_per_image]]
        if neg_idx.numel() > max_pairs_per_image:
            neg_idx = neg_idx[torch.randperm(neg_idx.numel(), generator=gen)[:max_pairs_per_image]]
        both_fg = (ci[neg_idx] > 0) & (cj[neg_idx] > 0)
        pos_all.append(values[pos_idx])
        neg_all.append(values[neg_idx])
        neg_fg_all.append(both_fg)
    pos = torch.cat(pos_all)
    neg = torch.cat(neg_all)
    fg = torch.cat(neg_fg_all)

    def auc(p: Tensor, n: Tensor) -> float:
        return float(mann_whitney_auc(p, n)) if p.numel() and n.numel() else float("nan")

    return {
        "auc": auc(pos, neg),
        "auc_fg": auc(pos, neg[fg]),
        "auc_bg": auc(pos, neg[~fg]),
        "mean_positive": float(pos.mean()) if pos.numel() else float("nan"),
        "mean_negative": float(neg.mean()) if neg.numel() else float("nan"),
        "num_positive": int(pos.numel()),
        "num_negative": int(neg.numel()),
        "num_negative_fg": int(fg.sum()),
        "num_images": count,
        "positives": kind,
    }


@torch.no_grad()
def foreground_cue_auc(
    dino: DINOAffinity, dataset: Any, num_images: int = 50, ignore_index: int = 255
) -> dict[str, Any]:
    """How well the foreground cues of a ViT single out the objects: AUC for object versus background patches.

    For each of the first ``num_images`` items, every patch takes the majority label of its pixels in the
    ground-truth mask (:func:`patch_majority`; fully ignored patches are left out). The cues are scored with
    the patches of majority label ``> 0`` as positives and those of majority 0 as negatives, pooled over all
    images (:func:`mann_whitney_auc`; 0.5 = chance, below 0.5 = the cue prefers the background):

    * ``cls_auc``: the class-token cue of Eq. (5) (:func:`ecaseg.carm.foreground_cue`, heads concatenated as
      in the paper), with the paper's sign (a higher value means foreground);
    * ``cls_auc_heads``: the same cue from each attention head alone (query and keys of one head);
    * ``contrast_auc``: :func:`ecaseg.carm.contrast_cue`.

    Args:
        dino: The frozen ViT (its device is used).
        dataset: Items with ``"image"`` (uint8 ``[H, W, 3]`` or a normalised ``[3, H, W]`` tensor) and
            ``"mask"`` (``[H, W]``, ``ignore_index`` for unlabelled pixels).
        num_images: How many items, from the first.
        ignore_index: Mask value of unlabelled pixels.

    Returns:
        ``{"cls_auc", "contrast_auc"}`` (floats), ``"cls_auc_heads"`` (list of floats),
        ``"num_foreground"``, ``"num_background"`` (patch counts) and ``"num_images"``.

    Raises:
        DatasetError: Without images, or when the pooled patches lack foreground or background.

    Example:
        >>> from ecaseg.data.synthetic import SyntheticConfig, SyntheticWSSSDataset
        >>> ds = SyntheticWSSSDataset("val", SyntheticConfig(image_size=64, num_val=2))
        >>> dino = DINOAffinity("vit_nano_p8", allow_random_init=True)
        >>> res = foreground_cue_auc(dino, ds, num_images=2)
        >>> len(res["cls_auc_heads"]), 0.0 <= res["cls_auc"] <= 1.0
        (3, True)
    """
    device = dino.vit.patch_embed.proj.weight.device
    patch, heads = dino.patch_size, dino.num_heads
    count = min(num_images, len(dataset))
    if count < 1:
        raise DatasetError(
            f"foreground_cue_auc needs at least one image; got num_images={num_images} "
            f"and a dataset of {len(dataset)} items"
        )
    cues: list[Tensor] = []
    contrasts: list[Tensor] = []
    head_cues: list[Tensor] = []
    fg_all: list[Tensor] = []
    for index in range(count):
        item = dataset[index]
        image, mask = _item_arrays(item, index)
        feats = dino(image[None].to(device), with_tokens=False)
        h, w = feats.grid
        size = (h * patch, w * patch)
        if tuple(mask.shape) != size:
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        cls = patch_majority(mask, patch, ignore_index)
        keep = cls >= 0
        q, k = feats.cls_query.cpu(), feats.keys.cpu()
        cues.append(foreground_cue(q, k)[0][keep])
        contrasts.append(contrast_cue(k)[0][keep])
        qh = q.view(1, heads, -1).transpose(0, 1)  # [heads, 1, d]
        kh = k.view(1, k.shape[1], heads, -1).permute(2, 0, 1, 3)[:, 0]  # [heads, N, d]
        head_cues.append(foreground_cue(qh[:, 0], kh)[:, keep])
        fg_all.append(cls[keep] > 0)
    fg = torch.cat(fg_all)
    if not fg.any() or fg.all():
        raise DatasetError("foreground_cue_auc needs both foreground and background patches")
    cue, con, per_head = torch.cat(cues), torch.cat(contrasts), torch.cat(head_cues, dim=1)
    return {
        "cls_auc": float(mann_whitney_auc(cue[fg], cue[~fg])),
        "contrast_auc": float(mann_whitney_auc(con[fg], con[~fg])),
        "cls_auc_heads": [float(mann_whitney_auc(c[fg], c[~fg])) for c in per_head],
        "num_foreground": int(fg.sum()),
        "num_background": int((~fg).sum()),
        "num_images": count,
    }
