"""The recipe of in-domain DINO pretraining: :class:`DINOPretrainConfig`, every knob and its checks.

The knobs are those of DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021): multi-crop, the projection head, the student and teacher temperatures, the centre, the EMA
teacher and the AdamW schedules; the defaults are the recipe of the packaged synthetic ViT.

Layout: engine layer; imports ``ecaseg.dino_affinity`` (the variants) and ``ecaseg.errors``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ecaseg.dino_affinity import DINO_VARIANTS
from ecaseg.errors import ConfigError

__all__ = ["DINOPretrainConfig"]


@dataclass
class DINOPretrainConfig:
    """Hyper-parameters of DINO self-distillation; the defaults are the recipe of the packaged synthetic ViT.

    Sizes are in pixels of the loaded images: every image is first cut to a random square (side = its
    shorter side) and resized to ``image_size``; crops are then taken from that square.

    Attributes:
        variant: Architecture, a key of :data:`ecaseg.dino_affinity.DINO_VARIANTS` (its weights are not used).
        image_size: Side of the square each image is loaded at.
        global_size: Side of the two global crops.
        global_scale: Area range of a global crop, as a fraction of the loaded image.
        num_local: Number of local crops (0 disables multi-crop).
        local_size: Side of the local crops.
        local_scale: Area range of a local crop.
        ratio: Aspect-ratio range of the crop boxes (log-uniform).
        hflip_p: Probability of a horizontal flip, per crop.
        brightness: Brightness jitter strength (factor in ``[1 - a, 1 + a]``).
        contrast: Contrast jitter strength.
        saturation: Saturation jitter strength.
        hue: Hue jitter strength (shift in ``[-a, a]`` turns, at most 0.5).
        jitter_p: Probability of the colour jitter, per crop.
        grayscale_p: Probability of converting a crop to grey, per crop.
        blur_p: Probability of a Gaussian blur for (first global, second global, local) crops.
        blur_sigma: Range of the blur's sigma, in pixels of the crop.
        solarize_p: Probability of solarising the second global crop.
        out_dim: Output dimension ``K`` of the DINO head (number of "prototypes").
        hidden_dim: Width of the head's hidden layers.
        bottleneck_dim: Dimension of the L2-normalised bottleneck before the last layer.
        norm_last_layer: Keep the weight-normalised last layer's magnitude fixed to 1.
        freeze_last_layer_iters: The last layer of the head is not updated during these first iterations.
        student_temp: Student softmax temperature.
        teacher_temp: Teacher softmax temperature (sharpening) after its warm-up.
        warmup_teacher_temp: Teacher temperature at iteration 0 (linear warm-up to ``teacher_temp``).
        warmup_teacher_temp_iters: Length of the teacher-temperature warm-up.
        center_momentum: Momentum of the centre (the running mean of teacher outputs).
        teacher_momentum: EMA momentum of the teacher at iteration 0.
        final_teacher_momentum: EMA momentum at the last iteration (cosine schedule between the two).
        lr: Peak AdamW learning rate (reached after ``warmup_iters`` of linear warm-up; cosine decay after).
        min_lr: Learning rate at the last iteration.
        warmup_iters: Learning-rate warm-up length.
        weight_decay: Weight decay at iteration 0 (weights only; biases, norms, tokens and position
            embeddings get none).
        final_weight_decay: Weight decay at the last iteration (cosine schedule).
        clip_grad: Clip the student's gradient norm to this value (0 disables).
        drop_path_rate: Stochastic depth of the student (the teacher has none).
        batch_size: Images per iteration.
        iters: Number of iterations.
        seed: Seed of the initialisation, data order and augmentations.
        num_workers: DataLoader worker processes.
        cache_images: Keep every decoded image in memory after its first read (small datasets; with
            workers, each worker keeps its own cache).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        amp: bf16 autocast on CUDA.
        log_interval: Iterations between loss reports (the loss is read back to the host only then).
        checkpoint_interval: Iterations between checkpoints (0: none). A checkpoint writes the teacher
            backbone to ``out`` and the full training state to ``<out>.resume.pth``.
        resume: Continue from ``<out>.resume.pth`` when it exists.
    """

    variant: str = "vit_nano_p8"
    image_size: int = 128
    global_size: int = 64
    global_scale: tuple[float, float] = (0.25, 1.0)
    num_local: int = 4
    local_size: int = 32
    local_scale: tuple[float, float] = (0.05, 0.25)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    solarize_p: float = 0.2
    out_dim: int = 1024
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    norm_last_layer: bool = True
    freeze_last_layer_iters: int = 50
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_iters: int = 0
    center_momentum: float = 0.9
    teacher_momentum: float = 0.99
    final_teacher_momentum: float = 1.0
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_iters: int = 50
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    clip_grad: float = 3.0
    drop_path_rate: float = 0.0
    batch_size: int = 32
    iters: int = 1500
    seed: int = 0
    num_workers: int = 0
    cache_images: bool = False
    device: str = "auto"
    amp: bool = True
    log_interval: int = 20
    checkpoint_interval: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"DINOPretrainConfig.{name}={getattr(self, name)!r} is invalid: {rule}")

        for f in dataclasses.fields(self):  # NaN passes every "<" and ">" test below: refuse it first
            value = getattr(self, f.name)
            items = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in items):
                raise bad(f.name, "must be finite (not NaN or inf)")
        if self.variant not in DINO_VARIANTS:
            raise ConfigError(
                f"DINOPretrainConfig.variant={self.variant!r} is not a DINO variant; valid names: "
                f"{', '.join(sorted(DINO_VARIANTS))}"
            )
        patch = DINO_VARIANTS[self.variant].patch_size
        for name in ("image_size", "global_size", "local_size", "batch_size", "iters", "out_dim"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be >= 1")
        for name in ("global_size", "local_size"):
            if getattr(self, name) % patch:
                raise bad(name, f"must be a multiple of the patch size {patch} of {self.variant}")
        for name in ("hidden_dim", "bottleneck_dim"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("num_local", "num_workers", "warmup_iters", "warmup_teacher_temp_iters"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        for name in ("freeze_last_layer_iters", "checkpoint_interval"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.log_interval < 1:
            raise bad("log_interval", "must be >= 1")
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise bad(name, "must be (low, high) with 0 < low <= high")
        for name in ("global_scale", "local_scale"):
            if getattr(self, name)[1] > 1:
                raise bad(name, "area fractions must be <= 1")
        if len(self.blur_p) != 3 or not all(0.0 <= p <= 1.0 for p in self.blur_p):
            raise bad("blur_p", "must be three probabilities (global 1, global 2, local)")
        for name in ("hflip_p", "jitter_p", "grayscale_p", "solarize_p", "center_momentum"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be in [0, 1]")
        for name in ("teacher_momentum", "final_teacher_momentum"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be in [0, 1]")
        for name in ("brightness", "contrast", "saturation", "weight_decay", "final_weight_decay"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if not 0.0 <= self.hue <= 0.5:
            raise bad("hue", "must be in [0, 0.5]")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "lr"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be > 0")
        if self.min_lr < 0 or self.clip_grad < 0 or not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(
                f"DINOPretrainConfig: min_lr={self.min_lr}, clip_grad={self.clip_grad} must be >= 0 and "
                f"drop_path_rate={self.drop_path_rate} in [0, 1)"
            )
