"""Tests of ecaseg.models: MiT encoder, checkpoint loading, SegFormer head and ECANet (CPU, tiny inputs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ecaseg.errors import CheckpointError, ConfigError
from ecaseg.models import (
    ECANet,
    MixVisionTransformer,
    SegFormerHead,
    attention_to_affinity,
    create_backbone,
    gmp_logits,
    hf_to_nvlabs,
    load_mit_weights,
    mit_b1,
    mit_nano,
    nvlabs_to_hf,
    raw_cam,
)

# ----------------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------------

B1 = {"dims": (64, 128, 320, 512), "heads": (1, 2, 5, 8), "depths": (2, 2, 2, 2), "sr": (8, 4, 2, 1)}


def official_mit_shapes(dims, depths, sr, patch=(7, 3, 3, 3), with_head=True) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the NVlabs ``mit_b*.pth`` state dicts, written from the published architecture."""
    shapes: dict[str, tuple[int, ...]] = {}
    cin = 3
    for i in range(4):
        d, s = dims[i], i + 1
        shapes[f"patch_embed{s}.proj.weight"] = (d, cin, patch[i], patch[i])
        shapes[f"patch_embed{s}.proj.bias"] = (d,)
        shapes[f"patch_embed{s}.norm.weight"] = (d,)
        shapes[f"patch_embed{s}.norm.bias"] = (d,)
        for j in range(depths[i]):
            p = f"block{s}.{j}."
            for name in ("norm1", "norm2"):
                shapes[p + name + ".weight"] = (d,)
                shapes[p + name + ".bias"] = (d,)
            shapes[p + "attn.q.weight"] = (d, d)
            shapes[p + "attn.q.bias"] = (d,)
            shapes[p + "attn.kv.weight"] = (2 * d, d)
            shapes[p + "attn.kv.bias"] = (2 * d,)
            shapes[p + "attn.proj.weight"] = (d, d)
            shapes[p + "attn.proj.bias"] = (d,)
            if sr[i] > 1:
                shapes[p + "attn.sr.weight"] = (d, d, sr[i], sr[i])
                shapes[p + "attn.sr.bias"] = (d,)
                shapes[p + "attn.norm.weight"] = (d,)
                shapes[p + "attn.norm.bias"] = (d,)
            shapes[p + "mlp.fc1.weight"] = (4 * d, d)
            shapes[p + "mlp.fc1.bias"] = (4 * d,)
            shapes[p + "mlp.dwconv.dwconv.weight"] = (4 * d, 1, 3, 3)
            shapes[p + "mlp.dwconv.dwconv.bias"] = (4 * d,)
            shapes[p + "mlp.fc2.weight"] = (d, 4 * d)
            shapes[p + "mlp.fc2.bias"] = (d,)
        shapes[f"norm{s}.weight"] = (d,)
        shapes[f"norm{s}.bias"] = (d,)
        cin = d
    if with_head:
        shapes["head.weight"] = (1000, dims[3])
        shapes["head.bias"] = (1000,)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}


