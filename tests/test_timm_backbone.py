"""The timm CNN encoder of ECANet (``backbone: timm:<name>``): shapes, attention probe, weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from ecaseg.engine.builders import build_model
from ecaseg.engine.config import load_config
from ecaseg.errors import CheckpointError, ConfigError
from ecaseg.models import ECANet
from ecaseg.models.timm_backbone import TimmBackbone, is_timm_backbone


def _reference_scores(net: TimmBackbone, f4: torch.Tensor) -> torch.Tensor:
    """Loop over images, heads and token pairs: ``S[b, h, i, j] = <q_h(x_i), k_h(x_j)>``."""
    b, _, hh, ww = f4.shape
    heads = net.attn_heads
    w = net.attn_qk.weight.double()
    bias = net.attn_qk.bias.double()
    width = w.shape[0] // 2
    hd = width // heads
    out = torch.zeros(b, heads, hh * ww, hh * ww, dtype=torch.float64)
    for n in range(b):
        tokens = [f4[n, :, i // ww, i % ww].double() for i in range(hh * ww)]
        normed = []
        for t in tokens:  # LayerNorm by hand
            mu, var = t.mean(), t.var(unbiased=False)
            x = (t - mu) / torch.sqrt(var + net.attn_norm.eps)
            normed.append(x * net.attn_norm.weight.double() + net.attn_norm.bias.double())
        qk = [w @ x + bias for x in normed]
        for h in range(heads):
            for i in range(hh * ww):
                q = qk[i][h * hd : (h + 1) * hd]
                for j in range(hh * ww):
                    k = qk[j][width + h * hd : width + (h + 1) * hd]
                    out[n, h, i, j] = q @ k
    return out


def test_prefix() -> None:
    assert is_timm_backbone("timm:test_resnet")
    assert not is_timm_backbone("mit_nano")


def test_four_maps_at_wsss_strides() -> None:
    net = TimmBackbone("test_resnet", output_stride=16).eval()
    feats = net(torch.zeros(2, 3, 96, 128))
    assert [tuple(f.shape[-2:]) for f in feats] == [(24, 32), (12, 16), (6, 8), (6, 8)]
    assert [f.shape[1] for f in feats] == net.embed_dims
    assert net.stride == 16
    net32 = TimmBackbone("test_resnet", output_stride=32).eval()
    assert net32(torch.zeros(1, 3, 64, 64))[-1].shape[-1] == 2


def test_attention_probe_matches_loop_reference() -> None:
    torch.manual_seed(0)
    net = TimmBackbone("test_resnet", attn_heads=3, attn_dim=12).eval()
    with torch.no_grad():
        net.attn_qk.weight.normal_()
        net.attn_norm.weight.uniform_(0.5, 1.5)
        net.attn_norm.bias.normal_()
        feats, attns = net.forward_with_attn(torch.randn(2, 3, 48, 64))
    assert len(attns) == 1 and attns[0].dtype == torch.float32
    ref = _reference_scores(net, feats[-1])
    torch.testing.assert_close(attns[0].double(), ref, rtol=1e-4, atol=1e-3)
    _, none = net.forward_with_attn(torch.randn(1, 3, 32, 32), last_n=0)
    assert none == []
    _, probs = net.forward_with_attn(torch.randn(1, 3, 32, 32), softmax=True)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(1, 3, 4))
    with pytest.raises(ValueError, match="last_n"):
        net.forward_with_attn(torch.zeros(1, 3, 32, 32), last_n=2)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="unknown timm model 'no_such_net'"):
        TimmBackbone("no_such_net")
    assert TimmBackbone("test_resnet.r160_in1k").embed_dims == [32, 48, 192, 96]  # a tagged name
    with pytest.raises(ConfigError, match="output_stride"):
        TimmBackbone("test_resnet", output_stride=4)
    with pytest.raises(ConfigError, match="divisible"):
        TimmBackbone("test_resnet", attn_heads=4, attn_dim=10)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_timm_classification_state_dict(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    source = timm.create_model("test_resnet")  # official key names, random values
    state = source.state_dict()
    path = tmp_path / f"pytorch_model{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    net = TimmBackbone("test_resnet", weights=path)
    loaded = net.body.state_dict()
    for key in ("conv1.0.weight", "layer4.0.conv2.weight", "layer3.0.bn3.running_var"):
        torch.testing.assert_close(loaded[key], state[key])


def test_bad_weight_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing\.pth do not exist"):
        TimmBackbone("test_resnet", weights=tmp_path / "missing.pth")
    state = timm.create_model("test_resnet").state_dict()
    del state["layer2.0.conv1.weight"]
    bad = tmp_path / "truncated.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"truncated\.pth"):
        TimmBackbone("test_resnet", weights=bad)


def test_ecanet_with_timm_backbone() -> None:
    net = ECANet("timm:test_resnet", num_classes=4, attn_blocks=1, decoder_dim=32).eval()
    out = net(torch.zeros(2, 3, 64, 64))
    assert tuple(out.cls_logits.shape) == (2, 3)
    assert tuple(out.features.shape) == (2, 96, 4, 4)
    assert tuple(out.seg_logits.shape) == (2, 4, 16, 16)
    assert out.aff_pred is not None
    torch.testing.assert_close(out.aff_pred, out.aff_pred.transpose(1, 2))
    groups = {g["name"]: g["params"] for g in net.param_groups(1e-3, 0.01)}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == sum(1 for p in net.parameters())
    heads = {id(p) for p in groups["heads"]}
    assert id(net.backbone.attn_qk.weight) in heads and id(net.backbone.attn_norm.weight) in heads
    with pytest.raises(ConfigError, match="attn_blocks"):
        ECANet("timm:test_resnet", num_classes=4, attn_blocks=2)


def test_build_model_loads_or_refuses_timm_weights(tmp_path: Path) -> None:
    base = [
        "model.backbone=timm:test_resnet",
        "model.attn_blocks=1",
        "model.allow_random_backbone=false",
        "model.backbone_weights=",
    ]
    with pytest.raises(ConfigError, match="backbone_weights is empty"):
        build_model(load_config("synthetic", base), num_classes=6)
    missing = tmp_path / "nowhere.bin"
    with pytest.raises(ConfigError, match=r"nowhere\.bin does not exist.*timm model 'test_resnet'"):
        build_model(load_config("synthetic", [*base, f"model.backbone_weights={missing}"]), num_classes=6)
    state = timm.create_model("test_resnet").state_dict()
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    net = build_model(load_config("synthetic", [*base, f"model.backbone_weights={path}"]), num_classes=6)
    torch.testing.assert_close(net.backbone.body.state_dict()["conv1.0.weight"], state["conv1.0.weight"])


def test_synthetic_config_loads_the_packaged_pretrained_encoder() -> None:
    from importlib import resources

    cfg = load_config("synthetic")
    assert cfg.model.backbone_weights == "packaged:test_resnet_synthetic_cls.pth"
    asset = resources.files("ecaseg") / "assets" / "test_resnet_synthetic_cls.pth"
    state = torch.load(str(asset), map_location="cpu", weights_only=True)
    net = build_model(cfg, num_classes=6)
    loaded = net.backbone.body.state_dict()
    assert set(loaded) == set(state)
    for key in ("conv1.0.weight", "layer4.0.bn2.running_mean"):
        torch.testing.assert_close(loaded[key], state[key])
    # pretrained, not a fresh initialisation
    fresh = TimmBackbone("test_resnet").body.state_dict()
    assert not torch.allclose(fresh["conv1.0.weight"], loaded["conv1.0.weight"])
    with pytest.raises(ConfigError, match=r"no packaged weights 'nothing\.pth'"):
        build_model(load_config("synthetic", ["model.backbone_weights=packaged:nothing.pth"]), num_classes=6)
