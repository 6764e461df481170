"""Files shipped inside the package (``ecaseg/assets``): pretrained weights for the synthetic benchmark.

* ``dino_vit_nano_p8_synthetic.pth``: the small affinity ViT, DINO-pretrained on the benchmark's images
  (``DINOAffinity("vit_nano_p8_synthetic")`` loads it).
* ``test_resnet_synthetic_cls.pth``: a timm ``test_resnet`` encoder (no head), classification-pretrained on
  images of benchmark seed 1000 (``model.backbone_weights: packaged:test_resnet_synthetic_cls.pth``).

Use them from your own code with :func:`packaged_asset`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["list_packaged_assets", "packaged_asset"]


def _folder() -> Path:
    return Path(str(resources.files("ecaseg") / "assets"))


def list_packaged_assets() -> list[str]:
    """Names of the files shipped in ``ecaseg/assets``, sorted.

    Example:
        >>> "test_resnet_synthetic_cls.pth" in list_packaged_assets()
        True
    """
    folder = _folder()
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def packaged_asset(name: str) -> Path:
    """Path of a file shipped in ``ecaseg/assets`` (``name`` may carry a ``packaged:`` prefix).

    Args:
        name: File name, e.g. ``"test_resnet_synthetic_cls.pth"``.

    Returns:
        The file's path.

    Raises:
        FileNotFoundError: If no such file ships with this installation (the message lists those that do).

    Example:
        >>> import torch
        >>> state = torch.load(packaged_asset("test_resnet_synthetic_cls.pth"), weights_only=True)
        >>> "conv1.0.weight" in state
        True
    """
    name = name.removeprefix("packaged:")
    path = _folder() / name
    if not name or "/" in name or "\\" in name or not path.is_file():
        raise FileNotFoundError(
            f"no packaged file {name!r} in ecaseg/assets; packaged: {', '.join(list_packaged_assets())}"
        )
    return path
