"""Mix Transformer (MiT), the hierarchical encoder of SegFormer, configured for WSSS.

The encoder has four stages. Each stage starts with an *overlapping* patch embedding (a strided convolution
whose kernel is larger than its stride, followed by LayerNorm) and stacks Transformer blocks made of

* efficient self-attention: keys and values come from a copy of the tokens downsampled by a strided
  ``sr_ratio x sr_ratio`` convolution (plus LayerNorm) when ``sr_ratio > 1``;
* Mix-FFN: ``fc1 -> depthwise 3x3 conv -> GELU -> fc2``; the depthwise convolution supplies the positional
  information, so the encoder has no positional embeddings and accepts any input size.

Parameter names follow the NVlabs release (``patch_embed1.proj.weight``, ``block4.1.attn.kv.bias``,
``norm4.weight``...) so that the official ``mit_b*.pth`` state dicts load without renaming
(see :func:`ecaseg.models.checkpoints.load_mit_weights`).

For WSSS the stage strides are ``(4, 2, 2, 1)``: the last stage keeps the 1/16 resolution of stage 3,
which gives larger CAMs and attention maps (AFA's setting).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from ecaseg.errors import ConfigError
from ecaseg.models.checkpoints import load_mit_weights

__all__ = [
    "MIT_CONFIGS",
    "EfficientSelfAttention",
    "MiTBlock",
    "MixFFN",
    "MixVisionTransformer",
    "OverlapPatchEmbed",
    "attention_scores",
    "available_backbones",
    "create_backbone",
    "load_mit_weights",
    "mit_b0",
    "mit_b1",
    "mit_b2",
    "mit_b3",
    "mit_b4",
    "mit_b5",
    "mit_nano",
]

#: Architecture of each named variant (SegFormer paper, Table 6; the NVlabs release).
MIT_CONFIGS: dict[str, dict[str, tuple[int, ...]]] = {
    "mit_nano": {"embed_dims": (16, 32, 64, 128), "num_heads": (1, 1, 2, 4), "depths": (1, 1, 1, 2)},
    "mit_b0": {"embed_dims": (32, 64, 160, 256), "num_heads": (1, 2, 5, 8), "depths": (2, 2, 2, 2)},
    "mit_b1": {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "depths": (2, 2, 2, 2)},
    "mit_b2": {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "depths": (3, 4, 6, 3)},
    "mit_b3": {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "depths": (3, 4, 18, 3)},
    "mit_b4": {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "depths": (3, 8, 27, 3)},
    "mit_b5": {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "depths": (3, 6, 40, 3)},
}

WSSS_STRIDES: tuple[int, int, int, int] = (4, 2, 2, 1)


def attention_scores(q: Tensor, k: Tensor) -> Tensor:
    """Raw multi-head attention scores ``q k^T`` (no ``1/sqrt(d)`` scaling, no softmax).

    These are the "attention maps" that AFA turns into affinity: they are computed in float32 so that
    bf16 autocast does not round the large logits.

    Args:
        q: Queries ``[B, heads, N, d]``.
        k: Keys ``[B, heads, M, d]``.

    Returns:
        Scores ``[B, heads, N, M]`` in float32.

    Example:
        >>> q = torch.ones(1, 2, 3, 4)
        >>> attention_scores(q, torch.ones(1, 2, 5, 4)).shape
        torch.Size([1, 2, 3, 5])
    """
    return torch.matmul(q.float(), k.float().transpose(-2, -1))


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: ``Conv2d(k, stride s, padding k // 2)`` then LayerNorm on the tokens.

    Args:
        in_chans: Input channels.
        embed_dim: Output channels.
        patch_size: Convolution kernel size (7 for stage 1, 3 for the others).
        stride: Convolution stride (the stage's downsampling factor).
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        # NVlabs uses the default LayerNorm eps (1e-5) here and inside the attention.
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        """Embed ``x [B, C, H, W]`` into tokens ``[B, h*w, D]`` (row-major) and return ``(tokens, h, w)``."""
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from tokens spatially reduced by ``sr_ratio``.

    Args:
        dim: Token dimension.
        num_heads: Number of heads (``dim`` must be divisible by it).
        sr_ratio: Spatial reduction of keys/values (1: full attention).
        qkv_bias: Bias in the ``q`` and ``kv`` projections.
        attn_drop: Dropout on the attention probabilities.
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: Tensor, h: int, w: int, return_attn: bool = False, softmax_attn: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Attend over ``x [B, N, D]`` laid out on an ``h x w`` grid.

        Args:
            x: Tokens ``[B, h*w, D]``.
            h: Grid height.
            w: Grid width.
            return_attn: Compute attention explicitly and return its maps; otherwise use
                ``F.scaled_dot_product_attention`` and return ``None``.
            softmax_attn: Return the softmax probabilities instead of the raw scores ``q k^T``.

        Returns:
            ``(out [B, N, D], attn [B, heads, N, M] | None)`` with ``M = N / sr_ratio^2``.
        """
        b, n, d = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv_in = x
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(b, d, h, w)
            kv_in = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        kv = self.kv(kv_in).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        drop = self.attn_drop if self.training else 0.0
        attn: Tensor | None = None
        if return_attn:
            scores = attention_scores(q, k)
            probs = torch.softmax(scores * self.scale, dim=-1)
            out = torch.matmul(F.dropout(probs, drop, self.training).to(v.dtype), v)
            attn = probs if softmax_attn else scores
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out)), attn


