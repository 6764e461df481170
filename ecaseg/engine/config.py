"""Typed experiment configuration: YAML files in ``ecaseg/configs`` plus ``key=value`` overrides.

A config is a tree of dataclasses (:class:`Config`). :func:`load_config` reads a packaged config by name
(``voc``, ``coco``, ``synthetic``, ...) or a YAML file by path, merges it onto the defaults and applies
command-line overrides such as ``train.max_iters=100`` or ``method.k=0.15``. Unknown keys and invalid values
raise :class:`~ecaseg.errors.ConfigError` listing the valid choices.
"""

from __future__ import annotations

import math
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import torch
import yaml

from ecaseg.errors import ConfigError
from ecaseg.utils.io import read_text_utf8

__all__ = [
    "ADDED_IN_0_2",
    "LEGACY_KEYS",
    "RANGES",
    "Config",
    "DataConfig",
    "EvalConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "available_configs",
    "available_devices",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "resolve_device",
]


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented.

    ``dataset`` selects the reader: ``voc`` (VOC 2012 + SBD under ``root``), ``coco`` (COCO 2014 under
    ``root``), ``folder`` (``images_dir`` + ``labels_file`` [+ ``masks_dir``]) or ``synthetic`` (the
    embedded benchmark, generated in memory from ``synthetic_*`` fields).

    Folder datasets: the class names come from ``class_names``, else ``classes_file``, else a
    ``classes.txt`` beside the labels file, else the VOC classes. ``val_split`` is either a separate
    ``val_labels_file`` or, without one, the held-out ``val_fraction`` of the labelled images (drawn with
    ``train.seed``; ``train_split`` is then the rest). ``val_images_dir`` and ``val_masks_dir`` give the val
    split its own folders (e.g. training on a folder of pseudo-label PNGs in ``masks_dir`` and evaluating on
    the ground truth); empty means the training folders.
    """

    dataset: Literal["voc", "coco", "folder", "synthetic"] = "voc"
    root: str = ""
    train_split: str = "train_aug"
    val_split: str = "val"
    images_dir: str = ""
    labels_file: str = ""
    masks_dir: str = ""
    class_names: tuple[str, ...] = ()
    classes_file: str = ""
    val_labels_file: str = ""
    val_images_dir: str = ""
    val_masks_dir: str = ""
    val_fraction: float = 0.1
    cache_dir: str = ""
    crop_size: int = 512
    resize_long: tuple[int, int] = (512, 2048)
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    num_workers: int = 4
    val_max_images: int = 0
    synthetic_seed: int = 0
    synthetic_image_size: int = 128
    synthetic_num_classes: int = 5
    synthetic_num_train: int = 400
    synthetic_num_val: int = 100
    synthetic_context_prob: float = 0.4
    synthetic_spurious_context_prob: float = 0.3


@dataclass
class ModelConfig:
    """Segmentation network (MiT + SegFormer head) and frozen affinity ViT."""

    backbone: str = "mit_b1"
    backbone_weights: str = ""
    decoder_dim: int = 256
    strides: tuple[int, int, int, int] = (4, 2, 2, 1)
    attn_blocks: int = 2
    dino: str = "dino_vits8"
    dino_weights: str = ""
    dino_allow_random_init: bool = False
    allow_random_backbone: bool = False


@dataclass
class MethodConfig:
    """ECA's hyper-parameters (Section 3, 4.1) and the Table 4 switches."""

    k: float = 0.3
    gamma: float = 0.15
    momentum: float = 0.9
    calibrate: bool = True
    fg_cue: Literal["cls", "contrast", "none"] = "cls"
    alpha: float = 0.5
    band: tuple[float, float] = (0.35, 0.55)
    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5)
    cam_flip: bool = True
    #: multi-scale CAM rule: ``"afa"`` (AFA's multi_scale_cam: resize, flip maximum, ReLU, sum, min-max, at
    #: the image size) or ``"sum"`` (ecaseg 0.1: ReLU at the CAM grid, flips and scales summed)
    cam_rule: Literal["afa", "sum"] = "afa"
    #: what PAR refines: ``"softmax"`` of [background threshold, labelled CAMs] (AFA) or ``"scores"`` (0.1)
    par_input: Literal["softmax", "scores"] = "softmax"
    #: the CAM segmentation label: ``"alpha"`` (ECA's hard threshold), ``"band"`` (AFA's uncertain band) or
    #: ``"afa_rw"`` (AFA's baseline: the band label until ``rw_switch_iter``, then the CAM propagated on the
    #: predicted affinity and refined by PAR, as AFA's released training script)
    cam_seg_label: Literal["alpha", "band", "afa_rw"] = "alpha"
    #: AFA's switch iteration to the propagated labels (6000 of 20k on VOC, 15000 of 80k on COCO)
    rw_switch_iter: int = 6000
    lambda_seg: float = 0.1
    lambda_cce: float = 0.1
    lambda_aff: float = 0.1
    use_cam_seg: bool = True
    use_carm_seg: bool = True
    use_cce: bool = True
    aff_source: Literal["carm", "cam", "none"] = "carm"
    carm_background: Literal["alpha", "map"] = "alpha"
    fully_supervised: bool = False
    local_views: int = 2
    local_size: int = 256
    cce_max_patches: int = 256
    aff_radius: int = 8
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    par_iters: int = 10
    par_w1: float = 0.3
    par_w2: float = 0.01
    par_downsample: int = 2
    compact_par: bool = True
    #: reuse the training forward's CAM as the unflipped scale-1.0 pass of the multi-scale CAM: ``"auto"``
    #: when that is the same computation (no active dropout, drop-path or batch statistics in the
    #: backbone), ``"always"`` (with drop-path it is then another stochastic sample of the same map; see
    #: docs/choices.rst) or ``"never"``
    reuse_train_cam: Literal["auto", "always", "never"] = "auto"


