"""Tests of ecaseg.dino_affinity: checkpoint formats, strict loading, keys / class query, freezing."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import ecaseg.dino_affinity as da
from ecaseg.dino_affinity import (
    DINO_VARIANTS,
    DINOAffinity,
    DINOVariant,
    build_vit,
    fit_to_patch,
    list_variants,
    load_vit_weights,
    register_variant,
)
from ecaseg.errors import CheckpointError, ConfigError

# ---------------------------------------------------------------------------------------------------------
# Official-layout state dicts, written from the release formats (not from the model's own state_dict)
# ---------------------------------------------------------------------------------------------------------


def _block_shapes(dim: int, mlp: int, layer_scale: bool = False) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "norm1.weight": (dim,),
        "norm1.bias": (dim,),
        "attn.qkv.weight": (3 * dim, dim),
        "attn.qkv.bias": (3 * dim,),
        "attn.proj.weight": (dim, dim),
        "attn.proj.bias": (dim,),
        "norm2.weight": (dim,),
        "norm2.bias": (dim,),
        "mlp.fc1.weight": (mlp, dim),
        "mlp.fc1.bias": (mlp,),
        "mlp.fc2.weight": (dim, mlp),
        "mlp.fc2.bias": (dim,),
    }
    if layer_scale:
        shapes["ls1.gamma"] = (dim,)
        shapes["ls2.gamma"] = (dim,)
    return shapes


def _official_vit_state(
    dim: int, depth: int, patch: int, grid: int, *, layer_scale: bool = False, seed: int = 0
) -> dict[str, Tensor]:
    """DINO ``*_pretrain.pth`` layout (timm-like keys), random values."""
    gen = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, grid * grid + 1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        for k, s in _block_shapes(dim, 4 * dim, layer_scale).items():
            shapes[f"blocks.{i}.{k}"] = s
    shapes["norm.weight"] = (dim,)
    shapes["norm.bias"] = (dim,)
    state = {}
    for k, s in shapes.items():
        v = torch.randn(s, generator=gen) * 0.05
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            v = v + 1.0
        state[k] = v
    return state


@pytest.fixture(scope="module")
def dino_s8_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    """``dino_deitsmall8_pretrain.pth``: ViT-S/8, dim 384, depth 12, pos_embed for 28x28 + cls."""
    state = _official_vit_state(384, 12, 8, 28, seed=1)
    assert state["pos_embed"].shape == (1, 785, 384)
    path = tmp_path_factory.mktemp("ckpt") / "dino_deitsmall8_pretrain.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def dino_s8(dino_s8_file: tuple[Path, dict[str, Tensor]]) -> DINOAffinity:
    return DINOAffinity("dino_vits8", weights=dino_s8_file[0])


@pytest.fixture
def temp_variants() -> Iterator[list[str]]:
    """Names registered by a test are removed afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        DINO_VARIANTS.pop(n, None)


def _nano(**kw: object) -> DINOVariant:
    model_kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
    model_kwargs.update(kw)  # type: ignore[arg-type]
    return DINOVariant(
        family="custom",
        patch_size=8,
        embed_dim=48,
        num_heads=3,
        depth=2,
        model_kwargs=model_kwargs,
        num_reg_tokens=int(kw.get("reg_tokens", 0)),  # type: ignore[call-overload]
    )


