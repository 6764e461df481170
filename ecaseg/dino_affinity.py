"""Frozen self-supervised ViT that supplies the keys and class query of Eq. (4) and Eq. (5).

Semantic Affinity Exploitation (Section 3.2 of the paper) needs, for every image, the *keys* of all patches
and the *query* of the class token in the last self-attention block of a frozen DINO ViT, with all heads
concatenated. This module builds such a ViT with timm, loads the official weights of each family of the
paper's Table 5 strictly, and returns those tensors together with the final normalised patch tokens.

Layout: ``ecaseg.dino_affinity`` sits at the model layer; it imports only ``ecaseg.errors``,
``ecaseg.dino_features``, torch and timm.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ecaseg._checks import check_float_dtype
from ecaseg.dino_features import PAPER_CARM_SETTINGS, CARMSettings, DINOFeatures
from ecaseg.errors import CheckpointError, ConfigError
from ecaseg.utils.io import weights_file_problem

__all__ = [
    "DINO_VARIANTS",
    "CARMSettings",
    "DINOAffinity",
    "DINOFeatures",
    "DINOVariant",
    "WeightsLike",
    "build_vit",
    "convert_state_dict",
    "extract_features",
    "fit_to_patch",
    "list_variants",
    "load_vit_weights",
    "packaged_weights",
    "read_checkpoint",
    "register_variant",
]

Family = Literal["dino", "dinov2", "mocov3", "supervised", "custom"]
#: What ``weights=`` takes: a checkpoint path (``str`` or path-like) or a state dict.
WeightsLike = str | os.PathLike | Mapping[str, Any]

#: Keys of classification heads, projectors or training-only tokens that a backbone does not use; they are
#: dropped from a checkpoint when the model has no parameter of that name.
_DROPPABLE_PREFIXES = ("head.", "head_dist.", "pre_logits.", "mask_token")


@dataclass(frozen=True)
class DINOVariant:
    """Description of one frozen ViT (a row of Table 5 or a user model).

    Args:
        family: Pre-training family: ``"dino"``, ``"dinov2"``, ``"mocov3"``, ``"supervised"`` or ``"custom"``.
        patch_size: Patch size in pixels.
        embed_dim: Token dimension ``D`` (all heads concatenated).
        num_heads: Number of attention heads.
        depth: Number of transformer blocks.
        arch: timm architecture name passed to ``timm.create_model``; ``None`` constructs
            ``timm.models.vision_transformer.VisionTransformer(**model_kwargs)`` directly.
        model_kwargs: Extra constructor arguments (override the architecture's defaults).
        file_names: File name(s) of the official release of the weights.
        url: Where the official file can be downloaded (shown in error messages).
        hub_tag: timm ``"<arch>.<tag>"`` name whose ``pretrained=True`` weights equal the official ones, or
            ``None`` when timm has no such weights.
        num_reg_tokens: Register tokens (DINOv2 "reg" models); they are dropped from the patch set.
        default_weights: File name, in the package's ``ecaseg/assets`` folder, of weights shipped with
            ecaseg; ``DINOAffinity(name)`` loads them when no ``weights`` are given.
        carm: The CARM settings that suit this ViT (graph threshold, foreground cue, calibration), used by
            :meth:`ecaseg.carm.CARMGenerator.for_affinity`: the paper's for DINO and the Table 5 rows,
            measured ones for the packaged synthetic ViT.
    """

    family: Family
    patch_size: int
    embed_dim: int
    num_heads: int
    depth: int
    arch: str | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    file_names: tuple[str, ...] = ()
    url: str | None = None
    hub_tag: str | None = None
    num_reg_tokens: int = 0
    default_weights: str | None = None
    carm: CARMSettings = PAPER_CARM_SETTINGS


#: CARM settings of the packaged synthetic ViT. Its class token does not find the objects (AUC 0.47) while
#: the key contrast does (0.89), and its key cosines are high everywhere, so the graph needs gamma 0.9;
#: calibration shrank the CARM to the seeds' parts (docs: CARM, The demo, Bring your own CAMs).
SYNTHETIC_VIT_CARM_SETTINGS = CARMSettings(
    gamma=0.9,
    fg_cue="contrast",
    calibrate=False,
    source="measured on the synthetic benchmark (benchmarks/carm_oracle.py, benchmarks/refine.py)",
)

_DINO_URL = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/{0}.pth"

#: Registry of the known frozen ViTs, by name (Table 5 plus a tiny test model). Extend with
#: :func:`register_variant`.
DINO_VARIANTS: dict[str, DINOVariant] = {
    "dino_vits8": DINOVariant(
        family="dino",
        patch_size=8,
        embed_dim=384,
        num_heads=6,
        depth=12,
        arch="vit_small_patch8_224",
        file_names=("dino_deitsmall8_pretrain.pth",),
        url=_DINO_URL.format("dino_deitsmall8_pretrain"),
        hub_tag="vit_small_patch8_224.dino",
    ),
    "dino_vits16": DINOVariant(
        family="dino",
        patch_size=16,
        embed_dim=384,
        num_heads=6,
        depth=12,
        arch="vit_small_patch16_224",
        file_names=("dino_deitsmall16_pretrain.pth",),
        url=_DINO_URL.format("dino_deitsmall16_pretrain"),
        hub_tag="vit_small_patch16_224.dino",
    ),
    "dino_vitb8": DINOVariant(
        family="dino",
        patch_size=8,
        embed_dim=768,
        num_heads=12,
        depth=12,
        arch="vit_base_patch8_224",
        file_names=("dino_vitbase8_pretrain.pth",),
        url=_DINO_URL.format("dino_vitbase8_pretrain"),
        hub_tag="vit_base_patch8_224.dino",
    ),
    "dino_vitb16": DINOVariant(
        family="dino",
        patch_size=16,
        embed_dim=768,
        num_heads=12,
        depth=12,
        arch="vit_base_patch16_224",
        file_names=("dino_vitbase16_pretrain.pth",),
        url=_DINO_URL.format("dino_vitbase16_pretrain"),
        hub_tag="vit_base_patch16_224.dino",
    ),
    "dinov2_vits14": DINOVariant(
        family="dinov2",
        patch_size=14,
        embed_dim=384,
        num_heads=6,
        depth=12,
        arch="vit_small_patch14_dinov2",
        model_kwargs={"img_size": 518},
        file_names=("dinov2_vits14_pretrain.pth",),
        url=_DINOV2_URL.format("dinov2_vits14_pretrain"),
        hub_tag="vit_small_patch14_dinov2.lvd142m",
    ),
    "dinov2_vits14_reg": DINOVariant(
        family="dinov2",
        patch_size=14,
        embed_dim=384,
        num_heads=6,
        depth=12,
        arch="vit_small_patch14_reg4_dinov2",
        model_kwargs={"img_size": 518},
        file_names=("dinov2_vits14_reg4_pretrain.pth",),
        url=_DINOV2_URL.format("dinov2_vits14_reg4_pretrain"),
        hub_tag="vit_small_patch14_reg4_dinov2.lvd142m",
        num_reg_tokens=4,
    ),
    # MoCo v3's ViT-S uses 12 heads (not 6) and a fixed 2-D sin-cos position embedding stored in the file.
    "mocov3_vits16": DINOVariant(
        family="mocov3",
        patch_size=16,
        embed_dim=384,
        num_heads=12,
        depth=12,
        arch="vit_small_patch16_224",
        model_kwargs={"num_heads": 12},
        file_names=("vit-s-300ep.pth.tar",),
        url="https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
    ),
    # "ViT fully supervised on ImageNet-1k" (Table 5): DeiT-S/16, trained on ImageNet-1k only.
    "sup_vits16": DINOVariant(
        family="supervised",
        patch_size=16,
        embed_dim=384,
        num_heads=6,
        depth=12,
        arch="deit_small_patch16_224",
        file_names=("deit_small_patch16_224-cd65a155.pth", "model.safetensors"),
        url="https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
        hub_tag="deit_small_patch16_224.fb_in1k",
    ),
    # Supervised ViT-S/16 of the AugReg study (ImageNet-21k pre-training, ImageNet-1k fine-tuning).
    "sup_vits16_augreg": DINOVariant(
        family="supervised",
        patch_size=16,
        embed_dim=384,
        num_heads=6,
        depth=12,
        arch="vit_small_patch16_224",
        file_names=("model.safetensors",),
        url="https://huggingface.co/timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
        hub_tag="vit_small_patch16_224.augreg_in21k_ft_in1k",
    ),
    # Tiny random-weight ViT for tests and the synthetic benchmark (never pretrained).
    "vit_nano_p8": DINOVariant(
        family="custom",
        patch_size=8,
        embed_dim=96,
        num_heads=3,
        depth=4,
        model_kwargs={"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3},
    ),
    # The same tiny ViT, DINO-pretrained on the synthetic benchmark's train split by
    # ecaseg.engine.dino_pretrain; the weights ship with the package (docs: dino_pretrain page).
    "vit_nano_p8_synthetic": DINOVariant(
        family="dino",
        patch_size=8,
        embed_dim=96,
        num_heads=3,
        depth=4,
        model_kwargs={"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3},
        file_names=("dino_vit_nano_p8_synthetic.pth",),
        default_weights="dino_vit_nano_p8_synthetic.pth",
        carm=SYNTHETIC_VIT_CARM_SETTINGS,
    ),
}

#: Folder of the weights shipped inside the package (see :attr:`DINOVariant.default_weights`).
ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def packaged_weights(name: str) -> Path:
    """Path of the weights shipped with ecaseg for DINO variant ``name``.

    Args:
        name: Key of :data:`DINO_VARIANTS` with ``default_weights``.

    Returns:
        The file in ``ecaseg/assets``.

    Raises:
        ConfigError: If the variant is unknown or ships no weights.
        CheckpointError: If the file is missing from the installation.

    Example:
        >>> packaged_weights("vit_nano_p8_synthetic").name
        'dino_vit_nano_p8_synthetic.pth'
    """
    variant = _get_variant(name)
    if variant.default_weights is None:
        raise ConfigError(f"DINO variant {name!r} ships no weights with ecaseg")
    path = ASSETS_DIR / variant.default_weights
    if not path.is_file():
        raise CheckpointError(f"the packaged weights of {name!r} are missing from the installation: {path}")
    return path


def register_variant(name: str, variant: DINOVariant, *, overwrite: bool = False) -> None:
    """Add a user model to :data:`DINO_VARIANTS` so that ``DINOAffinity(name)`` can build it.

    The variant is built first (on the ``meta`` device: no memory, no weights) and checked against what it
    declares; a variant that cannot be built raises and leaves the registry as it was.

    Args:
        name: Registry name.
        variant: Its description.
        overwrite: Replace an existing entry of the same name instead of raising.

    Raises:
        ConfigError: If ``name`` is taken and ``overwrite`` is False, or the variant cannot be built.

    Example:
        >>> register_variant("my_nano", DINOVariant(family="custom", patch_size=8, embed_dim=96,
        ...     num_heads=3, depth=2, model_kwargs={"patch_size": 8, "embed_dim": 96, "depth": 2,
        ...     "num_heads": 3}))
        >>> "my_nano" in list_variants()
        True
        >>> _ = DINO_VARIANTS.pop("my_nano")
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a DINO variant name must be a non-empty string, got {name!r}")
    if not isinstance(variant, DINOVariant):
        raise ConfigError(f"variant must be a DINOVariant, got {type(variant).__name__}")
    if name in DINO_VARIANTS and not overwrite:
        raise ConfigError(f"DINO variant {name!r} is already registered (pass overwrite=True to replace it)")
    try:
        with torch.device("meta"):
            build_vit(variant)
    except ConfigError as err:
        raise ConfigError(f"cannot register DINO variant {name!r}: {err}") from None
    except Exception as err:
        raise ConfigError(
            f"cannot register DINO variant {name!r}: building it failed ({type(err).__name__}: {err})"
        ) from None
    DINO_VARIANTS[name] = variant


def list_variants() -> list[str]:
    """Names accepted by ``DINOAffinity(name)`` from the registry, sorted.

    timm names are accepted too: ``"vit_small_patch8_224.dino"`` (a registered variant's timm tag) or any
    timm ViT name with a class token (``"vit_small_patch14_reg4_dinov2.lvd142m"``).

    Example:
        >>> "dino_vits8" in list_variants()
        True
    """
    return sorted(DINO_VARIANTS)


def _variant_from_vit(vit: nn.Module, what: str, **fields: Any) -> DINOVariant:
    """Describe a built timm ViT (patch, width, heads, depth, registers) as a variant."""
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"{what} is a {type(vit).__name__}, expected a timm VisionTransformer")
    patch = vit.patch_embed.patch_size
    patch_hw = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    if patch_hw[0] != patch_hw[1]:
        raise ConfigError(f"{what} has non-square patches {patch_hw}; square patches are supported")
    heads = getattr(getattr(vit.blocks[-1], "attn", None), "num_heads", None)
    if not isinstance(heads, int):
        raise ConfigError(f"{what}: the last block has no attention with num_heads")
    fields.setdefault("family", "custom")
    return DINOVariant(
        patch_size=int(patch_hw[0]),
        embed_dim=int(vit.embed_dim),
        num_heads=heads,
        depth=len(vit.blocks),
        num_reg_tokens=int(vit.num_reg_tokens),
        **fields,
    )