def hf_names_independent(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVlabs -> Hugging Face ``SegformerForImageClassification`` names, written out separately here."""
    table = {
        "norm1": "layer_norm_1",
        "norm2": "layer_norm_2",
        "attn.q": "attention.self.query",
        "attn.proj": "attention.output.dense",
        "attn.sr": "attention.self.sr",
        "attn.norm": "attention.self.layer_norm",
        "mlp.fc1": "mlp.dense1",
        "mlp.fc2": "mlp.dense2",
        "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    }
    out: dict[str, torch.Tensor] = {}
    for key, val in sd.items():
        parts = key.split(".")
        if parts[0] == "head":
            out["classifier." + parts[1]] = val
        elif parts[0].startswith("patch_embed"):
            stage = int(parts[0][-1]) - 1
            sub = "layer_norm" if parts[1] == "norm" else "proj"
            out[f"segformer.encoder.patch_embeddings.{stage}.{sub}.{parts[2]}"] = val
        elif parts[0].startswith("norm"):
            out[f"segformer.encoder.layer_norm.{int(parts[0][-1]) - 1}.{parts[1]}"] = val
        else:
            stage, j, inner, param = int(parts[0][-1]) - 1, parts[1], ".".join(parts[2:-1]), parts[-1]
            stem = f"segformer.encoder.block.{stage}.{j}."
            if inner == "attn.kv":
                half = val.shape[0] // 2
                out[stem + "attention.self.key." + param] = val[:half].clone()
                out[stem + "attention.self.value." + param] = val[half:].clone()
            else:
                out[stem + table[inner] + "." + param] = val
    return out


def reference_mit_forward(sd, x, heads, depths, sr, strides, eps=1e-6):
    """Straightforward functional MiT forward from a NVlabs state dict (explicit softmax attention)."""
    feats = []
    for i in range(4):
        s = i + 1
        w = sd[f"patch_embed{s}.proj.weight"]
        x = F.conv2d(x, w, sd[f"patch_embed{s}.proj.bias"], stride=strides[i], padding=w.shape[-1] // 2)
        b, d, h, wd = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = F.layer_norm(t, (d,), sd[f"patch_embed{s}.norm.weight"], sd[f"patch_embed{s}.norm.bias"], 1e-5)
        for j in range(depths[i]):
            p = f"block{s}.{j}."
            y = F.layer_norm(t, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
            q = F.linear(y, sd[p + "attn.q.weight"], sd[p + "attn.q.bias"])
            src = y
            if sr[i] > 1:
                g = y.transpose(1, 2).reshape(b, d, h, wd)
                g = F.conv2d(g, sd[p + "attn.sr.weight"], sd[p + "attn.sr.bias"], stride=sr[i])
                src = F.layer_norm(
                    g.flatten(2).transpose(1, 2),
                    (d,),
                    sd[p + "attn.norm.weight"],
                    sd[p + "attn.norm.bias"],
                    1e-5,
                )
            kv = F.linear(src, sd[p + "attn.kv.weight"], sd[p + "attn.kv.bias"])
            k, v = kv[..., :d], kv[..., d:]
            hd = d // heads[i]
            outs = []
            for n in range(heads[i]):
                sl = slice(n * hd, (n + 1) * hd)
                a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd), dim=-1)
                outs.append(a @ v[..., sl])
            t = t + F.linear(torch.cat(outs, -1), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
            y = F.layer_norm(t, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
            y = F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
            c = y.shape[-1]
            y = F.conv2d(
                y.transpose(1, 2).reshape(b, c, h, wd),
                sd[p + "mlp.dwconv.dwconv.weight"],
                sd[p + "mlp.dwconv.dwconv.bias"],
                padding=1,
                groups=c,
            )
            y = F.gelu(y.flatten(2).transpose(1, 2))
            t = t + F.linear(y, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = F.layer_norm(t, (d,), sd[f"norm{s}.weight"], sd[f"norm{s}.bias"], eps)
        x = t.transpose(1, 2).reshape(b, d, h, wd)
        feats.append(x)
    return feats


@pytest.fixture(scope="module")
def b1_state() -> dict[str, torch.Tensor]:
    return random_state(official_mit_shapes(B1["dims"], B1["depths"], B1["sr"]))


@pytest.fixture(scope="module")
def b1_path(tmp_path_factory, b1_state) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "mit_b1.pth"
    torch.save(b1_state, path)
    return path


# ----------------------------------------------------------------------------------------------------
# MiT encoder
# ----------------------------------------------------------------------------------------------------


def test_mit_b1_names_and_shapes_match_official_release():
    want = official_mit_shapes(B1["dims"], B1["depths"], B1["sr"], with_head=False)
    got = {k: tuple(v.shape) for k, v in mit_b1().state_dict().items()}
    assert got == want


def test_mit_b1_parameter_count_is_published_size():
    n = sum(p.numel() for p in mit_b1().parameters())
    assert 13.0e6 <= n <= 13.3e6


def test_mit_b1_feature_shapes_512_wsss_strides():
    net = mit_b1().eval()
    assert net.embed_dims == [64, 128, 320, 512] and net.num_heads == [1, 2, 5, 8] and net.stride == 16
    with torch.no_grad():
        feats = net(torch.randn(1, 3, 512, 512))
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 128, 128),
        (1, 128, 64, 64),
        (1, 320, 32, 32),
        (1, 512, 32, 32),
    ]


def test_segformer_strides_give_one_32nd():
    net = mit_nano(strides=(4, 2, 2, 2)).eval()
    feats = net(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2] and net.stride == 32


def test_mit_matches_functional_reference():
    torch.manual_seed(0)
    net = mit_nano().eval()
    sd = net.state_dict()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        got = net(x)
        ref = reference_mit_forward(sd, x, net.num_heads, net.depths, net.sr_ratios, net.strides)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_sdpa_path_equals_explicit_attention_path_and_maps_are_qk_scores():
    torch.manual_seed(0)
    net = mit_nano().eval()
    x = torch.randn(2, 3, 64, 64)
    captured: list[torch.Tensor] = []
    hooks = [blk.attn.register_forward_hook(lambda m, a, o: captured.append(a[0])) for blk in net.block4]
    with torch.no_grad():
        sdpa = net(x)
        captured.clear()
        explicit, attns = net.forward_with_attn(x, last_n=2)
        _, probs = net.forward_with_attn(x, last_n=1, softmax=True)
    for h in hooks:
        h.remove()
    for a, b in zip(sdpa, explicit):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    heads, n4 = net.num_heads[3], 16
    assert len(attns) == 2 and all(tuple(a.shape) == (2, heads, n4, n4) for a in attns)
    # reference scores q k^T from the block's input tokens and its weights
    for blk, tokens, got in zip(net.block4, captured[:2], attns):
        d = tokens.shape[-1]
        q = F.linear(tokens, blk.attn.q.weight, blk.attn.q.bias)
        k = F.linear(tokens, blk.attn.kv.weight, blk.attn.kv.bias)[..., :d]
        hd = d // heads
        for n in range(heads):
            sl = slice(n * hd, (n + 1) * hd)
            torch.testing.assert_close(
                got[:, n], q[..., sl] @ k[..., sl].transpose(1, 2), atol=1e-4, rtol=1e-4
            )
    assert len(probs) == 1
    torch.testing.assert_close(probs[0], torch.softmax(attns[1] / math.sqrt(128 // heads), dim=-1))


def test_backbone_bad_arguments():
    with pytest.raises(ConfigError, match="mit_b1"):
        create_backbone("mit_b9")
    with pytest.raises(ValueError, match="last_n"):
        mit_nano().forward_with_attn(torch.zeros(1, 3, 32, 32), last_n=3)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        mit_nano()(torch.zeros(3, 32, 32))
    with pytest.raises(ConfigError, match="4 entries"):
        MixVisionTransformer(depths=(1, 1, 1))


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def test_load_nvlabs_checkpoint_strictly(b1_path, b1_state):
    net = mit_b1()
    ignored = load_mit_weights(net, b1_path)
    assert ignored == ["head.bias", "head.weight"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, b1_state[k]), k
    net2 = mit_b1(weights=b1_path)
    assert torch.equal(net2.block4[1].attn.kv.weight, b1_state["block4.1.attn.kv.weight"])


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_load_wrapped_and_prefixed_checkpoint(tmp_path, b1_state, wrapper):
    path = tmp_path / "wrapped.pth"
    torch.save({wrapper: {"module." + k: v for k, v in b1_state.items()}, "meta": {"epoch": 3}}, path)
    net = mit_b1()
    load_mit_weights(net, path)
    assert torch.equal(net.norm4.weight, b1_state["norm4.weight"])


def test_checkpoint_errors_list_keys(tmp_path, b1_state):
    bad = dict(b1_state)
    del bad["block2.1.mlp.fc1.bias"]
    bad["block3.0.attn.q.weight"] = torch.zeros(320, 321)
    bad["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    net = mit_b1()
    before = net.block1[0].attn.q.weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_mit_weights(net, path)
    msg = str(info.value)
    assert "missing (1): block2.1.mlp.fc1.bias" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "block3.0.attn.q.weight: checkpoint (320, 321) vs model (320, 320)" in msg
    assert torch.equal(net.block1[0].attn.q.weight, before)  # nothing was loaded


def test_checkpoint_of_other_variant_is_rejected(tmp_path):
    path = tmp_path / "nano.pth"
    torch.save(mit_nano().state_dict(), path)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_mit_weights(mit_b1(), path)


def test_missing_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"not_there\.pth"):
        mit_nano(weights=tmp_path / "not_there.pth")
    (tmp_path / "hf").mkdir()
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_mit_weights(mit_nano(), tmp_path / "hf")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        load_mit_weights(mit_nano(), tmp_path / "junk.pth")


def _hf_config(**over):
    cfg = {
        "model_type": "segformer",
        "hidden_sizes": list(B1["dims"]),
        "depths": list(B1["depths"]),
        "num_attention_heads": list(B1["heads"]),
        "sr_ratios": list(B1["sr"]),
        "patch_sizes": [7, 3, 3, 3],
        "strides": [4, 2, 2, 2],
        "mlp_ratios": [4, 4, 4, 4],
    }
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_load_hugging_face_folder_equals_nvlabs(tmp_path, b1_path, b1_state, filename):
    folder = tmp_path / "mit-b1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_hf_config()))
    hf = hf_names_independent(b1_state)
    assert "segformer.encoder.block.3.1.attention.self.value.weight" in hf
    if filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / filename))
    else:
        torch.save(hf, folder / filename)
    from_hf, from_nv = mit_b1(), mit_b1()
    assert load_mit_weights(from_hf, folder) == ["classifier.bias", "classifier.weight"]
    load_mit_weights(from_nv, b1_path)
    nv_sd = from_nv.state_dict()
    for k, v in from_hf.state_dict().items():
        assert torch.equal(v, nv_sd[k]), k


def test_hugging_face_config_and_partial_kv_errors(tmp_path, b1_state):
    folder = tmp_path / "hf"
    folder.mkdir()
    hf = hf_names_independent(b1_state)
    (folder / "config.json").write_text(json.dumps(_hf_config(num_attention_heads=[1, 2, 5, 4])))
    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"num_attention_heads=\[1, 2, 5, 4\]"):
        load_mit_weights(mit_b1(), folder)
    (folder / "config.json").write_text(json.dumps(_hf_config()))
    del hf["segformer.encoder.block.0.1.attention.self.value.bias"]
    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_mit_weights(mit_b1(), folder)
    assert "encoder.block.0.1.attention.self.value.bias" in str(info.value)
    assert "block1.1.attn.kv.bias" in str(info.value)


def test_layout_conversions_roundtrip(b1_state):
    hf = nvlabs_to_hf(b1_state)
    assert hf.keys() == hf_names_independent(b1_state).keys()
    back, missing = hf_to_nvlabs(hf)
    back = {
        ("head." + k[len("classifier.") :] if k.startswith("classifier.") else k): v for k, v in back.items()
    }
    assert not missing and back.keys() == b1_state.keys()
    assert all(torch.equal(back[k], b1_state[k]) for k in b1_state)


# ----------------------------------------------------------------------------------------------------
# Heads and ECANet
# ----------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2), d=st.integers(1, 4), c=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(1, 4)
)
def test_gmp_logits_and_raw_cam_match_loops(b, d, c, h, w):
    g = torch.Generator().manual_seed(b * 1000 + d * 100 + c * 10 + h + w)
    f = torch.randn(b, d, h, w, generator=g)
    wt = torch.randn(c, d, 1, 1, generator=g)
    logits, cams = gmp_logits(f, wt), raw_cam(f, wt)
    for i in range(b):
        for k in range(c):
            want = sum(float(wt[k, j, 0, 0]) * float(f[i, j].max()) for j in range(d))
            assert abs(float(logits[i, k]) - want) < 1e-4
            for y in range(h):
                for x in range(w):
                    v = max(0.0, sum(float(wt[k, j, 0, 0]) * float(f[i, j, y, x]) for j in range(d)))
                    assert abs(float(cams[i, k, y, x]) - v) < 1e-4


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), heads=st.lists(st.integers(1, 3), min_size=1, max_size=3))
def test_attention_to_affinity_matches_concat_conv_reference(n, heads):
    g = torch.Generator().manual_seed(n * 7 + sum(heads))
    attns = [torch.randn(2, h, n, n, generator=g) for h in heads]
    m = sum(heads)
    conv = torch.nn.Conv2d(m, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(1, m, 1, 1, generator=g))
        cat = torch.cat(attns, dim=1)
        ref = torch.sigmoid(conv(cat + cat.transpose(-1, -2)))[:, 0]
        got = attention_to_affinity(attns, conv.weight, conv.bias)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, got.transpose(-1, -2), atol=1e-6, rtol=0)


def test_segformer_head_against_reference():
    torch.manual_seed(0)
    head = SegFormerHead([4, 6, 8, 10], embed_dim=5, num_classes=3).eval()
    feats = [torch.randn(2, c, s, s) for c, s in zip([4, 6, 8, 10], [8, 4, 2, 2])]
    with torch.no_grad():
        got = head(feats)
        ups = [
            F.interpolate(conv(f), size=(8, 8), mode="bilinear", align_corners=False)
            for conv, f in zip(head.linear_c, feats)
        ]
        fused = torch.relu(head.bn(head.linear_fuse(torch.cat(ups[::-1], 1))))
        ref = head.linear_pred(fused)
    assert got.shape == (2, 3, 8, 8)
    torch.testing.assert_close(got, ref)


def test_segformer_head_folded_fuse_equals_concatenation_with_gradients():
    """The folded fusion (the default) is the concatenating SegFormer head: outputs and every gradient."""
    torch.manual_seed(0)
    folded = SegFormerHead([4, 6, 8, 10], embed_dim=5, num_classes=3, dropout=0.0)
    plain = SegFormerHead([4, 6, 8, 10], embed_dim=5, num_classes=3, dropout=0.0, fold_fuse=False)
    plain.load_state_dict(folded.state_dict())
    feats = [torch.randn(2, c, s, s + 1) for c, s in zip([4, 6, 8, 10], [8, 4, 2, 1])]
    outs, grads = [], []
    for head in (folded, plain):  # train mode: batch statistics in the BatchNorm
        inputs = [f.clone().requires_grad_(True) for f in feats]
        out = head(inputs)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([i.grad for i in inputs] + [p.grad for p in head.parameters()])
    assert folded.state_dict().keys() == plain.state_dict().keys()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ecanet_outputs():
    torch.manual_seed(0)
    net = ECANet("mit_nano", num_classes=5).eval()
    assert net.num_classes == 5 and net.feature_dim == 128 and net.stride == 16
    assert net.attn_proj.in_channels == 2 * 4
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = net(x)
        feats, attns = net.backbone.forward_with_attn(x, last_n=2)
        cls_ref = net.classifier(F.adaptive_max_pool2d(feats[-1], 1)).flatten(1)
        cam_ref = torch.relu(net.classifier(feats[-1]))
        cat = torch.cat(attns, 1)
        aff_ref = torch.sigmoid(net.attn_proj(cat + cat.transpose(-1, -2)))[:, 0]
        seg_ref = net.decoder(feats)
        cam_only = net.forward_cam(x)
        seg_only = net.forward_seg(x)
        light = net(x, with_seg=False, with_aff=False)
    assert out.cls_logits.shape == (2, 4)
    assert out.features.shape == (2, 128, 4, 6)
    assert out.cams.shape == (2, 4, 4, 6)
    assert out.seg_logits is not None and out.seg_logits.shape == (2, 5, 16, 24)
    assert out.aff_pred is not None and out.aff_pred.shape == (2, 24, 24)
    torch.testing.assert_close(out.cls_logits, cls_ref)
    torch.testing.assert_close(out.cams, cam_ref)
    torch.testing.assert_close(out.aff_pred, aff_ref)
    torch.testing.assert_close(out.seg_logits, seg_ref)
    torch.testing.assert_close(cam_only, out.cams, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seg_only, out.seg_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aff_pred, out.aff_pred.transpose(1, 2), atol=1e-6, rtol=0)
    assert bool(((out.aff_pred > 0) & (out.aff_pred < 1)).all())
    assert light.seg_logits is None and light.aff_pred is None
    torch.testing.assert_close(light.cls_logits, out.cls_logits, atol=1e-5, rtol=1e-5)


def test_ecanet_gradients_reach_all_heads():
    net = ECANet("mit_nano", num_classes=3)
    out = net(torch.randn(1, 3, 32, 32))
    assert out.seg_logits is not None and out.aff_pred is not None
    (out.cls_logits.sum() + out.seg_logits.mean() + out.aff_pred.mean()).backward()
    for m in (net.classifier, net.attn_proj, net.decoder.linear_pred, net.backbone.block4[1].attn.q):
        assert m.weight.grad is not None and bool(m.weight.grad.abs().sum() > 0)


def test_param_groups_cover_parameters_once():
    net = ECANet("mit_nano", num_classes=4)
    net.backbone.patch_embed1.proj.weight.requires_grad_(False)
    groups = net.param_groups(6e-5, 0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    by_name = {g["name"]: g for g in groups}
    heads = {id(p) for m in (net.classifier, net.attn_proj, net.decoder) for p in m.parameters()}
    assert {id(p) for p in by_name["heads"]["params"]} == heads
    assert by_name["heads"]["lr"] == pytest.approx(6e-4) and by_name["heads"]["weight_decay"] == 0.01
    assert by_name["backbone"]["lr"] == 6e-5 and by_name["backbone"]["weight_decay"] == 0.01
    # AFA's get_param_groups: "norm" in the name -> lr 0, no decay; every other backbone parameter
    # (biases included) -> lr, weight decay
    names = {id(p): n for n, p in net.backbone.named_parameters() if p.requires_grad}
    norm_ids = {i for i, n in names.items() if "norm" in n}
    assert {id(p) for p in by_name["backbone_norm"]["params"]} == norm_ids
    assert {id(p) for p in by_name["backbone"]["params"]} == set(names) - norm_ids
    assert by_name["backbone_norm"]["lr"] == 0.0 and by_name["backbone_norm"]["weight_decay"] == 0.0
    assert any(p.ndim == 1 for p in by_name["backbone"]["params"])  # biases keep their weight decay
    assert id(net.backbone.norm4.weight) in norm_ids and id(net.backbone.block1[0].norm1.bias) in norm_ids
    torch.optim.AdamW(groups, lr=6e-5)  # accepted by torch as is
    # ecaseg 0.1's groups stay reachable
    old = {
        g["name"]: g
        for g in net.param_groups(6e-5, 0.01, backbone_norm_lr_mult=1.0, decay_groups="no_bias_decay")
    }
    assert old["backbone_no_decay"]["weight_decay"] == 0.0 and old["backbone_no_decay"]["lr"] == 6e-5
    assert all(p.ndim <= 1 for p in old["backbone_no_decay"]["params"])
    assert all(p.ndim >= 2 for p in old["backbone"]["params"])


def test_ecanet_with_weights_and_bad_config(tmp_path):
    path = tmp_path / "nano.pth"
    ref = mit_nano()
    torch.save({"state_dict": ref.state_dict()}, path)
    net = ECANet("mit_nano", num_classes=3, backbone_weights=path)
    assert torch.equal(net.backbone.block4[0].attn.kv.weight, ref.block4[0].attn.kv.weight)
    with pytest.raises(ConfigError, match="attn_blocks"):
        ECANet("mit_nano", num_classes=3, attn_blocks=3)
    with pytest.raises(ConfigError, match="num_classes"):
        ECANet("mit_nano", num_classes=1)


def test_ecanet_bf16_autocast_keeps_affinity_in_float32():
    torch.manual_seed(0)
    net = ECANet("mit_nano", num_classes=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(1, 3, 32, 32))
    assert out.aff_pred is not None and out.aff_pred.dtype == torch.float32
    assert bool(torch.isfinite(out.cls_logits.float()).all()) and bool(torch.isfinite(out.aff_pred).all())