def _reference_qk(plain: nn.Module, images: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q and k of every token (heads concatenated) from a hook on the last qkv, plus forward_features."""
    store: dict[str, Tensor] = {}
    handle = plain.blocks[-1].attn.qkv.register_forward_hook(  # type: ignore[union-attr,index]
        lambda _m, _i, out: store.__setitem__("qkv", out.detach())
    )
    with torch.no_grad():
        feats = plain.forward_features(images)  # type: ignore[operator]
    handle.remove()
    qkv = store["qkv"]
    b, t, three_d = qkv.shape
    d = three_d // 3
    hd = d // num_heads
    per = qkv.reshape(b, t, 3, num_heads, hd)
    q = torch.cat([per[:, :, 0, h] for h in range(num_heads)], dim=-1)
    k = torch.cat([per[:, :, 1, h] for h in range(num_heads)], dim=-1)
    return q, k, feats


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def test_dino_s8_official_file_loads_exactly(
    dino_s8: DINOAffinity, dino_s8_file: tuple[Path, dict[str, Tensor]]
) -> None:
    own = dino_s8.vit.state_dict()
    _, state = dino_s8_file
    assert set(own) == set(state)
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    assert (dino_s8.patch_size, dino_s8.embed_dim, dino_s8.num_heads) == (8, 384, 6)


def test_keys_query_tokens_match_hooked_timm_model(
    dino_s8: DINOAffinity, dino_s8_file: tuple[Path, dict[str, Tensor]]
) -> None:
    with torch.device("meta"):  # skip the random init; the weights are assigned from the file's tensors
        plain = timm.create_model(
            "vit_small_patch8_224", pretrained=False, num_classes=0, dynamic_img_size=True
        )
    plain.load_state_dict(dino_s8_file[1], strict=True, assign=True)
    plain.eval()
    images = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    q, k, feats = _reference_qk(plain, images, num_heads=6)
    out = dino_s8(images)
    assert out.grid == (5, 7)
    assert (
        out.keys.shape == (2, 35, 384)
        and out.cls_query.shape == (2, 384)
        and out.tokens.shape == (2, 35, 384)
    )
    torch.testing.assert_close(out.keys, k[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls_query, q[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens, feats[:, 1:], atol=1e-5, rtol=1e-5)
    # row-major: patch (r, c) is index r * w + c; the keys of one image do not depend on another image
    single = dino_s8(images[1:])
    torch.testing.assert_close(single.keys[0], out.keys[1], atol=1e-5, rtol=1e-5)


def test_mocov3_checkpoint_loads_base_encoder_and_drops_extras(tmp_path: Path) -> None:
    enc = _official_vit_state(384, 12, 16, 14, seed=2)
    state: dict[str, Tensor] = {f"module.base_encoder.{k}": v for k, v in enc.items()}
    # MoCo v3 projector MLP on the base encoder, predictor, and (part of) the momentum encoder
    state["module.base_encoder.head.0.weight"] = torch.randn(4096, 384)
    state["module.base_encoder.head.1.running_mean"] = torch.zeros(4096)
    state["module.base_encoder.head.6.weight"] = torch.randn(256, 4096)
    state["module.predictor.0.weight"] = torch.randn(4096, 256)
    state["module.momentum_encoder.patch_embed.proj.weight"] = torch.randn(384, 3, 16, 16)
    state["module.momentum_encoder.cls_token"] = torch.randn(1, 1, 384)
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state, "optimizer": {"step": 1}}, path)
    dino = DINOAffinity("mocov3_vits16", weights=path)
    own = dino.vit.state_dict()
    assert set(own) == set(enc)
    for k, v in enc.items():
        assert torch.equal(own[k], v), k
    assert dino.num_heads == 12
    out = dino(torch.randn(1, 3, 32, 48))
    assert out.keys.shape == (1, 6, 384) and out.grid == (2, 3)


def _nano_state() -> dict[str, Tensor]:
    torch.manual_seed(0)
    return build_vit(DINO_VARIANTS["vit_nano_p8"]).state_dict()


def test_missing_unexpected_and_wrong_shape_are_listed(dino_s8_file: tuple[Path, dict[str, Tensor]]) -> None:
    state = dict(dino_s8_file[1])
    del state["blocks.3.mlp.fc1.bias"]
    state["blocks.0.attn.qkv.weight"] = torch.zeros(1152, 383)
    state["blocks.0.gamma_extra"] = torch.zeros(3)
    with torch.device("meta"):  # the comparison needs shapes only
        vit = build_vit(DINO_VARIANTS["dino_vits8"])
    with pytest.raises(CheckpointError) as info:
        load_vit_weights(vit, state)
    msg = str(info.value)
    assert "missing keys (1): blocks.3.mlp.fc1.bias" in msg
    assert "unexpected keys (1): blocks.0.gamma_extra" in msg
    assert "blocks.0.attn.qkv.weight: checkpoint (1152, 383) vs model (1152, 384)" in msg


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        DINOAffinity("vit_nano_p8", weights=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad\.pth"):
        DINOAffinity("vit_nano_p8", weights=bad)


def test_safetensors_timm_file_with_classifier_head(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = _nano_state()
    state["head.weight"] = torch.randn(1000, 96)
    state["head.bias"] = torch.randn(1000)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    dino = DINOAffinity("vit_nano_p8", weights=path)
    assert torch.equal(dino.vit.state_dict()["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])


def test_pos_embed_of_another_grid_is_resampled() -> None:
    state = _nano_state()  # native grid 8x8 (img_size 64)
    cls_pos = torch.randn(1, 1, 96)
    const = torch.randn(1, 1, 96).expand(1, 16, 96)  # 4x4 grid, the same vector everywhere
    state["pos_embed"] = torch.cat([cls_pos, const], dim=1)
    vit: Any = build_vit(DINO_VARIANTS["vit_nano_p8"])
    load_vit_weights(vit, state)
    assert vit.pos_embed.shape == (1, 65, 96)
    torch.testing.assert_close(vit.pos_embed[:, :1], cls_pos)
    torch.testing.assert_close(vit.pos_embed[:, 1:], const[:, :1].expand(1, 64, 96), atol=1e-5, rtol=1e-5)
    state["pos_embed"] = torch.randn(1, 1 + 15, 96)  # not a square grid
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_vit_weights(build_vit(DINO_VARIANTS["vit_nano_p8"]), state)


def test_dinov2_reg_release_layout(temp_variants: list[str]) -> None:
    """DINOv2 release keys: register_tokens, mask_token, pos_embed with a class entry, ls*.gamma."""
    name = "test_nano_dinov2_reg"
    register_variant(name, _nano(reg_tokens=4, no_embed_class=True, init_values=1e-5))
    temp_variants.append(name)
    state = _official_vit_state(48, 2, 8, 4, layer_scale=True, seed=5)
    state["register_tokens"] = torch.randn(1, 4, 48)
    state["mask_token"] = torch.zeros(1, 48)
    dino = DINOAffinity(name, weights=state)
    vit: Any = dino.vit
    assert torch.equal(vit.blocks[1].ls2.gamma, state["blocks.1.ls2.gamma"])
    assert torch.equal(vit.reg_token, state["register_tokens"])
    # the token sequence entering block 0 equals DINOv2's own arrangement:
    # [cls + pos[0], registers (no position), patches + pos[1:]]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        patches = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=8)
        patches = patches.flatten(2).transpose(1, 2)
        cls = state["cls_token"].expand(2, -1, -1)
        seq = torch.cat([cls, patches], dim=1) + state["pos_embed"]
        expected = torch.cat([seq[:, :1], state["register_tokens"].expand(2, -1, -1), seq[:, 1:]], dim=1)
        got = vit._pos_embed(vit.patch_embed(images))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dinov2_mask_token_dropped(temp_variants: list[str]) -> None:
    name = "test_nano_dinov2"
    register_variant(name, _nano(init_values=1e-5))
    temp_variants.append(name)
    state = _official_vit_state(48, 2, 8, 4, layer_scale=True, seed=6)
    state["mask_token"] = torch.zeros(1, 48)
    dino = DINOAffinity(name, weights=state)
    assert torch.equal(dino.vit.state_dict()["pos_embed"], state["pos_embed"])


# ---------------------------------------------------------------------------------------------------------
# No weights
# ---------------------------------------------------------------------------------------------------------


def test_no_weights_offline_raises_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*_a: object, **_k: object) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(da, "_cached_hub_file", lambda _tag: None)
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def no_download(*_a: object, **kw: object) -> None:
        raise AssertionError(f"download attempted: {kw}")

    monkeypatch.setattr(timm, "create_model", no_download)
    with pytest.raises(CheckpointError) as info:
        DINOAffinity("dino_vits8")
    msg = str(info.value)
    assert "dino_deitsmall8_pretrain.pth" in msg
    assert "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth" in msg
    assert "weights=" in msg


def test_no_weights_without_hub_tag_never_tries_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(_v: object) -> None:
        raise AssertionError("hub used")

    monkeypatch.setattr(da, "_create_from_hub", fail)
    with pytest.raises(CheckpointError, match=r"vit-s-300ep\.pth\.tar"):
        DINOAffinity("mocov3_vits16")
    with pytest.raises(CheckpointError, match="allow_random_init"):
        DINOAffinity("vit_nano_p8")
    DINOAffinity("vit_nano_p8", allow_random_init=True)  # explicit opt-in works, no hub


def test_cached_hub_weights_are_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, temp_variants: list[str]
) -> None:
    from safetensors.torch import save_file

    name = "test_nano_hub"
    base = DINO_VARIANTS["vit_nano_p8"]
    register_variant(
        name,
        DINOVariant(
            family="custom",
            patch_size=8,
            embed_dim=96,
            num_heads=3,
            depth=4,
            model_kwargs=base.model_kwargs,
            hub_tag="vit_nano.fake",
        ),
    )
    temp_variants.append(name)
    state = _nano_state()
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    monkeypatch.setattr(da, "_cached_hub_file", lambda tag: path if tag == "vit_nano.fake" else None)
    dino = DINOAffinity(name)
    assert torch.equal(dino.vit.state_dict()["cls_token"], state["cls_token"])


# ---------------------------------------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------------------------------------


def test_frozen_and_always_eval(dino_s8: DINOAffinity) -> None:
    parent = nn.Sequential(dino_s8)
    parent.train()
    dino_s8.train(True)
    assert not dino_s8.training
    assert not any(m.training for m in dino_s8.modules())
    assert not any(p.requires_grad for p in dino_s8.parameters())
    images = torch.randn(1, 3, 16, 24, requires_grad=True)
    out = dino_s8(images)
    assert not out.keys.requires_grad and not out.cls_query.requires_grad and not out.tokens.requires_grad
    assert out.keys.dtype == torch.float32


def test_registers_dropped(temp_variants: list[str]) -> None:
    name = "test_nano_reg"
    register_variant(name, _nano(reg_tokens=4, no_embed_class=True))
    temp_variants.append(name)
    torch.manual_seed(4)
    dino = DINOAffinity(name, allow_random_init=True)
    assert dino.vit.num_prefix_tokens == 5
    images = torch.randn(2, 3, 24, 40)
    q, k, feats = _reference_qk(dino.vit, images, num_heads=3)
    out = dino(images)
    assert out.grid == (3, 5) and out.keys.shape == (2, 15, 48) and out.tokens.shape == (2, 15, 48)
    torch.testing.assert_close(out.keys, k[:, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls_query, q[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens, feats[:, 5:], atol=1e-5, rtol=1e-5)


def test_sdpa_only_no_softmax_attention(dino_s8: DINOAffinity, monkeypatch: pytest.MonkeyPatch) -> None:
    assert all(getattr(blk.attn, "fused_attn", False) for blk in dino_s8.vit.blocks)

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("explicit softmax attention")

    monkeypatch.setattr(torch.Tensor, "softmax", boom)
    monkeypatch.setattr(F, "softmax", boom)
    dino_s8(torch.randn(1, 3, 16, 16))


def test_resize_to_nearest_multiple() -> None:
    torch.manual_seed(0)
    dino = DINOAffinity("vit_nano_p8", allow_random_init=True)
    images = torch.randn(1, 3, 44, 60)
    out = dino(images)
    assert out.grid == (6, 8)  # 44 -> 48 (5.5 rounds up), 60 -> 64
    resized = F.interpolate(images, size=(48, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(dino(resized).keys, out.keys)
    strict = DINOAffinity("vit_nano_p8", allow_random_init=True, resize_to_patch=False)
    with pytest.raises(ValueError, match="not divisible"):
        strict(images)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        dino(torch.randn(3, 16, 16))


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 120), w=st.integers(1, 120), p=st.sampled_from([8, 14, 16]))
def test_fit_to_patch_sizes(h: int, w: int, p: int) -> None:
    out = fit_to_patch(torch.zeros(1, 1, h, w), p)
    for before, after in zip((h, w), out.shape[-2:]):
        assert after % p == 0 and after >= p
        assert abs(after - before) <= p / 2 or before < p / 2
        if before % p == 0:
            assert after == before


def test_registry() -> None:
    for name in (
        "dino_vits8",
        "dino_vits16",
        "dino_vitb8",
        "dino_vitb16",
        "dinov2_vits14",
        "dinov2_vits14_reg",
    ):
        assert name in DINO_VARIANTS
    for name in ("mocov3_vits16", "sup_vits16", "vit_nano_p8"):
        assert name in DINO_VARIANTS
    with torch.device("meta"):  # shapes only, no memory
        for v in DINO_VARIANTS.values():
            vit = build_vit(v)  # checks patch / dim / heads / depth / registers against the variant
            assert vit.num_reg_tokens == v.num_reg_tokens
    with pytest.raises(ConfigError, match="dino_vits8"):
        DINOAffinity("dino_vits9")
    with pytest.raises(ConfigError, match="already registered"):
        register_variant("dino_vits8", DINO_VARIANTS["dino_vits8"])
    wrong = DINOVariant(family="custom", patch_size=8, embed_dim=64, num_heads=3, depth=4,
                        model_kwargs=DINO_VARIANTS["vit_nano_p8"].model_kwargs)  # fmt: skip
    with pytest.raises(ConfigError, match="declares"):
        build_vit(wrong)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_close_to_fp32() -> None:
    torch.manual_seed(0)
    dino = DINOAffinity("vit_nano_p8", allow_random_init=True).cuda()
    images = torch.randn(2, 3, 64, 64, device="cuda")
    amp = dino(images)
    dino.autocast = False
    ref = dino(images)
    assert amp.keys.dtype == torch.float32 and amp.keys.device.type == "cuda"
    cos = F.cosine_similarity(amp.keys, ref.keys, dim=-1)
    assert cos.min() > 0.99


# --- bring your own ViT (0.2) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # patch 8, class token only
        {"reg_tokens": 4, "no_embed_class": True, "init_values": 1e-5},  # DINOv2-style registers
        {"patch_size": 14, "img_size": 28, "qk_norm": True},  # another patch size, per-head q/k norms
    ],
)
def test_from_model_equals_the_registered_path(kwargs: dict[str, Any], temp_variants: list[str]) -> None:
    variant = _nano(**kwargs)
    if "patch_size" in kwargs:
        variant = dataclasses.replace(variant, patch_size=kwargs["patch_size"])
    name = f"byo_{len(kwargs)}_{kwargs.get('patch_size', 8)}"
    temp_variants.append(name)
    register_variant(name, variant)
    torch.manual_seed(3)
    ref = DINOAffinity(name, allow_random_init=True)
    mine = timm.create_model(  # the user's own timm ViT, not built for dynamic sizes
        "vit_small_patch16_224", pretrained=False, num_classes=0, **variant.model_kwargs
    )
    mine.load_state_dict(ref.vit.state_dict())
    wrapped = DINOAffinity.from_model(mine)
    assert wrapped.vit is mine and not any(p.requires_grad for p in mine.parameters())
    images = torch.randn(2, 3, 3 * variant.patch_size, 5 * variant.patch_size)
    a, b = ref(images), wrapped(images)
    assert b.grid == a.grid == (3, 5)
    torch.testing.assert_close(b.keys, a.keys)
    torch.testing.assert_close(b.cls_query, a.cls_query)
    assert b.tokens is not None and a.tokens is not None
    torch.testing.assert_close(b.tokens, a.tokens)
    assert isinstance(DINOAffinity(mine).variant, DINOVariant)  # the constructor takes an instance too


def test_from_model_refuses_other_modules_with_a_short_message() -> None:
    with pytest.raises(ConfigError) as err:
        DINOAffinity(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    assert "is a Sequential, expected a timm VisionTransformer" in str(err.value)
    assert len(str(err.value)) < 200  # no module repr
    no_cls = timm.create_model(
        "vit_small_patch16_224", pretrained=False, depth=1, embed_dim=24, num_heads=2, class_token=False,
        global_pool="avg",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="no class token"):
        DINOAffinity.from_model(no_cls)


def test_timm_names_with_tags_are_accepted() -> None:
    tagged = DINOAffinity("vit_small_patch8_224.dino", allow_random_init=True)
    assert tagged.variant is DINO_VARIANTS["dino_vits8"]
    other = DINOAffinity("vit_small_patch14_reg4_dinov2.lvd142m", allow_random_init=True)
    assert (other.patch_size, other.variant.num_reg_tokens) == (14, 4)
    out = other(torch.zeros(1, 3, 28, 42))
    assert out.grid == (2, 3) and out.keys.shape == (1, 6, 384)
    with pytest.raises(ConfigError, match="unknown DINO variant 'vit_smal_patch8'"):
        DINOAffinity("vit_smal_patch8", allow_random_init=True)
    assert "dino_vits8" in list_variants() and list_variants() == sorted(DINO_VARIANTS)


def test_a_failed_registration_leaves_nothing_behind() -> None:
    before = list_variants()
    broken = DINOVariant(family="custom", patch_size=8, embed_dim=64, num_heads=3, depth=4,
                         model_kwargs=DINO_VARIANTS["vit_nano_p8"].model_kwargs)  # fmt: skip
    with pytest.raises(ConfigError, match=r"cannot register DINO variant 'broken'.*declares"):
        register_variant("broken", broken)
    bad_kwargs = dataclasses.replace(broken, model_kwargs={"no_such_argument": 1})
    with pytest.raises(ConfigError, match="cannot register DINO variant 'broken'"):
        register_variant("broken", bad_kwargs)
    assert list_variants() == before


def test_without_tokens_stops_at_the_last_qkv_with_equal_keys() -> None:
    torch.manual_seed(4)
    dino = DINOAffinity("vit_nano_p8", allow_random_init=True)
    images = torch.randn(2, 3, 32, 40)
    full, short = dino(images), dino(images, with_tokens=False)
    assert short.tokens is None and full.tokens is not None
    assert torch.equal(full.keys, short.keys) and torch.equal(full.cls_query, short.cls_query)
    calls: list[int] = []
    hook = dino.vit.norm.register_forward_hook(lambda *_: calls.append(1))
    dino(images, with_tokens=False)
    hook.remove()
    assert not calls  # the final norm (and the last MLP before it) did not run