@dataclass
class OptimConfig:
    """AdamW with poly decay and linear warm-up (REFERENCE.md)."""

    lr: float = 6e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    #: learning-rate factor of the classifier, affinity projection and decoder (10 in AFA)
    head_lr_mult: float = 10.0
    #: learning-rate factor of the backbone norm layers (0.0 in AFA, frozen)
    backbone_norm_lr_mult: float = 0.0
    #: ``"afa"``: backbone norms (``"norm"`` in the name) without weight decay, everything else of the
    #: backbone (biases included) with it (AFA's ``get_param_groups``); ``"no_bias_decay"``: ecaseg 0.1's
    #: groups (no decay on any 1-d backbone parameter, i.e. norms and biases, which take
    #: ``backbone_norm_lr_mult``)
    decay_groups: Literal["afa", "no_bias_decay"] = "afa"
    #: ``torch.optim.AdamW(fused=True)``: one kernel for all parameters instead of the default ``foreach``
    #: implementation's few dozen multi-tensor kernels per step (faster on CUDA). Same update rule; the
    #: arithmetic is ordered differently, so the weights differ from foreach's in the last bits
    #: (``tests/test_trainer.py`` bounds it), which is why it is an option and not the default
    fused: bool = False


@dataclass
class TrainConfig:
    """Schedule, logging and checkpointing.

    ``batch_size`` is the global batch (the paper's 8), divided evenly over the processes of a
    ``torchrun`` job (a clear error when it does not divide). ``amp``: ``"none"`` (fp32, as the paper and
    AFA train) or ``"bf16"`` autocast on CUDA (faster; the CARM anchors stay in fp32 either way).
    """

    max_iters: int = 18000
    batch_size: int = 8
    cls_warmup_iters: int = 2000
    seed: int = 0
    log_interval: int = 50
    val_interval: int = 2000
    ckpt_interval: int = 2000
    amp: Literal["bf16", "none"] = "none"
    device: str = "auto"
    #: ``torch.compile`` the training forward and the training step's PAR (fixed PAR slot sizes,
    #: :func:`ecaseg.engine.pseudo.par_slots`, so that it compiles a few times only); validation stays eager
    compile: bool = False
    #: TF32 for the fp32 matrix products and convolutions on CUDA (Ampere and later): their inputs are
    #: rounded to a 10-bit mantissa (fp32 range, fp32 accumulation; about 1e-3 relative error per product,
    #: elementwise ops, reductions and softmax unchanged). Off: torch's defaults (IEEE fp32 matrix
    #: products, which is most of the MiT backbone; cuDNN convolutions are allowed TF32 by torch already)
    tf32: bool = False
    channels_last: bool = False
    tensorboard: bool = True
    num_vis_images: int = 4


