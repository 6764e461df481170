"""Loading the official SegFormer (MiT) ImageNet encoders: NVlabs ``.pth`` files and Hugging Face folders.

Two layouts of the same weights are accepted:

* **NVlabs** (``mit_b1.pth`` from the SegFormer release): a plain state dict whose names are those of
  :class:`ecaseg.models.mit.MixVisionTransformer` (``patch_embed1.proj.weight``, ``block1.0.attn.q.weight``,
  ``block1.0.attn.kv.weight``, ``norm1.weight``...) plus the ImageNet classifier ``head.*``, which is dropped.
* **Hugging Face** (``nvidia/mit-b1``): a folder with ``config.json`` and ``model.safetensors`` (or
  ``pytorch_model.bin``) holding ``segformer.encoder.*`` names; :func:`hf_to_nvlabs` renames them and
  concatenates the separate ``key`` and ``value`` projections into ``kv`` (keys first). The ImageNet
  ``classifier.*`` is dropped.

Checkpoints wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` and names prefixed by ``module.``,
``backbone.`` or ``segformer.`` are accepted; ``decode_head.*`` / ``auxiliary_head.*`` of a segmentation
checkpoint are dropped like the classifiers. Everything else is strict: a missing or unexpected encoder key or
a shape mismatch raises :class:`~ecaseg.errors.CheckpointError` listing all of them. There is never a silent
fallback to random weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ecaseg.errors import CheckpointError
from ecaseg.utils.io import weights_file_problem

__all__ = [
    "IGNORED_PREFIXES",
    "convert_mit_state_dict",
    "hf_to_nvlabs",
    "is_hf_layout",
    "load_mit_weights",
    "nvlabs_to_hf",
    "read_checkpoint",
]

#: Key prefixes of heads that are not part of the encoder and are dropped when loading it.
IGNORED_PREFIXES: tuple[str, ...] = ("head.", "classifier.", "decode_head.", "auxiliary_head.")
_WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "backbone.", "segformer.")
_HF_WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")

# Hugging Face suffix inside ``encoder.block.{i}.{j}.`` -> NVlabs suffix inside ``block{i+1}.{j}.``.
_HF_BLOCK_MAP: dict[str, str] = {
    "layer_norm_1": "norm1",
    "attention.self.query": "attn.q",
    "attention.self.sr": "attn.sr",
    "attention.self.layer_norm": "attn.norm",
    "attention.output.dense": "attn.proj",
    "layer_norm_2": "norm2",
    "mlp.dense1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    "mlp.dense2": "mlp.fc2",
}
_NV_BLOCK_MAP: dict[str, str] = {v: k for k, v in _HF_BLOCK_MAP.items()}

_HF_EMBED = re.compile(r"^encoder\.patch_embeddings\.(\d+)\.(proj|layer_norm)\.(weight|bias)$")
_HF_STAGE_NORM = re.compile(r"^encoder\.layer_norm\.(\d+)\.(weight|bias)$")
_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(\d+)\.(.+)\.(weight|bias)$")
_NV_EMBED = re.compile(r"^patch_embed(\d)\.(proj|norm)\.(weight|bias)$")
_NV_STAGE_NORM = re.compile(r"^norm(\d)\.(weight|bias)$")
_NV_BLOCK = re.compile(r"^block(\d)\.(\d+)\.(.+)\.(weight|bias)$")


def _strip_prefixes(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, val in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = val
    return out


def is_hf_layout(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict uses Hugging Face ``SegformerModel`` names (``encoder.patch_embeddings...``).

    Example:
        >>> is_hf_layout({"segformer.encoder.patch_embeddings.0.proj.weight": None})
        True
        >>> is_hf_layout({"patch_embed1.proj.weight": None})
        False
    """
    return any(".patch_embeddings." in f".{k}" or "encoder.block." in k for k in state_dict)


