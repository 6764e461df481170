"""Bring your own CAMs: Grad-CAM maps from ``pytorch-grad-cam`` turned into CARM with ecaseg.

Another method's classifier (here a torchvision ResNet-18 with a multi-label head) gives one Grad-CAM map
per labelled class; ecaseg's ``CARMGenerator`` refines them with a frozen DINO's class-aware affinity.
The steps follow the input contract of docs/byo_cams.rst:

1. one map per *foreground* class, ``[B, num_classes - 1, h, w]``; absent classes all zero;
2. brought to the grid you want the CARM on (here stride 8), **then** min-max normalised per image and
   class (``ecaseg.cam.minmax_normalize``), so every labelled map peaks at 1;
3. labels 0/1, ``[B, num_classes - 1]``; ``num_classes`` counts the background.

Run it (random weights, random images, CPU, offline; ``pip install grad-cam``):

    python examples/gradcam_carm.py

With real data, train the classifier first and use ``DINOAffinity("dino_vits8", weights=...)``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from ecaseg import CARMGenerator, CARMOutput, DINOAffinity
from ecaseg.cam import minmax_normalize


def gradcam_maps(
    model: torch.nn.Module, target_layer: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``[B, C, H, W]`` Grad-CAM maps in ``[0, 1]``: one per labelled class, zeros for absent classes."""
    batch, num_fg = labels.shape
    maps = torch.zeros(batch, num_fg, *images.shape[-2:])
    with GradCAM(model=model, target_layers=[target_layer]) as cam:
        for c in range(num_fg):  # pytorch-grad-cam explains one target per image and call
            images_with_c = labels[:, c].nonzero().flatten().tolist()
            if not images_with_c:
                continue
            targets = [ClassifierOutputTarget(c) for _ in images_with_c]
            grayscale: np.ndarray = cam(input_tensor=images[images_with_c], targets=targets)  # [b, H, W]
            maps[images_with_c, c] = torch.from_numpy(grayscale).float()
    return maps


def carm_from_gradcam(
    images: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.nn.Module,
    dino: DINOAffinity,
    stride: int = 8,
) -> tuple[torch.Tensor, CARMOutput]:
    """Grad-CAM -> contract-conforming CAMs -> CARM. Returns ``(cams, CARMOutput)``."""
    assert isinstance(classifier, torchvision.models.ResNet)
    maps = gradcam_maps(classifier, classifier.layer4[-1], images, labels)
    grid = (images.shape[-2] // stride, images.shape[-1] // stride)
    cams = minmax_normalize(F.adaptive_avg_pool2d(maps, grid))  # resize first, then normalise (contract)
    cams = cams * labels[:, :, None, None]
    sae = CARMGenerator(num_classes=labels.shape[1] + 1, feature_dim=dino.embed_dim)
    return cams, sae(cams, labels, dino(images))


def main(argv: list[str] | None = None) -> CARMOutput:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    num_fg = 4
    classifier = torchvision.models.resnet18(weights=None, num_classes=num_fg).eval()  # yours, trained
    images = torch.randn(2, 3, args.size, args.size)  # ImageNet-normalised images
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    dino = DINOAffinity("vit_nano_p8_synthetic")  # the paper: DINOAffinity("dino_vits8", weights=...)
    cams, out = carm_from_gradcam(images, labels, classifier, dino)
    print(f"Grad-CAM CAMs {tuple(cams.shape)} -> CARM {tuple(out.carm.shape)} (background at index 0)")
    return out


if __name__ == "__main__":
    main()