@dataclass
class EvalConfig:
    """The inference protocol (the paper's Sec. 4.1: "following the common practice in WSSS, multi-scale
    inference and CRF"; the defaults are AFA's released ``test_msc_flip.py``).

    ``ecaseg evaluate`` and ``ecaseg predict`` run the protocol of the checkpoint's config (or of
    ``--config``); their flags override single keys. ``ecaseg demo`` evaluates every model with it and
    once more single-scale without flip and CRF.

    Attributes:
        scales: input scale factors (AFA: 1.0, 0.5, 0.75).
        merge: ``"max"``: flip-averaged logits, element-wise maximum over scales (AFA); ``"mean"``: softmax
            probabilities averaged over scales and flips (ecaseg 0.1).
        resize_long: resize the long side of each image to this before inference (AFA: 512); 0 keeps it.
        flip: add horizontally flipped inputs.
        crf: dense CRF on the merged probabilities (AFA's parameters, :class:`ecaseg.crf.CRFParams`).
        crf_backend: how the dense CRF runs: ``"torch"`` (tensor ops on the evaluation device),
            ``"pydensecrf"`` (the C++ library on the CPU, ``pip install ecaseg[pydensecrf]``) or ``"auto"``
            (torch on CUDA; on the CPU pydensecrf when installed, else torch); see :mod:`ecaseg.crf`.
        crf_workers: pydensecrf worker processes (0: as many as the cores available; 1: in-process); the
            torch backend runs in-process.
        batch_size: images of one size per forward (:func:`ecaseg.engine.inference.predict_batched`; 0: 8
            on a GPU, 1 on the CPU); the figures do not depend on it.
    """

    scales: tuple[float, ...] = (1.0, 0.5, 0.75)
    merge: Literal["max", "mean"] = "max"
    resize_long: int = 512
    flip: bool = True
    crf: bool = True
    crf_backend: Literal["torch", "pydensecrf", "auto"] = "auto"
    crf_workers: int = 0
    batch_size: int = 0


@dataclass
class Config:
    """The whole experiment configuration."""

    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        """Check every numeric key against :data:`RANGES` and the rules that tie keys together; returns
        ``self``. Raises :class:`~ecaseg.errors.ConfigError` naming the key, its value and the valid range."""
        for key, (low, high, low_open, high_open) in RANGES.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            for v in value if isinstance(value, tuple) else (value,):
                _check_range(key, value, v, low, high, low_open, high_open)
        m, d, t = self.method, self.data, self.train
        checks: list[tuple[bool, str]] = [
            (m.band[0] < m.band[1], f"method.band must satisfy low < high, got {list(m.band)}"),
            (len(m.cam_scales) > 0, "method.cam_scales must not be empty"),
            (len(m.par_dilations) > 0, "method.par_dilations must not be empty (e.g. [1, 2, 4, 8, 12, 24])"),
            (len(self.eval.scales) > 0, "eval.scales must not be empty (e.g. [1.0, 0.5, 0.75])"),
            (
                d.resize_long[0] <= d.resize_long[1],
                f"data.resize_long must be [low, high] with low <= high, got {list(d.resize_long)}",
            ),
            (
                d.scale_range[0] <= d.scale_range[1],
                f"data.scale_range must be [low, high] with low <= high, got {list(d.scale_range)}",
            ),
            (d.crop_size % 16 == 0, f"data.crop_size must be a multiple of 16, got {d.crop_size}"),
            (
                m.local_size % 16 == 0 and m.local_size <= d.crop_size,
                f"method.local_size must be a multiple of 16 and <= data.crop_size, got {m.local_size}",
            ),
            (
                d.crop_size * min(m.cam_scales, default=1.0) >= 16,
                f"method.cam_scales {list(m.cam_scales)} shrink the data.crop_size={d.crop_size} crops below "
                "16 pixels (one cell of the feature map); use scales >= "
                f"{16 / max(d.crop_size, 1):.3g}",
            ),
            (
                t.device == "auto" or _valid_device(t.device),
                f"train.device {t.device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def _check_range(
    key: str, value: Any, v: float, low: float, high: float, low_open: bool, high_open: bool
) -> None:
    if math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high):
        return
    if high == math.inf:
        rule = f"{'>' if low_open else '>='} {low:g}"
    else:
        rule = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, tuple):
        raise ConfigError(f"{key} must hold finite values {rule}, got {list(value)}")
    number = "a finite number " if isinstance(value, float) and high == math.inf else ""
    raise ConfigError(f"{key} must be {number}{rule}, got {value}")


