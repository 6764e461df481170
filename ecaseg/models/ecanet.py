"""The trainable network of ECA (inherited from AFA): MiT encoder + CAM classifier + MLP decoder + affinity.

One forward pass of the encoder feeds all three heads:

* **classification / CAM** (paper Sec. 3.1, Eq. (1)): a bias-free 1x1 convolution ``W`` with ``C = K - 1``
  outputs. Image logits are ``W · GMP(F)`` (global max pooling of the stage-4 map ``F``); the raw CAM is
  ``ReLU(W * F)``.
* **segmentation**: the SegFormer all-MLP decoder on the four encoder maps (1/4 resolution).
* **affinity from attention** (AFA): the raw attention scores ``S`` (``q k^T``) of the last
  ``attn_blocks`` blocks of stage 4, all heads stacked (MiT-B1: 2 x 8 = 16 maps ``[N4, N4]``), are
  symmetrised and mapped by a 1x1 convolution to one channel, then a sigmoid:
  ``A = sigmoid(conv1x1(S + S^T))`` (AFA's design: the transpose is *added*, not concatenated, so ``A`` is
  symmetric and ``attn_proj`` has ``attn_blocks * heads`` inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecaseg.errors import ConfigError
from ecaseg.models.mit import WSSS_STRIDES, MixVisionTransformer, create_backbone
from ecaseg.models.segformer_head import SegFormerHead
from ecaseg.models.timm_backbone import TIMM_PREFIX, TimmBackbone, is_timm_backbone

__all__ = ["ECANet", "ECAOutput", "attention_to_affinity", "gmp_logits", "raw_cam", "stochastic_layers"]


def stochastic_layers(module: nn.Module) -> list[str]:
    """Names of the submodules that make ``module``'s training-mode forward differ from call to call or
    depend on the batch: dropout or drop-path with a positive rate, batch normalisation in training mode.

    An empty list means that two training-mode forwards of the same images give the same output (to float
    rounding), whatever else is in the batch; the trainer then reuses its forward's CAM in the multi-scale
    CAM (``method.reuse_train_cam: auto``).

    Example:
        >>> stochastic_layers(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
        ['1']
        >>> stochastic_layers(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)))
        []
    """
    names = []
    for name, m in module.named_modules():
        rate = getattr(m, "drop_prob", None)  # timm's DropPath
        if isinstance(m, nn.modules.dropout._DropoutNd):
            rate = m.p
        elif isinstance(getattr(m, "attn_drop", None), float):  # MiT's attention-probability dropout
            rate = m.attn_drop
        batch_stats = isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        if batch_stats or (isinstance(rate, float) and rate > 0):
            names.append(name)
    return names


@dataclass
class ECAOutput:
    """Everything a training step needs from one forward pass.

    Attributes:
        cls_logits: Image-level logits ``[B, C]`` (global max pooling, then the 1x1 classifier).
        features: Stage-4 map ``[B, D4, h, w]`` (1/16 of the input with the WSSS strides).
        cams: Raw CAM ``ReLU(classifier(features))`` ``[B, C, h, w]`` (with gradient).
        seg_logits: Decoder logits ``[B, K, H/4, W/4]``, or ``None`` when not requested.
        aff_pred: Predicted affinity ``[B, N4, N4]`` in (0, 1), symmetric, or ``None`` when not requested.
    """

    cls_logits: Tensor
    features: Tensor
    cams: Tensor
    seg_logits: Tensor | None = None
    aff_pred: Tensor | None = None


def _as_matrix(weight: Tensor) -> Tensor:
    return weight.reshape(weight.shape[0], -1)


def gmp_logits(features: Tensor, weight: Tensor) -> Tensor:
    """Image logits: global max pooling of ``features`` then a bias-free linear classifier.

    Args:
        features: ``[B, D, h, w]``.
        weight: Classifier weight ``[C, D]`` or ``[C, D, 1, 1]``.

    Returns:
        ``[B, C]``.

    Example:
        >>> f = torch.tensor([[[[1.0, 3.0]], [[2.0, -1.0]]]])  # [1, 2, 1, 2]
        >>> gmp_logits(f, torch.tensor([[1.0, 1.0]])).tolist()
        [[5.0]]
    """
    if features.ndim != 4:
        raise ValueError(f"features must be [B, D, h, w], got {tuple(features.shape)}")
    return features.amax(dim=(2, 3)) @ _as_matrix(weight).t().to(features.dtype)


def raw_cam(features: Tensor, weight: Tensor) -> Tensor:
    """Raw class activation maps ``ReLU(W * F)`` (the un-normalised part of Eq. (1)).

    Args:
        features: ``[B, D, h, w]``.
        weight: Classifier weight ``[C, D]`` or ``[C, D, 1, 1]``.

    Returns:
        ``[B, C, h, w]``, non-negative.

    Example:
        >>> f = torch.tensor([[[[1.0, -3.0]]]])  # [1, 1, 1, 2]
        >>> raw_cam(f, torch.tensor([[2.0]])).tolist()
        [[[[2.0, 0.0]]]]
    """
    if features.ndim != 4:
        raise ValueError(f"features must be [B, D, h, w], got {tuple(features.shape)}")
    w = _as_matrix(weight).to(features.dtype)
    return F.relu(F.conv2d(features, w[:, :, None, None]))


def attention_to_affinity(attns: Sequence[Tensor], weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """AFA's affinity prediction ``sigmoid(conv1x1(S + S^T))`` from stacked attention maps.

    With ``S`` the channel-concatenation of ``attns`` (``M`` maps in total) and a 1x1 convolution of weight
    ``w [M]`` and bias ``b``, ``conv1x1(S + S^T) = s + s^T + b`` with ``s = sum_m w_m S_m``; this identity is
    used so that no ``[B, M, N, N]`` transpose is materialised. Computed in float32.

    Args:
        attns: Attention maps ``[B, heads_i, N, N]`` (e.g. the last 2 blocks of MiT stage 4).
        weight: 1x1 convolution weight with ``M = sum(heads_i)`` inputs (``[1, M, 1, 1]`` or ``[M]``).
        bias: Optional bias (one value).

    Returns:
        Affinity probabilities ``[B, N, N]``, symmetric.

    Example:
        >>> a = torch.tensor([[[[0.0, 2.0], [0.0, 0.0]]]])  # one map [1, 1, 2, 2]
        >>> attention_to_affinity([a], torch.ones(1), torch.zeros(1)).tolist()  # sigmoid([[0, 2], [2, 0]])
        [[[0.5, 0.8807970285415649], [0.8807970285415649, 0.5]]]
    """
    w = weight.reshape(-1).float()
    total = sum(a.shape[1] for a in attns)
    if total != w.numel():
        raise ValueError(f"attention maps have {total} channels but the projection expects {w.numel()}")
    s: Tensor | None = None
    start = 0
    for a in attns:
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"attention maps must be [B, heads, N, N], got {tuple(a.shape)}")
        heads = a.shape[1]
        part = (a.float() * w[start : start + heads].view(1, heads, 1, 1)).sum(dim=1)
        s = part if s is None else s + part
        start += heads
    if s is None:
        raise ValueError("attention_to_affinity needs at least one attention map")
    logits = s + s.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.reshape(()).float()
    return torch.sigmoid(logits)


class ECANet(nn.Module):
    """MiT backbone with the CAM classifier, the SegFormer decoder and AFA's attention-to-affinity head.

    Args:
        backbone: Backbone name (``"mit_nano"``, ``"mit_b0"`` .. ``"mit_b5"``, or ``"timm:<name>"`` for a timm
            CNN, see :class:`~ecaseg.models.timm_backbone.TimmBackbone`) or a built encoder.
        num_classes: K, background included (21 for VOC, 81 for COCO).
        backbone_weights: ImageNet checkpoint of the backbone (NVlabs ``.pth`` or Hugging Face folder; for
            ``timm:`` backbones the timm state-dict file); ``None`` keeps the random initialisation.
        strides: Stage strides of the backbone (WSSS: ``(4, 2, 2, 1)``); a ``timm:`` backbone uses their
            product as its output stride.
        decoder_dim: Embedding width of the decoder.
        attn_blocks: How many of the last stage-4 blocks feed the affinity head (2 in AFA; 1 for a ``timm:``
            backbone, whose single attention probe stands in for the blocks).
        **backbone_kwargs: Extra backbone arguments (``drop_path_rate``...).

    Attributes:
        num_classes: K. feature_dim: D4, channels of the stage-4 map. stride: output stride of the stage-4
        map (16 with the WSSS strides). attn_blocks: as given.

    Example:
        >>> net = ECANet("mit_nano", num_classes=3).eval()
        >>> out = net(torch.zeros(1, 3, 64, 64))
        >>> tuple(out.cls_logits.shape), tuple(out.seg_logits.shape), tuple(out.aff_pred.shape)
        ((1, 2), (1, 3, 16, 16), (1, 16, 16))
    """

    def __init__(
        self,
        backbone: str | MixVisionTransformer | TimmBackbone = "mit_b1",
        num_classes: int = 21,
        backbone_weights: str | PathLike[str] | None = None,
        strides: Sequence[int] = WSSS_STRIDES,
        decoder_dim: int = 256,
        attn_blocks: int = 2,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes (K, background included) must be >= 2, got {num_classes}")
        if isinstance(backbone, str) and is_timm_backbone(backbone):
            stride = 1
            for v in strides:
                stride *= int(v)
            backbone = TimmBackbone(
                backbone[len(TIMM_PREFIX) :],
                weights=backbone_weights,
                output_stride=stride,
                **backbone_kwargs,
            )
        elif isinstance(backbone, str):
            backbone = create_backbone(backbone, weights=backbone_weights, strides=strides, **backbone_kwargs)
        elif backbone_weights is not None:
            if isinstance(backbone, TimmBackbone):
                raise ConfigError("pass the weights of a built TimmBackbone to its constructor")
            from ecaseg.models.checkpoints import load_mit_weights

            load_mit_weights(backbone, backbone_weights)
        if not 1 <= attn_blocks <= backbone.depths[3]:
            raise ConfigError(
                f"attn_blocks must be in [1, {backbone.depths[3]}] (stage-4 depth), got {attn_blocks}"
            )
        self.backbone: MixVisionTransformer | TimmBackbone = backbone
        self.num_classes = num_classes
        self.feature_dim = backbone.embed_dims[-1]
        self.stride = backbone.stride
        self.attn_blocks = attn_blocks
        self.classifier = nn.Conv2d(self.feature_dim, num_classes - 1, 1, bias=False)
        self.decoder = SegFormerHead(backbone.embed_dims, embed_dim=decoder_dim, num_classes=num_classes)
        self.attn_proj = nn.Conv2d(attn_blocks * backbone.num_heads[3], 1, 1)
        # AFA's initialisation of the projection (He normal, fan-out, a = sqrt(5)).
        nn.init.kaiming_normal_(self.attn_proj.weight, a=5**0.5, mode="fan_out")

    def forward(self, x: Tensor, *, with_seg: bool = True, with_aff: bool = True) -> ECAOutput:
        """Run the encoder once and the requested heads.

        Args:
            x: Normalised images ``[B, 3, H, W]``.
            with_seg: Also run the decoder.
            with_aff: Also return the affinity prediction (the last stage-4 blocks then compute attention
                explicitly instead of with SDPA).

        Returns:
            :class:`ECAOutput`.
        """
        attns: list[Tensor] = []
        if with_aff:
            feats, attns = self.backbone.forward_with_attn(x, last_n=self.attn_blocks)
        else:
            feats = self.backbone(x)
        f4 = feats[-1]
        return ECAOutput(
            cls_logits=gmp_logits(f4, self.classifier.weight),
            features=f4,
            cams=raw_cam(f4, self.classifier.weight),
            seg_logits=self.decoder(feats) if with_seg else None,
            aff_pred=attention_to_affinity(attns, self.attn_proj.weight, self.attn_proj.bias)
            if with_aff
            else None,
        )

    def forward_cam(self, x: Tensor, relu: bool = True) -> Tensor:
        """Raw CAM ``[B, C, h, w]`` only (SDPA attention, no decoder); used for multi-scale CAM.

        ``relu=False`` returns the classifier's response before the ReLU of Eq. (1) (what AFA's
        ``cam_only`` forward returns; its multi-scale CAM applies the ReLU after resizing).
        """
        features = self.backbone(x)[-1]
        if relu:
            return raw_cam(features, self.classifier.weight)
        return F.conv2d(features, self.classifier.weight.to(features.dtype))

    def forward_seg(self, x: Tensor) -> Tensor:
        """Segmentation logits ``[B, K, H/4, W/4]`` (inference; not upsampled)."""
        return self.decoder(self.backbone(x))

    def param_groups(
        self,
        lr: float,
        weight_decay: float,
        *,
        head_lr_mult: float = 10.0,
        backbone_norm_lr_mult: float = 0.0,
        decay_groups: Literal["afa", "no_bias_decay"] = "afa",
    ) -> list[dict[str, Any]]:
        """Optimiser parameter groups for AdamW.

        ``decay_groups="afa"`` (AFA's released ``get_param_groups``, the default):

        * ``"backbone"``: every backbone parameter whose name does not contain ``"norm"`` (biases
          included), at ``lr`` with ``weight_decay``;
        * ``"backbone_norm"``: the backbone's norm layers (``"norm"`` in the name), at
          ``lr * backbone_norm_lr_mult`` (AFA: 0, frozen) without weight decay;
        * ``"heads"``: classifier, attention projection, decoder (and the attention probe of a ``timm:``
          backbone), at ``head_lr_mult * lr`` (10x) with ``weight_decay``.

        ``decay_groups="no_bias_decay"`` (ecaseg 0.1): the second group holds every 1-d backbone parameter
        (norm weights and all biases) instead, still at ``lr * backbone_norm_lr_mult`` without decay.

        Only parameters with ``requires_grad`` are included; each appears exactly once. Every group carries
        a ``"name"`` key (kept by torch optimisers) and its ``"lr"``.

        Args:
            lr: Base learning rate (6e-5 in the paper).
            weight_decay: Weight decay (0.01 in the paper).
            head_lr_mult: Learning-rate factor of the new heads.
            backbone_norm_lr_mult: Learning-rate factor of the second backbone group.
            decay_groups: ``"afa"`` or ``"no_bias_decay"`` (see above).

        Returns:
            A list of 3 dicts with ``name``, ``params``, ``lr``, ``weight_decay``.
        """
        if decay_groups not in ("afa", "no_bias_decay"):
            raise ValueError(f"decay_groups must be 'afa' or 'no_bias_decay', got {decay_groups!r}")
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        heads: list[nn.Parameter] = []
        for name, p in self.backbone.named_parameters():
            if not p.requires_grad:
                continue
            if isinstance(self.backbone, TimmBackbone) and name.startswith("attn_"):
                heads.append(p)  # the attention probe is new, like the affinity projection
            elif decay_groups == "afa":
                (no_decay if "norm" in name else decay).append(p)
            else:
                (no_decay if p.ndim <= 1 else decay).append(p)
        heads += [
            p
            for m in (self.classifier, self.attn_proj, self.decoder)
            for p in m.parameters()
            if p.requires_grad
        ]
        second = "backbone_norm" if decay_groups == "afa" else "backbone_no_decay"
        return [
            {"name": "backbone", "params": decay, "lr": lr, "weight_decay": weight_decay},
            {"name": second, "params": no_decay, "lr": lr * backbone_norm_lr_mult, "weight_decay": 0.0},
            {"name": "heads", "params": heads, "lr": lr * head_lr_mult, "weight_decay": weight_decay},
        ]