def _split_tag(name: str) -> tuple[str, str | None]:
    base, _, tag = name.partition(".")
    return base, (tag or None)


def _get_variant(name: str) -> DINOVariant:
    """The variant of a registry name, of a registered variant's timm tag, or of any timm ViT name."""
    if not isinstance(name, str):
        raise TypeError(
            f"name must be a DINO variant name (see ecaseg.dino_affinity.list_variants()), got a "
            f"{type(name).__name__}; wrap your own ViT instance with DINOAffinity.from_model(vit)"
        )
    if name in DINO_VARIANTS:
        return DINO_VARIANTS[name]
    for variant in DINO_VARIANTS.values():
        if variant.hub_tag is not None and variant.hub_tag == name:
            return variant
    base, tag = _split_tag(name)
    if timm.is_model(base):
        try:
            with torch.device("meta"):
                vit = timm.create_model(base, pretrained=False, num_classes=0, dynamic_img_size=True)
        except Exception as err:
            raise ConfigError(f"timm model {base!r} cannot serve as the affinity ViT: {err}") from None
        variant = _variant_from_vit(vit, f"timm model {base!r}", arch=base, hub_tag=name if tag else None)
        _check_built(vit, variant, f"timm model {base!r}")
        return variant
    raise ConfigError(
        f"unknown DINO variant {name!r}; registered names: {', '.join(list_variants())}; "
        "timm ViT names (with or without a pretrained tag, e.g. 'vit_small_patch8_224.dino') work too"
    )