_INF = math.inf

#: The valid range of every numeric config key (of each item of a list key): ``key -> (low, high,
#: low_open, high_open)``. One table, checked by :meth:`Config.validate` whenever a config is loaded or
#: restored; a test checks that every int and float key of the dataclasses is listed.
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "data.val_fraction": (0.0, 1.0, False, True),
    "data.crop_size": (16, _INF, False, False),
    "data.resize_long": (16, _INF, False, False),
    "data.scale_range": (0.0, 16.0, True, False),
    "data.num_workers": (0, _INF, False, False),
    "data.val_max_images": (0, _INF, False, False),
    "data.synthetic_seed": (0, _INF, False, False),
    "data.synthetic_image_size": (32, _INF, False, False),
    "data.synthetic_num_classes": (1, _INF, False, False),
    "data.synthetic_num_train": (1, _INF, False, False),
    "data.synthetic_num_val": (1, _INF, False, False),
    "data.synthetic_context_prob": (0.0, 1.0, False, False),
    "data.synthetic_spurious_context_prob": (0.0, 1.0, False, False),
    "model.decoder_dim": (1, _INF, False, False),
    "model.strides": (1, _INF, False, False),
    "model.attn_blocks": (1, _INF, False, False),
    "method.k": (0.0, 1.0, True, False),
    "method.gamma": (-1.0, 1.0, False, True),
    "method.momentum": (0.0, 1.0, False, True),
    "method.alpha": (0.0, 1.0, True, True),
    "method.band": (0.0, 1.0, False, False),
    "method.cam_scales": (0.0, 4.0, True, False),
    "method.rw_switch_iter": (0, _INF, False, False),
    "method.lambda_seg": (0.0, _INF, False, True),
    "method.lambda_cce": (0.0, _INF, False, True),
    "method.lambda_aff": (0.0, _INF, False, True),
    "method.local_views": (1, _INF, False, False),
    "method.local_size": (16, _INF, False, False),
    "method.cce_max_patches": (2, _INF, False, False),
    "method.aff_radius": (1, _INF, False, False),
    "method.par_dilations": (1, _INF, False, False),
    "method.par_iters": (0, _INF, False, False),
    "method.par_w1": (0.0, _INF, True, True),
    "method.par_w2": (0.0, _INF, False, True),
    "method.par_downsample": (1, _INF, False, False),
    "optim.lr": (0.0, _INF, True, True),
    "optim.betas": (0.0, 1.0, False, True),
    "optim.weight_decay": (0.0, _INF, False, True),
    "optim.warmup_iters": (0, _INF, False, False),
    "optim.warmup_ratio": (0.0, 1.0, False, False),
    "optim.power": (0.0, _INF, False, True),
    "optim.head_lr_mult": (0.0, _INF, False, True),
    "optim.backbone_norm_lr_mult": (0.0, _INF, False, True),
    "train.max_iters": (1, _INF, False, False),
    "train.batch_size": (1, _INF, False, False),
    "train.cls_warmup_iters": (0, _INF, False, False),
    "train.seed": (0, _INF, False, False),
    "train.log_interval": (1, _INF, False, False),
    "train.val_interval": (0, _INF, False, False),
    "train.ckpt_interval": (0, _INF, False, False),
    "train.num_vis_images": (0, _INF, False, False),
    "eval.scales": (0.0, 4.0, True, False),
    "eval.resize_long": (0, _INF, False, False),
    "eval.crf_workers": (0, _INF, False, False),
    "eval.batch_size": (0, _INF, False, False),
}


