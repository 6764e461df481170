"""Plug ECA's class-aware affinity (CARM) into another WSSS method's training step.

"Another method" here is a plain single-stage CAM baseline: a small CNN with a CAM classifier and a
segmentation head supervised by CAM pseudo-labels. Adding SAE takes four lines: run the frozen DINO, call
``CARMGenerator`` with the CAMs, turn the CARM into a pseudo-label, add its segmentation loss.

Run it (random weights, random images, CPU is fine):

    python examples/custom_carm_step.py --steps 3

With real data, use ``DINOAffinity("dino_vits8", weights="dino_deitsmall8_pretrain.pth")``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from ecaseg import CARMGenerator, DINOAffinity
from ecaseg.cam import cam_from_features, cam_to_label
from ecaseg.seg_loss import classification_loss, segmentation_loss


class TinyCAMNet(nn.Module):
    """The other method's network: a CNN trunk (stride 8), a CAM classifier and a segmentation head."""

    def __init__(self, num_fg: int, dim: int = 32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, dim, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(dim, num_fg, 1, bias=False)
        self.seg_head = nn.Conv2d(dim, num_fg + 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.trunk(x)
        logits = self.classifier(F.adaptive_max_pool2d(features, 1)).flatten(1)
        return features, logits, self.seg_head(features)


def train_step(
    net: TinyCAMNet,
    dino: DINOAffinity,
    sae: CARMGenerator,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    lambda_carm: float = 0.1,
) -> dict[str, float]:
    """One step of the CAM baseline plus a CARM pseudo-label loss."""
    features, logits, seg = net(images)
    loss_cls = classification_loss(logits, labels)
    with torch.no_grad():
        cams = cam_from_features(features, net.classifier.weight) * labels[:, :, None, None]  # Eq. (1)
        size = images.shape[-2:]
        cam_label = cam_to_label(F.interpolate(cams, size=size, mode="bilinear"), labels, alpha=0.5)
        # --- the ECA part: DINO keys/query -> seeds -> CARM -> calibrated CARM (Eq. 3-10) ---
        dino_out = dino(images)  # keys, class query and patch grid of the same images, together
        carm = sae(cams, labels, dino_out, features).carm  # [B, K, h, w], background at index 0
        carm_label = cam_to_label(F.interpolate(carm[:, 1:], size=size, mode="bilinear"), labels, alpha=0.5)
    loss_seg = segmentation_loss(seg, cam_label)
    loss_carm = segmentation_loss(seg, carm_label)
    loss = loss_cls + 0.1 * loss_seg + lambda_carm * loss_carm
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"cls": loss_cls.item(), "seg_cam": loss_seg.item(), "seg_carm": loss_carm.item()}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    num_fg = 4
    net = TinyCAMNet(num_fg).to(device)
    dino = DINOAffinity("vit_nano_p8", allow_random_init=True).to(device)  # real use: "dino_vits8" + weights
    sae = CARMGenerator(num_classes=num_fg + 1, feature_dim=32, k=0.3, gamma=0.15).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    history = []
    for step in range(args.steps):
        images = torch.randn(2, 3, 64, 64, device=device)
        labels = (torch.rand(2, num_fg, device=device) > 0.5).float()
        labels[:, 0] = 1.0  # at least one class per image
        losses = train_step(net, dino, sae, optimizer, images, labels)
        history.append(losses)
        print(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    return history


if __name__ == "__main__":
    main()