def _check_built(model: nn.Module, variant: DINOVariant, what: str) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"{what} is a {type(model).__name__}, expected a timm VisionTransformer")
    patch = model.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, tuple) else patch
    last = model.blocks[-1]
    heads = getattr(getattr(last, "attn", None), "num_heads", None)
    got = (patch, model.embed_dim, heads, len(model.blocks), model.num_reg_tokens)
    want = (variant.patch_size, variant.embed_dim, variant.num_heads, variant.depth, variant.num_reg_tokens)
    if got != want:
        raise ConfigError(
            f"{what}: built (patch, dim, heads, depth, registers) = {got}, but the variant declares {want}"
        )
    if not model.has_class_token:
        raise ConfigError(f"{what} has no class token; Eq. (5) needs the class token's query")
    if not hasattr(last.attn, "qkv") or not isinstance(last.attn.qkv, nn.Linear):
        raise ConfigError(f"{what}: the last block's attention has no fused 'qkv' projection")
    return model


def build_vit(variant: DINOVariant) -> VisionTransformer:
    """Construct the (randomly initialised) timm ViT of ``variant``, classifier removed, any input size.

    Args:
        variant: The model description.

    Returns:
        A ``VisionTransformer`` with ``num_classes=0`` and ``dynamic_img_size=True`` (position embeddings
        are interpolated to the input's patch grid).

    Example:
        >>> vit = build_vit(DINO_VARIANTS["vit_nano_p8"])
        >>> vit.embed_dim, vit.patch_embed.patch_size
        (96, (8, 8))
    """
    kwargs = dict(variant.model_kwargs)
    kwargs.update(num_classes=0, dynamic_img_size=True)
    model: nn.Module
    if variant.arch is None:
        model = VisionTransformer(**kwargs)
    else:
        model = timm.create_model(variant.arch, pretrained=False, **kwargs)
    return _check_built(model, variant, f"architecture {variant.arch or 'VisionTransformer'}")