def available_devices() -> list[str]:
    """The device types torch reports usable here: ``cpu``, then ``cuda`` / ``mps`` / ``xpu`` if available."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found.append("xpu")
    return found


def resolve_device(name: str, what: str) -> torch.device:
    """The torch device of ``name`` (``"auto"``: CUDA if available, else the CPU), refused with a
    :class:`~ecaseg.errors.ConfigError` naming ``what`` unless torch reports it as available here.

    Example:
        >>> resolve_device("cpu", "--device")
        device(type='cpu')
        >>> resolve_device("meta", "--device")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ecaseg.errors.ConfigError: --device meta is not available here (available: cpu...
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{what} {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    usable = available_devices()
    if device.type == "cuda" and "cuda" not in usable:
        raise ConfigError(f"{what} {name} but no CUDA device is visible; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"{what} {name} but only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0 ...)"
        )
    if device.type not in usable:
        raise ConfigError(
            f"{what} {name} is not available here (available: {', '.join(usable)}; auto picks cuda, else cpu)"
        )
    return device


def _valid_device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


_SECTIONS = ("data", "model", "method", "optim", "train", "eval")


def available_configs() -> list[str]:
    """Names of the configs shipped in ``ecaseg/configs`` (without ``.yaml``)."""
    folder = resources.files("ecaseg") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a string override) to the annotated type ``tp``."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"invalid value {value!r} for {key}; valid choices: {', '.join(map(str, choices))}"
            )
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"invalid value {value!r} for {key}: " + "; ".join(errors))
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
        if not isinstance(value, list | tuple):
            raise ConfigError(f"invalid value {value!r} for {key}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"invalid value {value!r} for {key}: expected {len(args)} items")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"invalid value {value!r} for {key}: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"invalid value {value!r} for {key}: expected an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid value {value!r} for {key}: expected an integer") from None
        if not as_float.is_integer():
            raise ConfigError(f"invalid value {value!r} for {key}: expected an integer")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"invalid value {value!r} for {key}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid value {value!r} for {key}: expected a number") from None
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, dict | list):
            raise ConfigError(f"invalid value {value!r} for {key}: expected a string")
        return str(value)
    raise ConfigError(f"unsupported type {tp!r} for {key}")


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    valid = [f.name for f in fields(section)]
    for key, value in values.items():
        legacy = LEGACY_KEYS.get(prefix.rstrip("."), {})
        if key in legacy:
            warnings.warn(f"config key {prefix}{key} is ignored: {legacy[key]}", UserWarning, stacklevel=2)
            continue
        if key not in valid:
            raise ConfigError(f"unknown config key {prefix}{key!r}; valid keys: {', '.join(valid)}")
        current = getattr(section, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {prefix}{key} must be a mapping of {', '.join(valid)}")
            _apply(current, value, f"{prefix}{key}.")
        else:
            setattr(section, key, _coerce(value, hints[key], f"{prefix}{key}"))


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    here = path.resolve()
    if here in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(here) :], here))
        raise ConfigError(
            f"config file {path}: its _base_ chain loops back to it ({cycle}); remove one _base_"
        )
    try:
        text = read_text_utf8(path, "config file")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    base = data.pop("_base_", None)
    if base is not None:
        merged = _read_yaml(_locate(str(base), relative_to=path.parent), (*chain, here))
        _deep_update(merged, data)
        return merged
    return data


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = value