def hf_to_nvlabs(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a Hugging Face Segformer state dict to NVlabs names.

    ``encoder.patch_embeddings.{i}.proj|layer_norm`` -> ``patch_embed{i+1}.proj|norm``,
    ``encoder.block.{i}.{j}.*`` -> ``block{i+1}.{j}.*`` (see the table in the docs),
    ``encoder.layer_norm.{i}`` -> ``norm{i+1}``; ``attention.self.key`` and ``attention.self.value`` are
    concatenated along the output dimension into ``attn.kv`` (keys first, as the NVlabs ``kv`` layer splits
    its output). Names that match no rule are kept unchanged (so the strict loader reports them).

    Args:
        state_dict: Hugging Face names, with or without the ``segformer.`` prefix.

    Returns:
        ``(converted, missing)`` where ``missing`` lists Hugging Face names whose partner is absent
        (a ``key`` without its ``value`` or the reverse).

    Example:
        >>> sd = {"encoder.block.0.0.attention.self.key.bias": torch.zeros(2),
        ...       "encoder.block.0.0.attention.self.value.bias": torch.ones(2)}
        >>> hf_to_nvlabs(sd)[0]["block1.0.attn.kv.bias"].tolist()
        [0.0, 0.0, 1.0, 1.0]
    """
    out: dict[str, Tensor] = {}
    kv_parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, val in _strip_prefixes(state_dict).items():
        if m := _HF_EMBED.match(key):
            part = "norm" if m[2] == "layer_norm" else "proj"
            out[f"patch_embed{int(m[1]) + 1}.{part}.{m[3]}"] = val
        elif m := _HF_STAGE_NORM.match(key):
            out[f"norm{int(m[1]) + 1}.{m[2]}"] = val
        elif (m := _HF_BLOCK.match(key)) and m[3] in ("attention.self.key", "attention.self.value"):
            prefix = f"block{int(m[1]) + 1}.{m[2]}.attn.kv.{m[4]}"
            kv_parts.setdefault((prefix, key.rsplit(".", 2)[0]), {})[m[3].rsplit(".", 1)[1]] = val
        elif (m := _HF_BLOCK.match(key)) and m[3] in _HF_BLOCK_MAP:
            out[f"block{int(m[1]) + 1}.{m[2]}.{_HF_BLOCK_MAP[m[3]]}.{m[4]}"] = val
        else:
            out[key] = val
    missing: list[str] = []
    for (nv_key, hf_stem), parts in kv_parts.items():
        param = nv_key.rsplit(".", 1)[1]
        if "key" in parts and "value" in parts:
            out[nv_key] = torch.cat([parts["key"], parts["value"]], dim=0)
        else:
            absent = "value" if "key" in parts else "key"
            missing.append(f"{hf_stem}.{absent}.{param}")
    return out, missing


def nvlabs_to_hf(state_dict: Mapping[str, Tensor], prefix: str = "segformer.") -> dict[str, Tensor]:
    """Rename an NVlabs MiT state dict to Hugging Face names (inverse of :func:`hf_to_nvlabs`).

    ``attn.kv`` is split in halves into ``attention.self.key`` and ``attention.self.value``; ``head.*``
    becomes ``classifier.*`` (without ``prefix``); other names are kept.

    Args:
        state_dict: NVlabs names.
        prefix: Prepended to the encoder names (``"segformer."`` as in ``SegformerForImageClassification``).

    Returns:
        The renamed state dict.

    Example:
        >>> hf = nvlabs_to_hf({"block4.1.attn.kv.weight": torch.zeros(4, 2)}, prefix="")
        >>> {k: tuple(v.shape) for k, v in hf.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'encoder.block.3.1.attention.self.key.weight': (2, 2),
         'encoder.block.3.1.attention.self.value.weight': (2, 2)}
    """
    out: dict[str, Tensor] = {}
    for key, val in state_dict.items():
        if m := _NV_EMBED.match(key):
            part = "layer_norm" if m[2] == "norm" else "proj"
            out[f"{prefix}encoder.patch_embeddings.{int(m[1]) - 1}.{part}.{m[3]}"] = val
        elif m := _NV_STAGE_NORM.match(key):
            out[f"{prefix}encoder.layer_norm.{int(m[1]) - 1}.{m[2]}"] = val
        elif (m := _NV_BLOCK.match(key)) and m[3] == "attn.kv":
            stem = f"{prefix}encoder.block.{int(m[1]) - 1}.{m[2]}.attention.self"
            k, v = val.chunk(2, dim=0)
            out[f"{stem}.key.{m[4]}"] = k.clone()
            out[f"{stem}.value.{m[4]}"] = v.clone()
        elif (m := _NV_BLOCK.match(key)) and m[3] in _NV_BLOCK_MAP:
            out[f"{prefix}encoder.block.{int(m[1]) - 1}.{m[2]}.{_NV_BLOCK_MAP[m[3]]}.{m[4]}"] = val
        elif key.startswith("head."):
            out["classifier." + key[len("head.") :]] = val
        else:
            out[key] = val
    return out


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    while isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
        else:
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj)}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(sorted(bad)[:20])}")
    return {str(k): v for k, v in obj.items()}


def _load_file(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure becomes a user-facing error naming the file
        raise CheckpointError(
            weights_file_problem(path, exc, "backbone weights are MiT ImageNet weights (a state dict file)")
        ) from exc
    return _unwrap(obj, path)


def read_checkpoint(path: str | PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Read a checkpoint file or a Hugging Face model folder into a flat state dict on the CPU.

    Args:
        path: A ``.pth``/``.pt``/``.bin`` file (``torch.load`` with ``weights_only=True``), a
            ``.safetensors`` file, or a folder holding ``model.safetensors`` or ``pytorch_model.bin`` and
            optionally ``config.json``.

    Returns:
        ``(state_dict, config)`` where ``config`` is the parsed ``config.json`` of a folder, else ``None``.

    Raises:
        CheckpointError: The path does not exist, holds no weight file, or cannot be read.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_dir():
        return _load_file(p), None
    config: dict[str, Any] | None = None
    cfg_path = p / "config.json"
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {cfg_path}: {exc}") from exc
    for name in _HF_WEIGHT_FILES:
        if (p / name).is_file():
            return _load_file(p / name), config
    raise CheckpointError(f"{p}: a Hugging Face model folder must hold one of {', '.join(_HF_WEIGHT_FILES)}")


def convert_mit_state_dict(
    state_dict: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Bring an NVlabs or Hugging Face MiT state dict to NVlabs encoder names.

    Args:
        state_dict: Raw checkpoint entries (wrappers already removed).

    Returns:
        ``(encoder_state, ignored, missing)``: the encoder entries, the dropped head names
        (:data:`IGNORED_PREFIXES`), and names missing from an incomplete Hugging Face key/value pair.
    """
    sd = _strip_prefixes(state_dict)
    missing: list[str] = []
    if is_hf_layout(sd):
        sd, missing = hf_to_nvlabs(sd)
    ignored = sorted(k for k in sd if k.startswith(IGNORED_PREFIXES))
    return {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}, ignored, missing


def _check_hf_config(model: nn.Module, config: Mapping[str, Any], where: str) -> None:
    fields = {
        "hidden_sizes": "embed_dims",
        "depths": "depths",
        "num_attention_heads": "num_heads",
        "sr_ratios": "sr_ratios",
        "patch_sizes": "patch_sizes",
    }
    problems = []
    for hf_name, attr in fields.items():
        if hf_name in config and hasattr(model, attr):
            want, got = list(getattr(model, attr)), list(config[hf_name])
            if want != got:
                problems.append(f"{hf_name}={got} (model {attr}={want})")
    if problems:
        raise CheckpointError(f"{where}/config.json does not match the model: " + "; ".join(problems))


def load_mit_weights(model: nn.Module, path: str | PathLike[str]) -> list[str]:
    """Load official MiT ImageNet weights into ``model`` strictly (NVlabs ``.pth`` or Hugging Face folder).

    Args:
        model: A :class:`~ecaseg.models.mit.MixVisionTransformer` (or any module with NVlabs MiT names).
        path: Checkpoint file or Hugging Face folder, see
            :func:`~ecaseg.models.checkpoints.read_checkpoint`.

    Returns:
        The checkpoint names that were dropped as non-encoder heads (e.g. ``head.weight``).

    Raises:
        CheckpointError: Missing file, unreadable file, a ``config.json`` describing another architecture,
            or any missing / unexpected key or shape mismatch (all listed in the message).
    """
    sd, config = read_checkpoint(path)
    if config is not None:
        _check_hf_config(model, config, str(path))
    enc, ignored, missing_pairs = convert_mit_state_dict(sd)
    own = model.state_dict()
    missing = sorted(set(own) - set(enc)) + missing_pairs
    unexpected = sorted(set(enc) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sorted(enc.items())
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {path} does not match {type(model).__name__}:"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(enc, strict=True)
    return ignored