def _cached_hub_file(hub_tag: str) -> Path | None:
    """The weights of ``hub_tag`` in the local Hugging Face cache, if they were downloaded before."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(hub_tag)
        repo = getattr(cfg, "hf_hub_id", None) or f"timm/{hub_tag}"
        repo = f"{repo}{hub_tag}" if repo.endswith("/") else repo
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    except Exception:  # no huggingface_hub, unknown tag, unreadable cache: behave as not cached
        return None
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check that the Hugging Face hub can be reached, so that offline runs fail at once.

    Without it, an offline download spends about a minute in retries before failing.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; let the download try
    import socket

    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _create_from_hub(variant: DINOVariant) -> VisionTransformer:
    """The ViT with timm's pretrained weights: from the local cache, else downloaded (``pretrained=True``)."""
    assert variant.hub_tag is not None
    cached = _cached_hub_file(variant.hub_tag)
    if cached is not None:
        vit = build_vit(variant)
        load_vit_weights(vit, cached)
        return vit
    if not _hub_reachable():
        raise ConnectionError(
            "the Hugging Face hub is not reachable (offline?) and the weights are not cached"
        )
    kwargs = dict(variant.model_kwargs)
    kwargs.update(num_classes=0, dynamic_img_size=True)
    model = timm.create_model(variant.hub_tag, pretrained=True, **kwargs)
    return _check_built(model, variant, f"timm model {variant.hub_tag}")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` dict (wrappers not yet removed).

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``
    (no arbitrary code runs). Wrapper dicts (``"state_dict"``, ``"model"``, ``"teacher"``) are unwrapped.

    Args:
        path: The file.

    Returns:
        The tensors of the file.

    Raises:
        CheckpointError: If the file is missing, unreadable or holds no tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickled objects, ...
        raise CheckpointError(
            weights_file_problem(
                p, err, "DINO weights are a ViT state dict, e.g. what ecaseg pretrain-dino writes"
            )
        ) from err
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {p} holds a {type(obj).__name__}, expected a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {p} holds no tensors (keys: {sorted(map(str, obj))[:10]})")
    return tensors


def _encoder_prefix(keys: list[str], source: str) -> str:
    """The prefix under which the encoder's keys live (``""``, ``"module.base_encoder."``, ...)."""
    anchor = "patch_embed.proj.weight"
    prefixes = sorted({k[: -len(anchor)] for k in keys if k.endswith(anchor)})
    if len(prefixes) == 1:
        return prefixes[0]
    if not prefixes:
        return ""  # the strict comparison reports patch_embed.proj.weight as missing
    base = [p for p in prefixes if "base_encoder" in p]  # MoCo v3: base and momentum encoders
    if len(base) == 1:
        return base[0]
    raise CheckpointError(f"{source}: several encoders in one checkpoint ({prefixes}); cannot tell which")


def convert_state_dict(
    state: Mapping[str, Tensor], model: VisionTransformer, source: str = "state dict"
) -> dict[str, Tensor]:
    """Turn an official release state dict into the key layout of ``model``.

    Handles: DINO (already timm-like keys), DINOv2 (``mask_token`` dropped; ``register_tokens`` moved to
    ``reg_token`` with the class position embedding folded into ``cls_token`` for the register models),
    MoCo v3 (encoder under ``module.base_encoder.``; momentum encoder, predictor and projector ``head``
    dropped), DeiT / timm / Hugging Face files (classifier ``head`` dropped), and a position embedding of
    another grid size (resampled bicubically to the model's grid).

    Args:
        state: Flat ``{name: tensor}`` dict (see :func:`read_checkpoint`).
        model: The target ViT.
        source: Name of the checkpoint for messages.

    Returns:
        The converted dict; not yet checked against the model (see :func:`load_vit_weights`).
    """
    keys = list(state)
    prefix = _encoder_prefix(keys, source)
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = model.state_dict()
    out = {k: v for k, v in out.items() if k in own or not k.startswith(_DROPPABLE_PREFIXES)}

    if "register_tokens" in out and "reg_token" in own and model.no_embed_class:
        # DINOv2 release: the class token carries pos_embed[:, 0]; patches carry the rest; registers none.
        out["reg_token"] = out.pop("register_tokens")
        if "cls_token" in out and "pos_embed" in out:
            full = out["pos_embed"]
            out["cls_token"] = out["cls_token"] + full[:, :1]
            out["pos_embed"] = full[:, 1:]

    pos = out.get("pos_embed")
    target = own.get("pos_embed")
    if pos is not None and target is not None and pos.ndim == 3 and pos.shape != target.shape:
        n_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        n_old = pos.shape[1] - n_prefix
        side = math.isqrt(max(n_old, 0))
        if side * side == n_old and pos.shape[2] == target.shape[2] and side > 0:
            out["pos_embed"] = resample_abs_pos_embed(
                pos.float(),
                new_size=list(model.patch_embed.grid_size),
                old_size=[side, side],
                num_prefix_tokens=n_prefix,
            ).to(pos.dtype)
    return out


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): {shown}{more}"


def load_vit_weights(model: VisionTransformer, weights: WeightsLike) -> None:
    """Load a checkpoint (file or state dict, any supported release format) into ``model``, strictly.

    Args:
        model: The target ViT (e.g. from :func:`build_vit`).
        weights: Path of a ``.pth`` / ``.pth.tar`` / ``.safetensors`` file, or a state dict.

    Raises:
        CheckpointError: If keys are missing or unexpected (after dropping known heads, predictors and the
            momentum encoder) or shapes differ; the message lists them.

    Example:
        >>> src, dst = build_vit(DINO_VARIANTS["vit_nano_p8"]), build_vit(DINO_VARIANTS["vit_nano_p8"])
        >>> load_vit_weights(dst, src.state_dict())
        >>> bool(torch.equal(dst.cls_token, src.cls_token))
        True
    """
    if isinstance(weights, Mapping):
        source = "state dict"
        state = {str(k): v for k, v in weights.items() if isinstance(v, Tensor)}
    else:
        source = str(weights)
        state = read_checkpoint(weights)
    converted = convert_state_dict(state, model, source)
    own = model.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(converted)
        if converted[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        msg = f"checkpoint {source} does not match the ViT ({type(model).__name__}, dim {model.embed_dim})"
        if missing:
            msg += _listing("missing keys", missing)
        if unexpected:
            msg += _listing("unexpected keys", unexpected)
        if mismatched:
            msg += _listing("shape mismatches", mismatched)
        raise CheckpointError(msg)
    model.load_state_dict(converted, strict=True)


# ----------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------


def fit_to_patch(images: Tensor, patch_size: int, resize: bool = True) -> Tensor:
    """Make the image size a multiple of the patch size.

    Each side becomes the nearest multiple of ``patch_size`` (halves round up, at least one patch); the
    batch is resized with bilinear interpolation (``align_corners=False``). E.g. 512 with patch 14 -> 518.

    Args:
        images: ``[B, 3, H, W]``.
        patch_size: Patch size in pixels.
        resize: If False, raise instead of resizing.

    Returns:
        ``images`` unchanged when already divisible, else the resized batch.

    Raises:
        ValueError: If ``resize`` is False and a side is not divisible.

    Example:
        >>> fit_to_patch(torch.zeros(1, 3, 44, 64), 8).shape
        torch.Size([1, 3, 48, 64])
    """
    h, w = images.shape[-2:]
    if h % patch_size == 0 and w % patch_size == 0:
        return images
    if not resize:
        raise ValueError(f"image size {h}x{w} is not divisible by the ViT patch size {patch_size}")
    new_h = max(1, (2 * h + patch_size) // (2 * patch_size)) * patch_size
    new_w = max(1, (2 * w + patch_size) // (2 * patch_size)) * patch_size
    return F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)


def extract_features(vit: VisionTransformer, images: Tensor, with_tokens: bool = True) -> DINOFeatures:
    """Run ``vit`` and collect the last block's patch keys and class query plus the final patch tokens.

    All blocks but the last run as usual (timm's fused SDPA attention, no attention matrix is built). For the
    last block, its input is normalised with ``norm1`` and projected with ``attn.qkv``; the output splits into
    ``(q, k, v)``, each laid out as ``heads x head_dim`` so that its last axis is the heads' concatenation
    (``q_norm`` / ``k_norm`` applied per head when the model has them). Register tokens are dropped.

    Args:
        vit: A timm ``VisionTransformer`` with a class token and ``dynamic_img_size=True``.
        images: ``[B, 3, H, W]`` with H and W multiples of the patch size.
        with_tokens: Also compute the final patch tokens (the last block's output and norm); ``False``
            stops at the last block's ``qkv`` and leaves ``tokens`` None.

    Returns:
        :class:`DINOFeatures` in the dtype of the computation (call under ``torch.no_grad``).

    Example:
        >>> vit = build_vit(DINO_VARIANTS["vit_nano_p8"]).eval()
        >>> with torch.no_grad():
        ...     out = extract_features(vit, torch.zeros(2, 3, 16, 24))
        >>> out.keys.shape, out.cls_query.shape, out.grid
        (torch.Size([2, 6, 96]), torch.Size([2, 96]), (2, 3))
    """
    x = vit.patch_embed(images)  # [B, h, w, D] with dynamic_img_size, else [B, h * w, D]
    if x.ndim == 4:
        h, w = int(x.shape[1]), int(x.shape[2])
    else:
        h, w = vit.patch_embed.grid_size
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    blocks = list(vit.blocks)
    for blk in blocks[:-1]:
        x = blk(x)
    last: Any = blocks[-1]
    attn: Any = last.attn
    bsz, n_tok, _ = x.shape
    qkv = attn.qkv(last.norm1(x)).reshape(bsz, n_tok, 3, attn.num_heads, -1)
    q = attn.q_norm(qkv[:, :, 0]).flatten(2)  # [B, T, heads * head_dim]
    k = attn.k_norm(qkv[:, :, 1]).flatten(2)
    n_prefix = vit.num_prefix_tokens  # class token first, then registers
    # the last block's attention output, MLP and the final norm only make the tokens
    tokens = vit.norm(last(x))[:, n_prefix:] if with_tokens else None
    return DINOFeatures(keys=k[:, n_prefix:], cls_query=q[:, 0], tokens=tokens, grid=(h, w))


def _enable_dynamic_size(vit: VisionTransformer) -> None:
    """Turn on timm's ``dynamic_img_size`` on a built ViT (what the constructor flag sets up)."""
    if getattr(vit, "dynamic_img_size", False):
        return
    from timm.layers import Format

    pe: Any = vit.patch_embed
    if not hasattr(pe, "output_fmt") or not hasattr(pe, "strict_img_size"):
        raise ConfigError(
            f"the ViT's patch embedding ({type(pe).__name__}) cannot take other image sizes; build the "
            "model with dynamic_img_size=True"
        )
    pe.strict_img_size = False
    pe.flatten = False
    pe.output_fmt = Format.NHWC
    vit.dynamic_img_size = True  # type: ignore[misc]  # Final for TorchScript; set once, as __init__ does


class DINOAffinity(nn.Module):
    """Frozen ViT (DINO by default) returning the keys / class query of Eq. (4) and (5) and patch tokens.

    The module is always in eval mode (``train()`` is a no-op), its parameters have ``requires_grad=False``
    and ``forward`` runs under ``torch.no_grad`` with bf16 autocast on CUDA. Outputs are float32
    :class:`~ecaseg.dino_features.DINOFeatures`, the object :class:`~ecaseg.carm.CARMGenerator` takes.

    Which ViT: a name of :func:`list_variants` (the paper's Table 5 and test models), a timm name (with or
    without a pretrained tag, e.g. ``"vit_small_patch8_224.dino"``), or your own timm ``VisionTransformer``
    instance via :meth:`from_model` (``DINOAffinity(vit)`` does the same).

    Weights (never silently random):

    * ``weights`` = path of the official file of the variant (e.g. ``dino_deitsmall8_pretrain.pth``,
      ``dinov2_vits14_pretrain.pth``, ``vit-s-300ep.pth.tar``), a timm / Hugging Face ``model.safetensors``,
      or a state dict; loaded strictly.
    * ``weights=None``: the weights shipped with ecaseg when the variant has ``default_weights`` (e.g.
      ``"vit_nano_p8_synthetic"``), else timm's ``pretrained=True`` download when the variant has a hub tag
      and the hub is reachable, else :class:`~ecaseg.errors.CheckpointError` saying which file to download.
    * ``allow_random_init=True`` with ``weights=None``: random weights (tests, synthetic runs only).

    Args:
        name: A name of :func:`list_variants`, a timm ViT name, or a timm ``VisionTransformer`` instance.
        weights: Checkpoint path or state dict, or None (see above).
        allow_random_init: Permit random weights when ``weights`` is None (no download is attempted).
        resize_to_patch: Resize inputs whose size is not a multiple of the patch (see :func:`fit_to_patch`);
            if False such inputs raise ``ValueError``.
        autocast: Use bf16 autocast when the input is on CUDA.
        carm_settings: Override the variant's CARM settings (:attr:`carm_settings`).

    Example:
        >>> dino = DINOAffinity("vit_nano_p8", allow_random_init=True)
        >>> out = dino(torch.zeros(1, 3, 16, 32))
        >>> out.keys.shape, out.cls_query.shape, out.tokens.shape, out.grid
        (torch.Size([1, 8, 96]), torch.Size([1, 96]), torch.Size([1, 8, 96]), (2, 4))
    """

    def __init__(
        self,
        name: str | VisionTransformer = "dino_vits8",
        weights: WeightsLike | None = None,
        allow_random_init: bool = False,
        *,
        resize_to_patch: bool = True,
        autocast: bool = True,
        carm_settings: CARMSettings | None = None,
    ) -> None:
        super().__init__()
        if carm_settings is not None and not isinstance(carm_settings, CARMSettings):
            raise ConfigError(f"carm_settings must be a CARMSettings, got {type(carm_settings).__name__}")
        self.resize_to_patch = resize_to_patch
        self.autocast = autocast
        if isinstance(name, nn.Module):
            if weights is not None or allow_random_init:
                raise ConfigError(
                    "DINOAffinity(vit) wraps the instance with its own weights; load weights into it first "
                    "(weights= and allow_random_init= apply to variant names only)"
                )
            variant = _variant_from_vit(name, "the model passed to DINOAffinity")
            vit = _check_built(name, variant, f"the {type(name).__name__} passed to DINOAffinity")
            _enable_dynamic_size(vit)
            self.name = f"custom:{type(name).__name__}"
        else:
            variant = _get_variant(name)
            self.name = name
            if weights is None and variant.default_weights is not None:
                weights = packaged_weights(name)
            if weights is not None:
                vit = build_vit(variant)
                load_vit_weights(vit, weights)
            elif allow_random_init:
                vit = build_vit(variant)
            else:
                vit = self._from_hub(name, variant)
        if carm_settings is not None:
            variant = dataclass_replace(variant, carm=carm_settings)
        self.variant = variant
        for blk in vit.blocks:
            if hasattr(blk.attn, "fused_attn"):
                blk.attn.fused_attn = True  # always F.scaled_dot_product_attention
        vit.requires_grad_(False)
        self.vit = vit
        self.patch_size = variant.patch_size
        self.embed_dim = variant.embed_dim
        self.num_heads = variant.num_heads
        super().train(False)

    @classmethod
    def from_model(
        cls,
        vit: VisionTransformer,
        *,
        resize_to_patch: bool = True,
        autocast: bool = True,
        carm_settings: CARMSettings | None = None,
    ) -> DINOAffinity:
        """Wrap your own timm ``VisionTransformer`` instance, with its weights, as the affinity ViT.

        The instance is used as it is (not copied): any patch size, any width and depth, with or without
        register tokens (dropped from the patch set), ``q_norm`` / ``k_norm`` applied when it has them. It
        must have a class token (Eq. (5) uses its query) and a fused ``qkv`` projection in the last block.
        Wrapping freezes it (``requires_grad_(False)``, eval mode), makes its attention use
        ``F.scaled_dot_product_attention`` and turns on timm's dynamic image size (position embeddings
        resampled to the input's grid; outputs at its native size are unchanged), exactly as the registered
        variants are set up, so the keys and class query equal theirs for the same weights.

        Args:
            vit: A timm ``VisionTransformer`` (e.g. ``timm.create_model("vit_small_patch14_dinov2")``
                with your weights loaded).
            resize_to_patch: See :class:`DINOAffinity`.
            autocast: See :class:`DINOAffinity`.
            carm_settings: The CARM settings that suit this ViT (:attr:`carm_settings`); ``None`` takes the
                paper's, which suit DINO-like ViTs only: measure yours with
                :func:`ecaseg.refine.search_carm_settings`.

        Returns:
            The wrapper; ``wrapper.vit is vit``.

        Raises:
            ConfigError: If ``vit`` is not a timm ViT with a class token and a fused ``qkv``.

        Example:
            >>> import timm
            >>> vit = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, embed_dim=48,
            ...                         num_heads=3, reg_tokens=2)
            >>> dino = DINOAffinity.from_model(vit)
            >>> dino.vit is vit, dino(torch.zeros(1, 3, 32, 48)).grid
            (True, (2, 3))
        """
        return cls(vit, resize_to_patch=resize_to_patch, autocast=autocast, carm_settings=carm_settings)

    if TYPE_CHECKING:

        def __call__(self, images: Tensor, with_tokens: bool = True) -> DINOFeatures: ...

    @staticmethod
    def _from_hub(name: str, variant: DINOVariant) -> VisionTransformer:
        files = " or ".join(variant.file_names) or "a checkpoint of this architecture"
        where = f" from {variant.url}" if variant.url else ""
        example = variant.file_names[0] if variant.file_names else "<file>"
        how = (
            f"Download {files}{where}, e.g. to pretrained/{example}, and pass "
            f"DINOAffinity({name!r}, weights='pretrained/{example}') (config key model.dino_weights); "
            "allow_random_init=True gives random weights for tests only."
        )
        if variant.hub_tag is None:
            raise CheckpointError(
                f"no weights given for DINO variant {name!r} and timm has none to download. {how}"
            )
        try:
            return _create_from_hub(variant)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(
                f"no weights given for DINO variant {name!r} and timm could not fetch "
                f"{variant.hub_tag!r} ({type(err).__name__}: {err}). {how}"
            ) from err

    @property
    def carm_settings(self) -> CARMSettings:
        """The CARM settings that suit this ViT (the ``carm`` field of its :class:`DINOVariant`).

        Example:
            >>> DINOAffinity("vit_nano_p8_synthetic").carm_settings.gamma
            0.9
        """
        return self.variant.carm

    def train(self, mode: bool = True) -> DINOAffinity:
        """Keep the frozen ViT in eval mode whatever ``mode`` is (so parents' ``.train()`` cannot change it).

        Args:
            mode: Ignored.

        Returns:
            self
        """
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor, with_tokens: bool = True) -> DINOFeatures:
        """Extract keys, class query and patch tokens.

        Args:
            images: ``[B, 3, H, W]`` ImageNet-normalised; resized to a multiple of the patch size if needed.
            with_tokens: Also run the last block's attention output, MLP and final norm for ``tokens``;
                ``False`` stops at the last block's ``qkv`` (``tokens`` is None), which is all Eq. (4)-(5)
                need (the trainer passes its own features to the prototypes).

        Returns:
            :class:`DINOFeatures` (float32) on the input's device, ``N = h * w`` with ``(h, w) = grid``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DINOAffinity expects images [B, 3, H, W], got {tuple(images.shape)}")
        check_float_dtype(
            images,
            "DINOAffinity images",
            "the ViT expects ImageNet-normalised floats: (images.float() / 255 - mean) / std "
            "(ecaseg.engine.inference.to_network_input does this for uint8 HWC arrays)",
        )
        if images.shape[0] == 0:  # an empty batch: empty features of the right sizes
            one = self.forward(images.new_zeros(1, *images.shape[1:]), with_tokens=with_tokens)
            return DINOFeatures(
                keys=one.keys[:0],
                cls_query=one.cls_query[:0],
                tokens=one.tokens[:0] if one.tokens is not None else None,
                grid=one.grid,
            )
        images = fit_to_patch(images, self.patch_size, resize=self.resize_to_patch)
        images = images.to(self.vit.patch_embed.proj.weight.dtype)
        use_amp = self.autocast and images.device.type == "cuda"
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = extract_features(self.vit, images, with_tokens=with_tokens)
        tokens = out.tokens.float() if out.tokens is not None else None
        return DINOFeatures(
            keys=out.keys.float(), cls_query=out.cls_query.float(), tokens=tokens, grid=out.grid
        )
