"""Any timm convolutional network as the encoder of :class:`~ecaseg.models.ECANet` (``"timm:<name>"``).

The paper uses the MiT encoder of SegFormer; WSSS work also uses ResNets (AFA and ToCo compare with
ResNet-38/101 methods), and a small randomly initialised transformer does not learn fine part cues from
image-level labels in a few hundred iterations where a small ResNet does (measured in the docs, page
"Backbones"). :class:`TimmBackbone` wraps ``timm.create_model(name, features_only=True)`` so that it offers
the interface ECANet uses from :class:`~ecaseg.models.mit.MixVisionTransformer`:

* ``forward(x)`` returns the last four feature maps (strides 4, 8, 16, 16 with ``output_stride=16``, the WSSS
  setting: the last stage is dilated instead of downsampled);
* ``forward_with_attn(x, last_n=1)`` also returns raw attention scores ``q k^T`` over the stage-4 tokens.
  A CNN has no self-attention, so the wrapper owns one attention *probe*: a LayerNorm and a linear
  query/key projection with ``attn_heads`` heads on the stage-4 tokens. AFA's affinity branch
  (:func:`~ecaseg.models.ecanet.attention_to_affinity`) turns these scores into the affinity that the
  affinity loss supervises, exactly as it does with the MiT's last-block attention; the loss reaches the
  backbone through the probe's input.

Weights: ``weights`` is a local timm/torchvision state-dict file of the *classification* model (e.g. timm's
``resnet50.a1_in1k`` ``pytorch_model.bin`` / ``model.safetensors``), read with timm's ``load_state_dict`` and
loaded strictly into the feature model (only the classifier's keys may be left over). A file whose keys do
not match raises :class:`~ecaseg.errors.CheckpointError` naming the file; there is no silent fallback to
random weights (timm's own ``pretrained=True`` loads feature models non-strictly, so it is not used).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg, load_state_dict
from torch import Tensor, nn

from ecaseg.errors import CheckpointError, ConfigError
from ecaseg.models.mit import attention_scores

__all__ = ["TIMM_PREFIX", "TimmBackbone", "is_timm_backbone"]

TIMM_PREFIX = "timm:"
"""Backbone names starting with this prefix are timm models (``"timm:resnet50"``)."""


def is_timm_backbone(name: str) -> bool:
    """Whether a backbone name selects a timm model.

    Example:
        >>> is_timm_backbone("timm:resnet18"), is_timm_backbone("mit_b1")
        (True, False)
    """
    return name.startswith(TIMM_PREFIX)


def _load_strict(body: nn.Module, name: str, path: Path) -> None:
    """Load a timm classification state dict into the feature model, refusing any mismatch.

    (timm's own ``pretrained=True`` path loads feature models non-strictly, so a truncated file would leave
    random layers without an error.) Only the classifier's keys may be left over.
    """
    if not path.is_file():
        raise CheckpointError(f"backbone weights {path} do not exist (backbone 'timm:{name}')")
    try:
        state = load_state_dict(str(path))
    except Exception as err:  # unreadable, not a state dict, pickled code...
        raise CheckpointError(f"{path}: cannot read a state dict ({err})") from err
    cfg = get_pretrained_cfg(name)
    classifier = cfg.classifier if cfg is not None and cfg.classifier else ()
    prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    expected = body.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and not k.startswith(prefixes))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: not a state dict of timm model {name!r}: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), wrong shape {wrong[:5]} ({len(wrong)})"
        )
    body.load_state_dict({k: state[k] for k in expected}, strict=True)


class TimmBackbone(nn.Module):
    """A timm feature extractor with the encoder interface of ECANet and an attention probe on stage 4.

    Args:
        name: timm model name (``"resnet50"``, ``"test_resnet"``...), without the ``timm:`` prefix. The model
            must support ``features_only`` with at least four feature levels.
        weights: Local state-dict file of the timm classification model, or ``None`` for random weights.
        output_stride: Output stride of the last feature map (16 for WSSS: 8, 16 or 32).
        attn_heads: Heads of the attention probe (``num_heads[3]``).
        attn_dim: Query/key width of the probe (default: the stage-4 channels rounded down to a multiple of
            ``attn_heads``).

    Attributes:
        embed_dims: Channels of the four returned maps. num_heads, depths: per stage, as in the MiT (only
        stage 4 matters: ``attn_heads`` heads, one "block"). stride: output stride of the last map.

    Example:
        >>> net = TimmBackbone("test_resnet").eval()
        >>> [tuple(f.shape) for f in net(torch.zeros(1, 3, 64, 64))]
        [(1, 32, 16, 16), (1, 48, 8, 8), (1, 192, 4, 4), (1, 96, 4, 4)]
        >>> feats, attns = net.forward_with_attn(torch.zeros(1, 3, 64, 64))
        >>> tuple(attns[0].shape)
        (1, 4, 16, 16)
    """

    def __init__(
        self,
        name: str,
        weights: str | PathLike[str] | None = None,
        output_stride: int = 16,
        attn_heads: int = 4,
        attn_dim: int | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ConfigError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if attn_heads < 1:
            raise ConfigError(f"attn_heads must be >= 1, got {attn_heads}")
        if not timm.is_model(name):  # architecture name, optionally with a pretrained tag (".a1_in1k")
            raise ConfigError(f"unknown timm model {name!r} (backbone 'timm:{name}'); see timm.list_models()")
        body = timm.create_model(name, features_only=True, output_stride=output_stride)
        if weights is not None:
            _load_strict(body, name, Path(weights))
        info: Any = body.feature_info  # timm's FeatureInfo (typed loosely as a module attribute)
        channels = [int(c) for c in info.channels()]
        reductions = [int(r) for r in info.reduction()]
        if len(channels) < 4:
            raise ConfigError(f"timm model {name!r} has {len(channels)} feature levels; ECANet needs 4")
        self.body = body
        self.name = name
        self.embed_dims = channels[-4:]
        self.stride = int(reductions[-1])
        self.num_heads = [1, 1, 1, attn_heads]
        self.depths = [1, 1, 1, 1]
        dim = self.embed_dims[-1]
        width = attn_dim if attn_dim is not None else max(attn_heads, dim - dim % attn_heads)
        if width % attn_heads != 0:
            raise ConfigError(f"attn_dim {width} is not divisible by attn_heads {attn_heads}")
        self.attn_heads = attn_heads
        self.attn_norm = nn.LayerNorm(dim)
        self.attn_qk = nn.Linear(dim, 2 * width)
        nn.init.trunc_normal_(self.attn_qk.weight, std=0.02)
        nn.init.zeros_(self.attn_qk.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Encode images ``[B, 3, H, W]`` into the last four feature maps of the network."""
        if x.ndim != 4:
            raise ValueError(f"TimmBackbone expects images [B, C, H, W], got shape {tuple(x.shape)}")
        feats: list[Tensor] = self.body(x)
        return feats[-4:]

    def attention(self, f4: Tensor) -> Tensor:
        """Raw probe scores ``q k^T`` ``[B, heads, N4, N4]`` (float32) of a stage-4 map ``[B, D, h, w]``."""
        b = f4.shape[0]
        tokens = self.attn_norm(f4.flatten(2).transpose(1, 2))
        q, k = self.attn_qk(tokens).reshape(b, tokens.shape[1], 2, self.attn_heads, -1).permute(2, 0, 3, 1, 4)
        return attention_scores(q, k)

    def forward_with_attn(
        self, x: Tensor, last_n: int = 1, softmax: bool = False
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Encode images and return the probe's attention scores (``last_n`` is 0 or 1).

        Args:
            x: Images ``[B, 3, H, W]``.
            last_n: 1 for the probe's scores, 0 for none.
            softmax: Return probabilities (softmax of the scaled scores) instead of raw scores.

        Returns:
            ``(features, attns)`` with ``attns`` a list of ``last_n`` tensors ``[B, attn_heads, N4, N4]``.
        """
        if last_n not in (0, 1):
            raise ValueError(f"last_n must be 0 or 1 for a timm backbone (one attention probe), got {last_n}")
        feats = self.forward(x)
        if last_n == 0:
            return feats, []
        scores = self.attention(feats[-1])
        if softmax:
            width = self.attn_qk.out_features // (2 * self.attn_heads)
            scores = torch.softmax(scores * width**-0.5, dim=-1)
        return feats, [scores]