def _locate(name_or_path: str, relative_to: Path | None = None) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_absolute() and relative_to is not None and (relative_to / path).exists():
            return relative_to / path
        if path.exists():
            return path
        packaged = resources.files("ecaseg") / "configs" / path.name
        if packaged.is_file():
            return Path(str(packaged))
        raise ConfigError(f"config file {name_or_path} not found")
    packaged = resources.files("ecaseg") / "configs" / f"{name_or_path}.yaml"
    if packaged.is_file():
        return Path(str(packaged))
    raise ConfigError(
        f"unknown config {name_or_path!r}; packaged configs: {', '.join(available_configs())} "
        "(or a .yaml path)"
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"train.max_iters=100"`` into (["train", "max_iters"], "100")."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 and parts != ["name"]:
        raise ConfigError(
            f"override key {key!r} must be section.key with section in {', '.join(sorted(_SECTIONS))}"
        )
    return parts, value.strip()


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a packaged config by name or a YAML file, then apply ``key=value`` overrides.

    Args:
        name_or_path: ``None`` for the defaults, a packaged name (see :func:`available_configs`) or a path
            to a YAML file (which may name a ``_base_`` config to extend).
        overrides: strings like ``"train.max_iters=100"`` or ``"method.cam_scales=[1.0,0.5]"``.

    Returns:
        The validated :class:`Config`.

    Example:
        >>> cfg = load_config("voc", ["train.max_iters=100"])
        >>> cfg.train.max_iters, cfg.method.k
        (100, 0.3)
    """
    cfg = Config()
    if name_or_path:
        path = _locate(name_or_path)
        data = _read_yaml(path)
        if "name" not in data:
            data["name"] = path.stem
        _apply(cfg, data, "")
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``section.key=value`` strings to ``cfg`` in place and validate it; returns ``cfg``."""
    for text in overrides:
        parts, value = parse_override(text)
        if parts == ["name"]:
            cfg.name = value
            continue
        section, key = parts
        if section not in _SECTIONS:
            raise ConfigError(
                f"unknown config section {section!r}; valid sections: {', '.join(sorted(_SECTIONS))}"
            )
        _apply(getattr(cfg, section), {key: yaml.safe_load(value) if value else ""}, f"{section}.")
    return cfg.validate()


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A plain (YAML/JSON-serialisable) dict of ``cfg``, tuples as lists."""

    def convert(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: convert(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [convert(v) for v in obj]
        return obj

    result: dict[str, Any] = convert(asdict(cfg))
    return result


#: Keys of older configs that a checkpoint may still hold (``section -> {key -> reason}``), dropped on load.
LEGACY_KEYS: dict[str, dict[str, str]] = {
    "eval": {
        "msc_scales": "0.1: multi-scale scales; 0.2 runs eval.scales with eval.merge",
        "cam_alpha": "read by nothing (the CAM figures of validation use method.alpha)",
    },
}


#: Keys added in 0.2 whose defaults changed behaviour (AFA's rules), with the value that reproduces 0.1. A
#: checkpoint's config holds every key of its version, so a missing key means the run used 0.1's behaviour.
ADDED_IN_0_2: dict[str, dict[str, Any]] = {
    "method": {"cam_rule": "sum", "par_input": "scores"},
    "eval": {"merge": "mean", "resize_long": 0},
    "optim": {"decay_groups": "no_bias_decay", "backbone_norm_lr_mult": 1.0},
}


def config_from_dict(data: dict[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict` (used to restore a checkpoint's config).

    Keys of :data:`LEGACY_KEYS` (written by older ecaseg versions) are dropped, and a 0.1 config (one
    without the keys of :data:`ADDED_IN_0_2`) gets 0.1's values for them, so an old checkpoint is
    evaluated and resumed with the rules it was trained with.
    """
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for section, keys in LEGACY_KEYS.items():
        if isinstance(data.get(section), dict):
            for key in keys:
                data[section].pop(key, None)
    for section, values in ADDED_IN_0_2.items():
        if isinstance(data.get(section), dict):
            for key, value in values.items():
                data[section].setdefault(key, value)
    cfg = Config()
    _apply(cfg, data, "")
    return cfg.validate()