class _DWConv(nn.Module):
    """Depthwise 3x3 convolution applied to tokens on an ``h x w`` grid (holds ``dwconv``, NVlabs naming)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, _, c = x.shape
        y = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w))
        return y.flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Mix-FFN: ``fc2(drop(GELU(dwconv3x3(fc1(x)))))``.

    Args:
        dim: Token dimension.
        hidden_dim: Hidden dimension (``mlp_ratio * dim``).
        drop: Dropout after the activation and after ``fc2``.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = _DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        """Apply the block to tokens ``[B, h*w, D]``."""
        x = self.drop(self.act(self.dwconv(self.fc1(x), h, w)))
        return self.drop(self.fc2(x))


class MiTBlock(nn.Module):
    """Pre-norm Transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` with stochastic depth.

    Args:
        dim: Token dimension.
        num_heads: Attention heads.
        sr_ratio: Spatial reduction of the attention's keys/values.
        mlp_ratio: Hidden expansion of the Mix-FFN.
        qkv_bias: Bias in the query/key/value projections.
        drop: Dropout in the FFN and after the attention projection.
        attn_drop: Dropout on attention probabilities.
        drop_path: Stochastic-depth probability (timm ``DropPath``).
        norm_eps: LayerNorm eps of ``norm1``/``norm2`` (1e-6 in the NVlabs release).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop)
        self.drop_path: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop)

    def forward(
        self, x: Tensor, h: int, w: int, return_attn: bool = False, softmax_attn: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Return the updated tokens and, when ``return_attn``, the block's attention maps."""
        y, attn = self.attn(self.norm1(x), h, w, return_attn, softmax_attn)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x), h, w))
        return x, attn


def _init_weights(m: nn.Module) -> None:
    """SegFormer's initialisation: truncated normal (std 0.02) linears, He-normal (fan-out) convolutions."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MixVisionTransformer(nn.Module):
    """The MiT encoder, returning the feature maps of its four stages (and attention maps on request).

    Args:
        embed_dims: Channels of the four stages.
        num_heads: Attention heads of the four stages.
        depths: Number of blocks of the four stages.
        sr_ratios: Spatial reduction ratios of the attention in the four stages.
        strides: Downsampling factor of each stage's patch embedding; ``(4, 2, 2, 1)`` (WSSS, last stage at
            1/16) or ``(4, 2, 2, 2)`` (SegFormer, last stage at 1/32).
        patch_sizes: Kernel sizes of the patch embeddings.
        mlp_ratio: Mix-FFN expansion.
        in_chans: Image channels.
        qkv_bias: Bias in the query/key/value projections.
        drop_rate: Dropout in the FFNs and after the attention projections.
        attn_drop_rate: Dropout on attention probabilities.
        drop_path_rate: Largest stochastic-depth probability (linearly increasing over all blocks; 0.1 as in
            the NVlabs/AFA configurations).
        norm_eps: eps of the block and stage LayerNorms.

    Attributes:
        embed_dims: list of 4 ints. num_heads: list of 4 ints. depths: list of 4 ints.
        strides: list of 4 per-stage strides. stride: the total stride of the last stage (16 with the WSSS
        strides).

    Example:
        >>> net = mit_nano().eval()
        >>> [tuple(f.shape) for f in net(torch.zeros(1, 3, 64, 64))]
        [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 4, 4)]
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        depths: Sequence[int] = (2, 2, 2, 2),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        strides: Sequence[int] = WSSS_STRIDES,
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        for name, seq in {
            "embed_dims": embed_dims,
            "num_heads": num_heads,
            "depths": depths,
            "sr_ratios": sr_ratios,
            "strides": strides,
            "patch_sizes": patch_sizes,
        }.items():
            if len(seq) != 4:
                raise ConfigError(f"MixVisionTransformer: {name} must have 4 entries, got {list(seq)}")
        self.embed_dims = [int(v) for v in embed_dims]
        self.num_heads = [int(v) for v in num_heads]
        self.depths = [int(v) for v in depths]
        self.sr_ratios = [int(v) for v in sr_ratios]
        self.strides = [int(v) for v in strides]
        self.patch_sizes = [int(v) for v in patch_sizes]
        self.mlp_ratios = [float(mlp_ratio)] * 4
        self.stride = math.prod(self.strides)
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        cur = 0
        chans = in_chans
        for i in range(4):
            dim = self.embed_dims[i]
            self.add_module(
                f"patch_embed{i + 1}", OverlapPatchEmbed(chans, dim, self.patch_sizes[i], self.strides[i])
            )
            blocks = [
                MiTBlock(
                    dim,
                    self.num_heads[i],
                    self.sr_ratios[i],
                    mlp_ratio,
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    dpr[cur + j],
                    norm_eps,
                )
                for j in range(self.depths[i])
            ]
            self.add_module(f"block{i + 1}", nn.ModuleList(blocks))
            self.add_module(f"norm{i + 1}", nn.LayerNorm(dim, eps=norm_eps))
            cur += self.depths[i]
            chans = dim
        self.apply(_init_weights)

    def _stage(self, i: int) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
        return (
            getattr(self, f"patch_embed{i + 1}"),
            getattr(self, f"block{i + 1}"),
            getattr(self, f"norm{i + 1}"),
        )

    def _forward(self, x: Tensor, last_n: int, softmax_attn: bool) -> tuple[list[Tensor], list[Tensor]]:
        if x.ndim != 4:
            raise ValueError(f"MixVisionTransformer expects images [B, C, H, W], got shape {tuple(x.shape)}")
        feats: list[Tensor] = []
        attns: list[Tensor] = []
        b = x.shape[0]
        for i in range(4):
            embed, blocks, norm = self._stage(i)
            tokens, h, w = embed(x)
            first_with_attn = len(blocks) - last_n if i == 3 else len(blocks)
            for j, blk in enumerate(blocks):
                tokens, attn = blk(tokens, h, w, j >= first_with_attn, softmax_attn)
                if attn is not None:
                    attns.append(attn)
            x = norm(tokens).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
            feats.append(x)
        return feats, attns

    def forward(self, x: Tensor) -> list[Tensor]:
        """Encode images ``[B, 3, H, W]`` into 4 maps ``[B, embed_dims[i], H_i, W_i]`` (SDPA attention)."""
        return self._forward(x, 0, False)[0]

    def forward_with_attn(
        self, x: Tensor, last_n: int = 2, softmax: bool = False
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Encode images and also return the attention maps of the last ``last_n`` blocks of stage 4.

        Those blocks compute attention explicitly (the other blocks still use SDPA). By default the maps
        are the raw scores ``q k^T`` before scaling and softmax, which is what AFA's attention-to-affinity
        branch consumes; ``softmax=True`` returns the attention probabilities instead.

        Args:
            x: Images ``[B, 3, H, W]``.
            last_n: How many of the last stage-4 blocks to return maps for (``0 <= last_n <= depths[3]``).
            softmax: Return probabilities instead of raw scores.

        Returns:
            ``(features, attns)``: the 4 feature maps and ``last_n`` float32 tensors ``[B, num_heads[3],
            N4, N4]`` (``N4 = h4 * w4``, stage 4 has ``sr_ratio`` 1 in every variant), earliest block first.
        """
        if not 0 <= last_n <= self.depths[3]:
            raise ValueError(f"last_n must be in [0, {self.depths[3]}] (stage-4 depth), got {last_n}")
        if self.sr_ratios[3] != 1:
            raise ValueError("forward_with_attn needs sr_ratio 1 in stage 4 to return N4 x N4 maps")
        return self._forward(x, last_n, softmax)


def _build(
    name: str, weights: str | PathLike[str] | None, strides: Sequence[int], **kw: Any
) -> MixVisionTransformer:
    cfg: dict[str, Any] = dict(MIT_CONFIGS[name])
    cfg.update(kw)
    model = MixVisionTransformer(strides=strides, **cfg)
    if weights is not None:
        load_mit_weights(model, weights)
    return model


def mit_nano(
    weights: str | PathLike[str] | None = None, strides: Sequence[int] = WSSS_STRIDES, **kw: Any
) -> MixVisionTransformer:
    """A tiny MiT (dims 16/32/64/128, depths 1/1/1/2, heads 1/1/2/4) for tests and synthetic runs.

    Stage 4 has two blocks so that the default two-block affinity head of
    :class:`~ecaseg.models.ECANet` works.

    Args:
        weights: Optional checkpoint (see :func:`load_mit_weights`).
        strides: Stage strides.
        **kw: Overrides of :class:`MixVisionTransformer` arguments.

    Returns:
        The encoder.
    """
    return _build("mit_nano", weights, strides, **kw)


def mit_b0(
    weights: str | PathLike[str] | None = None, strides: Sequence[int] = WSSS_STRIDES, **kw: Any
) -> MixVisionTransformer:
    """MiT-B0 (dims 32/64/160/256, depths 2/2/2/2); ``weights`` loads ``mit_b0.pth`` or ``nvidia/mit-b0``."""
    return _build("mit_b0", weights, strides, **kw)


def mit_b1(
    weights: str | PathLike[str] | None = None, strides: Sequence[int] = WSSS_STRIDES, **kw: Any
) -> MixVisionTransformer:
    """MiT-B1 (dims 64/128/320/512, depths 2/2/2/2), the paper's backbone; ``weights``: ``mit_b1.pth``.

    Example:
        >>> sum(p.numel() for p in mit_b1().parameters())
        13151424
    """
    return _build("mit_b1", weights, strides, **kw)


def mit_b2(
    weights: str | PathLike[str] | None = None, strides: Sequence[int] = WSSS_STRIDES, **kw: Any
) -> MixVisionTransformer:
    """MiT-B2 (dims 64/128/320/512, depths 3/4/6/3)."""
    return _build("mit_b2", weights, strides, **kw)


def mit_b3(
    weights: str | PathLike[str] | None = None, strides: Sequence[int] = WSSS_STRIDES, **kw: Any
) -> MixVisionTransformer:
    """MiT-B3 (dims 64/128/320/512, depths 3/4/18/3)."""
    return _build("mit_b3", weights, strides, **kw)


def mit_b4(
    weights: str | PathLike[str] | None = None, strides: Sequence[int] = WSSS_STRIDES, **kw: Any
) -> MixVisionTransformer:
    """MiT-B4 (dims 64/128/320/512, depths 3/8/27/3)."""
    return _build("mit_b4", weights, strides, **kw)


def mit_b5(
    weights: str | PathLike[str] | None = None, strides: Sequence[int] = WSSS_STRIDES, **kw: Any
) -> MixVisionTransformer:
    """MiT-B5 (dims 64/128/320/512, depths 3/6/40/3)."""
    return _build("mit_b5", weights, strides, **kw)


_BACKBONES: dict[str, Callable[..., MixVisionTransformer]] = {
    "mit_nano": mit_nano,
    "mit_b0": mit_b0,
    "mit_b1": mit_b1,
    "mit_b2": mit_b2,
    "mit_b3": mit_b3,
    "mit_b4": mit_b4,
    "mit_b5": mit_b5,
}


def available_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`."""
    return list(_BACKBONES)


def create_backbone(name: str, **kw: Any) -> MixVisionTransformer:
    """Build a backbone by name (``"mit_nano"``, ``"mit_b0"`` .. ``"mit_b5"``).

    Args:
        name: Variant name.
        **kw: Passed to the constructor (``weights``, ``strides``, ``drop_path_rate``...).

    Returns:
        The encoder.

    Raises:
        ConfigError: Unknown name (the message lists the valid ones).

    Example:
        >>> create_backbone("mit_nano").embed_dims
        [16, 32, 64, 128]
    """
    if name not in _BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(_BACKBONES)}")
    return _BACKBONES[name](**kw)
