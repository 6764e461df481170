"""Config loading, overrides and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecaseg.engine.config import available_configs, config_from_dict, config_to_dict, load_config
from ecaseg.errors import ConfigError


def test_packaged_configs_carry_the_paper_settings() -> None:
    assert {"voc", "coco", "synthetic", "voc_afa", "voc_supervised"} <= set(available_configs())
    voc = load_config("voc")
    assert (voc.train.max_iters, voc.train.batch_size, voc.data.crop_size) == (18000, 8, 512)
    assert (voc.method.k, voc.method.gamma, voc.method.alpha) == (0.3, 0.15, 0.5)
    assert (voc.method.lambda_seg, voc.method.lambda_cce, voc.method.lambda_aff) == (0.1, 0.1, 0.1)
    assert (voc.method.local_size, voc.model.dino, voc.model.backbone) == (256, "dino_vits8", "mit_b1")
    assert voc.train.cls_warmup_iters == 2000
    coco = load_config("coco")
    assert coco.train.max_iters == 80000 and coco.method.k == 0.15
    assert (coco.method.lambda_seg, coco.method.lambda_cce, coco.method.lambda_aff) == (0.1, 0.05, 0.1)
    assert coco.data.dataset == "coco" and coco.name == "coco"
    afa = load_config("voc_afa")
    assert not afa.method.use_carm_seg and not afa.method.use_cce and afa.method.aff_source == "cam"
    assert load_config("voc_supervised").method.fully_supervised
    assert voc.method.fg_cue == "cls" and load_config("synthetic").method.fg_cue == "contrast"


def test_overrides_are_typed() -> None:
    cfg = load_config("voc", ["train.max_iters=100", "method.cam_scales=[1.0,0.5]", "method.use_cce=false"])
    assert cfg.train.max_iters == 100
    assert cfg.method.cam_scales == (1.0, 0.5)
    assert cfg.method.use_cce is False
    cfg = load_config("voc", ["optim.lr=1e-4", "data.resize_long=256,512"])
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.data.resize_long == (256, 512)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("method.kk=1", "valid keys: k, gamma"),
        ("method.aff_source=foo", "valid choices: carm, cam, none"),
        ("method.fg_cue=false", "valid choices: cls, contrast, none"),
        ("train.max_iters=abc", "expected an integer"),
        ("train.max_iters=1.5", "expected an integer"),
        ("method.use_cce=maybe", "expected true or false"),
        ("method.k=1.5", "method.k must be in (0, 1]"),
        ("nosection.k=1", "valid sections"),
        ("train", "must look like section.key=value"),
        ("data.resize_long=[1,2,3]", "expected 2 items"),
    ],
)
def test_invalid_overrides_name_the_problem(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_config("voc", [override])
    assert fragment in str(info.value)


def test_unknown_config_lists_packaged_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="packaged configs: coco"):
        load_config("nope")
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_user_yaml_extends_a_packaged_base(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("_base_: voc.yaml\nmethod:\n  k: 0.1\ntrain:\n  max_iters: 10\n")
    cfg = load_config(str(path))
    assert cfg.name == "mine" and cfg.method.k == 0.1 and cfg.train.max_iters == 10
    assert cfg.method.gamma == 0.15  # inherited


def test_dict_round_trip() -> None:
    cfg = load_config("coco", ["method.band=[0.3,0.6]"])
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg


def test_synthetic_fields_reach_the_generator() -> None:
    from ecaseg.data.synthetic import SyntheticConfig
    from ecaseg.engine.builders import synthetic_config

    defaults = SyntheticConfig()
    built = synthetic_config(load_config("synthetic"))
    # the config's defaults are the generator's (except the split sizes, which the config chooses)
    assert built.context_prob == defaults.context_prob
    assert built.spurious_context_prob == defaults.spurious_context_prob
    overrides = ["data.synthetic_context_prob=0", "data.synthetic_spurious_context_prob=0.5"]
    changed = synthetic_config(load_config("synthetic", overrides))
    assert (changed.context_prob, changed.spurious_context_prob) == (0.0, 0.5)


def test_a_0_1_checkpoint_config_keeps_0_1_behaviour() -> None:
    """0.1 saved every key of its version: missing 0.2 keys mean 0.1's rules, not the new AFA defaults."""
    data = config_to_dict(load_config("voc"))
    added = {"method": ("cam_rule", "par_input"), "eval": ("merge", "resize_long")}
    added["optim"] = ("decay_groups", "backbone_norm_lr_mult")
    for section, keys in added.items():
        for key in keys:
            del data[section][key]
    data["eval"]["msc_scales"] = [0.5, 1.0]  # a 0.1 key
    old = config_from_dict(data)
    assert (old.method.cam_rule, old.method.par_input) == ("sum", "scores")
    assert (old.eval.merge, old.eval.resize_long) == ("mean", 0)
    assert (old.optim.decay_groups, old.optim.backbone_norm_lr_mult) == ("no_bias_decay", 1.0)
    new = config_from_dict(config_to_dict(load_config("voc")))  # a 0.2 checkpoint keeps its values
    assert (new.method.cam_rule, new.eval.merge, new.optim.decay_groups) == ("afa", "max", "afa")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.log_interval=0", "train.log_interval must be >= 1, got 0"),
        ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
        ("method.cam_scales=[0]", "method.cam_scales must hold finite values in (0, 4], got [0.0]"),
        ("data.synthetic_num_train=0", "data.synthetic_num_train must be >= 1, got 0"),
        ("train.device=banana", "train.device 'banana' is not a torch device"),
        ("method.lambda_seg=-0.1", "method.lambda_seg must be a finite number >= 0"),
        ("optim.warmup_iters=-5", "optim.warmup_iters must be >= 0"),
        ("train.ckpt_interval=-1", "train.ckpt_interval must be >= 0"),
        ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
        ("optim.weight_decay=nan", "optim.weight_decay must be a finite number >= 0"),
    ],
)
def test_out_of_range_values_are_refused_at_load(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("synthetic_tiny", [override])
