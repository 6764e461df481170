"""``ECATrainer``: the reference single-stage training of Section 3.4 (Figure 2, Eq. 12).

One step, after the classifier-only warm-up:

1. :math:`\\mathcal{L}_{cls}` on the image-level labels;
2. multi-scale CAM (no grad) -> CAM pseudo-label refined by PAR;
3. frozen DINO keys / class query -> CARM through :class:`~ecaseg.carm.CARMGenerator` (prototypes updated,
   Eq. 8) -> CARM pseudo-label refined by PAR;
4. :math:`\\lambda_1 (\\mathcal{L}_{seg} + \\widetilde{\\mathcal{L}}_{seg})` on the decoder;
5. :math:`\\lambda_2 \\mathcal{L}_{corr}` (CCE, Eq. 11) on local views against the global CAM pseudo-label;
6. :math:`\\lambda_3 \\mathcal{L}_{aff}` on the attention-derived affinity, supervised by the CARM
   (or CAM) pseudo-label.

Switches in ``cfg.method`` reproduce every row of Table 4 and the fully supervised upper bound (Table 2).
Multi-GPU through ``torchrun`` (DDP, NCCL on GPU, gloo on CPU); bf16 autocast on GPU; atomic checkpoints
every ``train.ckpt_interval`` iterations and on SIGINT/SIGTERM/SIGHUP; ``resume`` continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ecaseg._checks import class_names_mismatch
from ecaseg.affinity import affinity_labels, affinity_loss, downsample_label
from ecaseg.carm import CARMGenerator
from ecaseg.cce_loss import cce_loss
from ecaseg.data import LocalViewSampler, normalize_crops, worker_init
from ecaseg.dino_affinity import DINOAffinity
from ecaseg.engine.builders import (
    build_carm_generator,
    build_dataset,
    build_dino,
    build_model,
    build_par,
    build_pseudo_labeler,
    needs_dino,
)
from ecaseg.engine.config import Config, config_from_dict, config_to_dict, resolve_device
from ecaseg.engine.evaluation import evaluate_wsss
from ecaseg.engine.inference import autocast_context
from ecaseg.engine.pseudo import PseudoLabels, par_slots
from ecaseg.engine.sampler import ResumableSampler, SeededDataset
from ecaseg.engine.workdir import WorkDirLock, clean_stale_temp_files
from ecaseg.errors import CheckpointError, ConfigError, MissingDependencyError, TrainingDivergedError
from ecaseg.models import ECANet, stochastic_layers
from ecaseg.seg_loss import classification_loss, segmentation_loss
from ecaseg.utils.dist import (
    all_gather_objects,
    all_reduce_sum,
    get_rank,
    get_world_size,
    is_distributed,
    is_main_process,
)
from ecaseg.utils.io import atomic_save_torch, atomic_write_text, json_dumps_finite, weights_file_problem

__all__ = [
    "CHECKPOINT_FORMAT",
    "ECATrainer",
    "StepOutput",
    "load_checkpoint",
    "poly_lr_lambda",
    "set_tf32",
]

CHECKPOINT_FORMAT = "ecaseg-checkpoint-v1"
logger = logging.getLogger("ecaseg.train")


def poly_lr_lambda(max_iters: int, warmup_iters: int, warmup_ratio: float, power: float) -> Any:
    """Multiplier of the base learning rate at iteration ``it``: linear warm-up then poly decay.

    Example:
        >>> f = poly_lr_lambda(100, 10, 0.0, 1.0)
        >>> round(f(0), 3), round(f(5), 3), round(f(10), 3), round(f(55), 3)
        (0.0, 0.5, 0.9, 0.45)
    """

    def factor(it: int) -> float:
        if it < warmup_iters:
            return warmup_ratio + (1.0 - warmup_ratio) * it / warmup_iters
        return (1.0 - min(it, max_iters) / max_iters) ** power

    return factor


class _TrainForward(nn.Module):
    """Everything with gradient in one forward, so that DDP sees one graph per step.

    Returns a dict of the tensors that the step's losses use and nothing else (``cls_logits``,
    ``features`` and ``cams`` with ``with_cls``; ``seg_logits``, ``aff_pred`` and ``local_cams`` when
    requested): an output tensor that no loss reads (the classifier's logits of the fully supervised bound)
    would make DDP wait for a gradient that never comes.
    """

    def __init__(self, net: ECANet) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, images: Tensor, local_images: Tensor | None, with_cls: bool, with_seg: bool, with_aff: bool
    ) -> dict[str, Tensor]:
        out = self.net(images, with_seg=with_seg, with_aff=with_aff)
        result: dict[str, Tensor] = {}
        if with_cls:
            result.update(cls_logits=out.cls_logits, features=out.features, cams=out.cams)
        if out.seg_logits is not None:
            result["seg_logits"] = out.seg_logits
        if out.aff_pred is not None:
            result["aff_pred"] = out.aff_pred
        if local_images is not None:
            result["local_cams"] = self.net.forward_cam(local_images)
        return result


@dataclass
class StepOutput:
    """Losses of one step (detached scalars stay on the device: no host sync) and its pseudo-labels."""

    losses: dict[str, Tensor]
    pseudo: PseudoLabels | None


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA's fp32 matrix products and convolutions (``train.tf32``), process-wide.

    ``False`` sets both to IEEE fp32; note that torch's own default (what a run without ``train.tf32``
    keeps) is IEEE fp32 for matrix products but TF32 for cuDNN convolutions.
    """
    precision = "tf32" if enabled else "ieee"
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision  # type: ignore[attr-defined]
    else:  # pragma: no cover - older torch
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [sample[key] for sample in batch]
        out[key] = torch.stack(values) if isinstance(values[0], Tensor) else values
    return out


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read an ecaseg checkpoint, with a clear error if it is missing or of another kind."""
    path = Path(path)
    if path.is_dir():
        inside = [p.name for p in sorted(path.glob("*.pth"))]
        raise CheckpointError(
            f"checkpoint {path} is a folder; give the checkpoint file"
            + (f", e.g. {path / inside[0]}" if inside else " (ecaseg train writes WORK_DIR/last.pth)")
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise CheckpointError(
            weights_file_problem(path, err, "give a checkpoint that ecaseg train wrote")
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an ecaseg checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    return ckpt


class ECATrainer:
    """Reference trainer of ECA (and of its ablations, the AFA-style baseline and the supervised bound).

    Args:
        config: the experiment :class:`~ecaseg.engine.config.Config`.
        work_dir: where checkpoints, logs, TensorBoard events and metrics go.
        resume: continue from ``work_dir/last.pth`` (``True``) or from the given checkpoint path.
        overwrite: start from scratch although ``work_dir/last.pth`` exists (it is replaced at the first
            checkpoint); without it (and without ``resume``) such a work dir is refused, so that no run is
            replaced by accident.
        train_dataset: a dataset to use instead of the configured one (library use).
        val_dataset: likewise for validation (``None``: the configured one; it must have masks).
        net: a network to use instead of building one from ``config.model``.
        dino: a frozen affinity ViT to use instead of building one.
        progress: show a tqdm bar.

    Example (library route)::

        cfg = load_config("voc", ["data.root=/data/VOCdevkit"])
        ECATrainer(cfg, "work_dirs/voc").train()
    """

    def __init__(
        self,
        config: Config,
        work_dir: str | Path,
        *,
        resume: bool | str | Path = False,
        overwrite: bool = False,
        train_dataset: Dataset[dict[str, Any]] | None = None,
        val_dataset: Dataset[dict[str, Any]] | None = None,
        net: ECANet | None = None,
        dino: DINOAffinity | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = config.validate()
        self.work_dir = Path(work_dir)
        existing = self.work_dir / "last.pth"
        if not resume and not overwrite and existing.is_file():
            raise CheckpointError(
                f"work dir {work_dir} already holds a checkpoint ({existing}); pass --resume to continue "
                "it, --overwrite to train from scratch and replace it, or choose another --work-dir"
            )
        self.progress = progress
        self.rank = get_rank()
        self.world_size = get_world_size()
        if config.train.batch_size % self.world_size:
            raise ConfigError(
                f"train.batch_size={config.train.batch_size} is the global batch and must divide evenly over "
                f"the {self.world_size} processes; use a multiple of {self.world_size}"
            )
        #: images per process and step (``train.batch_size`` is the global batch)
        self.local_batch_size = config.train.batch_size // self.world_size
        self.device = self._select_device(config.train.device)
        if self.device.type == "cuda" and config.train.tf32:
            set_tf32(True)
        self._seed_everything(config.train.seed + self.rank)
        m = config.method

        self.train_dataset = (
            train_dataset
            if train_dataset is not None
            else build_dataset(
                config,
                config.data.train_split,
                train=True,
                uint8=True,  # normalised on the device (train_step)
                masks=m.fully_supervised,  # weak supervision reads no mask file
            )
        )
        self.val_dataset = val_dataset
        if self.val_dataset is None and config.train.val_interval > 0:
            self.val_dataset = build_dataset(config, config.data.val_split, train=False)
        self.class_names: list[str] = list(getattr(self.train_dataset, "class_names", []))
        num_classes = int(getattr(self.train_dataset, "num_classes", len(self.class_names)))
        if num_classes < 2:
            raise ValueError("the training dataset must expose num_classes >= 2 (background + classes)")

        self.net = (net if net is not None else build_model(config, num_classes)).to(self.device)
        if self.net.num_classes != num_classes:
            raise ValueError(f"network has {self.net.num_classes} classes, dataset {num_classes}")
        if config.train.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.use_dino = needs_dino(config)
        self.dino: DINOAffinity | None = None
        self.carm_generator: CARMGenerator | None = None
        if self.use_dino:
            self.dino = (dino if dino is not None else build_dino(config)).to(self.device)
            self.carm_generator = build_carm_generator(config, num_classes, self.net.feature_dim).to(
                self.device
            )
        self.par = build_par(config).to(self.device)
        self.labeler = build_pseudo_labeler(config, self.net, self.par, self.dino, self.carm_generator)
        # train.compile: the training step's PAR (the no-grad pseudo-label block's main cost) is compiled
        # too; its input sizes are fixed (the crop, and par_slots' few channel counts), so it compiles a
        # handful of times; validation (one image size after another) keeps the eager PAR
        self._train_labeler = self.labeler
        if config.train.compile:
            compiled_par: Any = torch.compile(self.par, dynamic=False)
            self._train_labeler = build_pseudo_labeler(
                config, self.net, compiled_par, self.dino, self.carm_generator
            )
        self.view_sampler = LocalViewSampler(num_views=m.local_views, size=m.local_size)
        # the training forward's CAM is the multi-scale CAM's unflipped scale-1.0 pass when the backbone's
        # training-mode forward is reproducible (method.reuse_train_cam)
        self.reuse_train_cam = 1.0 in m.cam_scales and (
            m.reuse_train_cam == "always"
            or (m.reuse_train_cam == "auto" and not stochastic_layers(self.net.backbone))
        )

        self._train_forward: nn.Module = _TrainForward(self.net)
        if is_distributed() and self.device.type == "cuda":
            # SyncBN (the decoder's BatchNorm) exists for CUDA only
            self._train_forward = nn.SyncBatchNorm.convert_sync_batchnorm(self._train_forward)
        # the forward of the current phase (classifier warm-up or not), built by _phase_forward
        self._forward_module: nn.Module | None = None
        self._forward_phase: bool | None = None
        # host-side flags (stop signals) travel over gloo, so that agreeing on them never syncs a GPU
        self._host_group: Any = None
        if is_distributed() and torch.distributed.get_backend() != "gloo":
            self._host_group = torch.distributed.new_group(backend="gloo")
        o = config.optim
        self.optimizer = torch.optim.AdamW(
            self.net.param_groups(
                o.lr,
                o.weight_decay,
                head_lr_mult=o.head_lr_mult,
                backbone_norm_lr_mult=o.backbone_norm_lr_mult,
                decay_groups=o.decay_groups,
            ),
            betas=o.betas,
            fused=True if o.fused else None,  # optim.fused (the default: foreach)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            poly_lr_lambda(
                config.train.max_iters,
                config.optim.warmup_iters,
                config.optim.warmup_ratio,
                config.optim.power,
            ),
        )
        self.iteration = 0
        # divergence watch, on the device (no host sync per step): steps taken, first non-finite loss
        self._steps = torch.zeros((), dtype=torch.long, device=self.device)
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.history: list[dict[str, float]] = []
        self._stop_signal: int | None = None
        if resume:
            path = Path(resume) if not isinstance(resume, bool) else self.work_dir / "last.pth"
            self.load_state(load_checkpoint(path, map_location=self.device))

    # ------------------------------------------------------------------ set-up helpers
    def _select_device(self, name: str) -> torch.device:
        if name != "auto":
            return resolve_device(name, "train.device")
        if name == "auto":
            if torch.cuda.is_available():
                local = int(os.environ.get("LOCAL_RANK", 0))
                torch.cuda.set_device(local)
                return torch.device("cuda", local)
            return torch.device("cpu")
        return torch.device(name)

    def _phase_forward(self, warmup: bool) -> nn.Module:
        """The training forward of the classifier warm-up (``warmup``) or of the main phase.

        Under DDP each phase gets its own wrapper with ``static_graph=True``: the parameters a step uses
        are the same at every step of a phase (the decoder and the affinity projection rest during the
        warm-up, the classifier and the affinity projection in the fully supervised bound), so DDP learns
        the unused ones at the phase's first step instead of searching the autograd graph at every step
        (``find_unused_parameters``); unused parameters keep no gradient, as in a single process. The
        wrapper is rebuilt once, at the warm-up boundary (a broadcast of the weights from rank 0, equal
        anyway).
        """
        if self._forward_module is not None and (self._forward_phase == warmup or not is_distributed()):
            return self._forward_module
        self._forward_module = None  # drop the previous wrapper (and its gradient hooks) first
        module = self._train_forward
        if is_distributed():
            module = DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                static_graph=True,
            )
        if self.cfg.train.compile:
            module = torch.compile(module)  # type: ignore[assignment]
        self._forward_module, self._forward_phase = module, warmup
        return module

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds user code that uses the legacy API
        torch.manual_seed(seed)

    def _make_loader(self) -> DataLoader[Any]:
        cfg = self.cfg
        sampler = ResumableSampler(
            len(self.train_dataset),  # type: ignore[arg-type]
            seed=cfg.train.seed,
            rank=self.rank,
            world_size=self.world_size,
            start=self.iteration * self.local_batch_size,
        )
        drop = () if cfg.method.fully_supervised else ("mask",)
        return DataLoader(
            SeededDataset(self.train_dataset, drop_keys=drop),
            batch_size=self.local_batch_size,
            sampler=sampler,
            num_workers=cfg.data.num_workers,
            collate_fn=_collate,
            worker_init_fn=worker_init,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=cfg.data.num_workers > 0,
            # the loader's own generator: creating an iterator must not draw from the global RNG, or a
            # resumed run would be one draw apart from an uninterrupted one
            generator=torch.Generator().manual_seed(cfg.train.seed),
        )

    # ------------------------------------------------------------------ state
    def rng_state(self) -> dict[str, Any]:
        """This process's random state: Python, NumPy, torch's CPU generator and its CUDA device's."""
        rng: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),  # noqa: NPY002
            "torch": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            rng["cuda_device"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _set_rng_state(self, rng: dict[str, Any]) -> None:
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])  # noqa: NPY002
        torch.set_rng_state(rng["torch"].cpu())
        if "cuda_device" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda_device"].cpu(), self.device)
        elif "cuda" in rng and torch.cuda.is_available():  # checkpoints before ecaseg 0.3: every device's
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])

    def state_dict(self, rng_per_rank: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything needed to continue exactly: model, prototypes, optimiser, scheduler, RNG, iteration.

        ``rng_per_rank``: every process's :meth:`rng_state` in rank order (what :meth:`save_checkpoint`
        gathers under DDP); ``None``: this process's alone. ``rng`` is rank 0's (the format of older
        checkpoints).
        """
        per_rank = rng_per_rank if rng_per_rank is not None else [self.rng_state()]
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.cfg),
            "class_names": self.class_names,
            "iteration": self.iteration,
            "model": self.net.state_dict(),
            "carm": self.carm_generator.state_dict() if self.carm_generator is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": per_rank[0],
            "rng_per_rank": per_rank,
            "history": self.history,
        }

    def load_state(self, ckpt: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (checks that the checkpoint's model matches this config)."""
        saved = config_from_dict(ckpt["config"])
        check_compatible(saved, self.cfg)
        missing = [k for k in ("optimizer", "scheduler", "iteration", "rng") if k not in ckpt]
        if missing:
            raise CheckpointError(
                f"the checkpoint lacks the training state ({', '.join(missing)}): it holds a model only, so "
                "it cannot be resumed; start a new run (or evaluate it with ecaseg evaluate)"
            )
        try:
            self.net.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            classes = ckpt["model"].get("classifier.weight")
            got = f"{int(classes.shape[0]) + 1} classes" if isinstance(classes, Tensor) else "another network"
            raise CheckpointError(
                f"the checkpoint's network ({got}) does not match this run's ({self.net.num_classes} "
                f"classes, {self.cfg.model.backbone}): {' '.join(str(err).split())[:300]}"
            ) from None
        check_class_names(ckpt, self.class_names, "this run's dataset")  # same count, other names/order
        if self.carm_generator is not None and ckpt.get("carm") is not None:
            self.carm_generator.load_state_dict(ckpt["carm"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.iteration = int(ckpt["iteration"])
        self.history = list(ckpt.get("history", []))
        # every rank continues its own random stream (CCE views, drop-path, dropout); a checkpoint of
        # another number of processes cannot be continued exactly: each rank then starts a fresh stream
        # derived from (train.seed, iteration, rank), distinct per rank and reproducible
        per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
        if len(per_rank) == self.world_size:
            self._set_rng_state(per_rank[self.rank])
        else:
            entropy = [self.cfg.train.seed, self.iteration, self.rank]
            seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
            self._seed_everything(seed)
            if is_main_process():
                logger.warning(
                    "the checkpoint holds the random state of %d process(es) and this run has %d: every "
                    "rank starts a new random stream seeded from (train.seed, iteration %d, rank); the run "
                    "is not identical to an uninterrupted one",
                    len(per_rank),
                    self.world_size,
                    self.iteration,
                )

    def check_finite(self) -> None:
        """Raise :class:`~ecaseg.errors.TrainingDivergedError` if a loss since the start was non-finite or
        the weights are (one host synchronisation; called before every checkpoint and validation).

        Under DDP this is a collective that every rank calls at the same iteration: the ranks agree on the
        verdict (the first non-finite loss of any rank), so all of them raise the same error, or none.
        """
        world = self.world_size
        never = torch.iinfo(torch.long).max
        # the first bad iteration of this rank (1-based), encoded with the rank: iteration * world + rank
        first_iter = self.iteration - self._steps + self._first_bad_step + 1
        first_key = torch.where(self._first_bad_step >= 0, first_iter * world + self.rank, never)
        weights_bad = ~torch.stack([torch.isfinite(p).all() for p in self.net.parameters()]).all()
        has_last = is_main_process() and (self.work_dir / "last.pth").is_file()
        verdict = torch.stack(
            [first_key, -weights_bad.long(), torch.tensor(-int(has_last), device=self.device)]
        )
        if is_distributed():
            torch.distributed.all_reduce(verdict, op=torch.distributed.ReduceOp.MIN)
        key, neg_weights_bad, neg_has_last = verdict.tolist()
        if key == never and neg_weights_bad == 0:
            return
        last = self.work_dir / "last.pth"
        kept = (
            f"the last good checkpoint is {last} (resume it with --resume after lowering optim.lr or "
            "fixing the data)"
            if neg_has_last < 0
            else "no checkpoint was written (lower optim.lr or fix the data, and start again)"
        )
        bad_iter, bad_rank = divmod(key, world)
        at = (
            f"the loss became non-finite at iteration {bad_iter}"
            + (f" on rank {bad_rank}" if world > 1 else "")
            if key != never
            else "the weights became non-finite"
        )
        raise TrainingDivergedError(
            f"training diverged: {at} (lr {self.optimizer.param_groups[0]['lr']:.3g}); {kept}; nothing "
            "non-finite was saved"
        )

    def save_checkpoint(self, name: str = "last.pth") -> Path | None:
        """Write ``work_dir/name`` atomically (rank 0 only) after :meth:`check_finite`; returns its path.

        Under DDP every rank calls it (it gathers every rank's random state), rank 0 writes, and no rank
        returns before the file is complete.
        """
        self.check_finite()
        rng_per_rank = all_gather_objects(self.rng_state())
        path = self.work_dir / name
        if not is_distributed():
            atomic_save_torch(self.state_dict(rng_per_rank), path)
            return path
        failed = torch.zeros(1, dtype=torch.long)  # rank 0's outcome, agreed by every rank (no hang)
        error: BaseException | None = None
        if is_main_process():
            try:
                atomic_save_torch(self.state_dict(rng_per_rank), path)
            except BaseException as err:  # a full disk, a read-only folder: every rank stops
                failed[0], error = 1, err
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX, group=self._host_group)
        if error is not None:
            raise error
        if int(failed[0]):
            raise CheckpointError(f"rank 0 could not write the checkpoint {path} (see its error)")
        return path if is_main_process() else None

    # ------------------------------------------------------------------ the step
    def train_step(self, batch: dict[str, Any]) -> StepOutput:
        """One optimisation step of Eq. (12) on a collated batch; returns detached losses."""
        cfg, m = self.cfg, self.cfg.method
        device = self.device
        images = batch["image"].to(device, non_blocking=True)
        if images.dtype == torch.uint8:  # uint8 crops (a quarter of the bytes): normalised here, exactly
            box = batch.get("crop_box")
            images = normalize_crops(images, None if box is None else box.to(device, non_blocking=True))
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # the most labels of one image, read from the host-side batch (no device sync): PAR refines only
        # the labelled channels (method.compact_par)
        max_labels = (
            int(batch["label"].sum(1).max())
            if m.compact_par and batch["label"].device.type == "cpu"
            else None
        )
        if max_labels is not None and cfg.train.compile:  # a few fixed PAR sizes (exact; no recompiles)
            max_labels = par_slots(max_labels, batch["label"].shape[1])
        labels = batch["label"].to(device, non_blocking=True).float()
        crop_box = batch["crop_box"].to(device, non_blocking=True) if "crop_box" in batch else None
        warmup = self.iteration < cfg.train.cls_warmup_iters
        losses: dict[str, Tensor] = {}
        pseudo: PseudoLabels | None = None
        amp = autocast_context(device, cfg.train.amp)

        forward = self._phase_forward(warmup)
        if m.fully_supervised:
            masks = batch["mask"].to(device, non_blocking=True)
            with amp:
                out = forward(images, None, False, True, False)
            losses["seg"] = segmentation_loss(out["seg_logits"], masks, balanced=False)
            total = losses["seg"]
        else:
            need_cce = m.use_cce and not warmup
            need_aff = m.aff_source != "none" and not warmup
            need_seg = (m.use_cam_seg or m.use_carm_seg) and not warmup
            local_images = None
            views = None
            if need_cce:
                views = self.view_sampler(images)
                local_images = views.images.flatten(0, 1)
            with amp:
                out = forward(images, local_images, True, need_seg, need_aff)
            local_cams = out.get("local_cams")
            losses["cls"] = classification_loss(out["cls_logits"], labels)
            total = losses["cls"]
            if not warmup:
                with amp:
                    pseudo = self._train_labeler(
                        images,
                        labels,
                        crop_box=crop_box,
                        features=out["features"].detach(),
                        with_band=need_cce or m.aff_source != "none" or m.cam_seg_label != "alpha",
                        with_carm=self.use_dino,
                        update_prototypes=True,
                        max_labels=max_labels,
                        raw_at_one=self._train_cam(out) if self.reuse_train_cam else None,
                    )
                if need_seg:
                    seg = torch.zeros((), device=device)
                    if m.use_cam_seg:
                        losses["seg_cam"] = segmentation_loss(
                            out["seg_logits"], self._cam_seg_target(pseudo, images, labels, crop_box)
                        )
                        seg = seg + losses["seg_cam"]
                    if m.use_carm_seg and pseudo.carm_label is not None:
                        losses["seg_carm"] = segmentation_loss(out["seg_logits"], pseudo.carm_label)
                        seg = seg + losses["seg_carm"]
                    total = total + m.lambda_seg * seg
                if need_cce and local_cams is not None and views is not None:
                    assert pseudo.cam_label_band is not None
                    b, v = views.images.shape[:2]
                    local_cams = local_cams.float().reshape(b, v, *local_cams.shape[1:])
                    losses["cce"] = cce_loss(
                        local_cams,
                        views.geometry,
                        pseudo.cam_label_band,
                        global_hw=(images.shape[-2], images.shape[-1]),
                        labels=labels,
                        max_patches=m.cce_max_patches,
                        validate=False,
                    )
                    total = total + m.lambda_cce * losses["cce"]
                if need_aff and "aff_pred" in out:
                    source = pseudo.carm_label_band if m.aff_source == "carm" else pseudo.cam_label_band
                    assert source is not None
                    grid = out["features"].shape[-2:]
                    aff_target = affinity_labels(downsample_label(source, grid), radius=m.aff_radius)
                    losses["aff"] = affinity_loss(out["aff_pred"].float(), aff_target)
                    total = total + m.lambda_aff * losses["aff"]
        losses["total"] = total
        bad = ~torch.isfinite(total.detach())
        self._first_bad_step = torch.where(
            bad & (self._first_bad_step < 0), self._steps, self._first_bad_step
        )
        self._steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.iteration += 1
        return StepOutput({k: v.detach() for k, v in losses.items()}, pseudo)

    def _train_cam(self, out: dict[str, Tensor]) -> Tensor:
        """The training forward's scale-1.0 CAM as ``forward_cam`` gives it (before the ReLU: AFA's rule)."""
        if self.cfg.method.cam_rule != "afa":
            return out["cams"].detach()
        features = out["features"].detach()
        weight = self.net.classifier.weight.detach()
        return torch.nn.functional.conv2d(features, weight.to(features.dtype))

    def _cam_seg_target(
        self, pseudo: PseudoLabels, images: Tensor, labels: Tensor, crop_box: Tensor | None
    ) -> Tensor:
        """The CAM segmentation label of ``method.cam_seg_label`` (AFA's switch for ``afa_rw``)."""
        m = self.cfg.method
        if m.cam_seg_label == "alpha":
            return pseudo.cam_label
        assert pseudo.cam_label_band is not None
        if m.cam_seg_label == "band" or self.iteration <= m.rw_switch_iter:
            return pseudo.cam_label_band
        cams = pseudo.cams_refined if pseudo.cams_refined is not None else pseudo.cams
        with autocast_context(self.device, self.cfg.train.amp):
            return self._train_labeler.random_walk_label(images, labels, cams, crop_box, radius=m.aff_radius)

    # ------------------------------------------------------------------ the loop
    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: FrameType | None) -> None:
            self._stop_signal = signum

        # SIGHUP: a closed terminal or ssh session stops the run like SIGTERM (checkpoint, then exit), unless
        # it is ignored (nohup): then the run goes on, as its user asked
        hup = getattr(signal, "SIGHUP", None)
        watched = [signal.SIGINT, signal.SIGTERM]
        if hup is not None and signal.getsignal(hup) is not signal.SIG_IGN:
            watched.append(hup)
        for sig in watched:
            with contextlib.suppress(ValueError):  # not in the main thread
                previous[sig] = signal.signal(sig, handler)
        return previous

    def validate(self) -> dict[str, float]:
        """CAM, CARM, pseudo-label and segmentation mIoU and the classifier score on the val split."""
        if self.val_dataset is None:
            return {}
        # Ctrl-C stops validation within an image (in a single process; under DDP every rank must finish the
        # same number of images, so the signal waits for the end of validation there)
        should_stop = None if is_distributed() else (lambda: self._stop_signal is not None)
        metrics = evaluate_wsss(
            self.net,
            self.val_dataset,
            self.labeler,
            device=self.device,
            max_images=self.cfg.data.val_max_images,
            amp=self.cfg.train.amp,
            progress=self.progress,
            should_stop=should_stop,
        )
        return metrics

    def train(self, until: int | None = None) -> dict[str, float]:
        """Run (or continue) training to ``train.max_iters`` (or to iteration ``until``, then checkpoint).

        Rank 0 holds the work dir's lock (:class:`~ecaseg.engine.workdir.WorkDirLock`) for the run: a second
        run into the same work dir is refused; temporary checkpoint files of killed runs are removed.

        Returns:
            The last validation metrics (empty if no validation ran).
        """
        if not is_main_process():
            return self._train(until)
        with WorkDirLock(self.work_dir):
            for path in clean_stale_temp_files(self.work_dir):
                logger.info("removed %s, left by an interrupted run", path.name)
            return self._train(until)

    def _train(self, until: int | None) -> dict[str, float]:
        cfg = self.cfg
        stop_at = cfg.train.max_iters if until is None else min(until, cfg.train.max_iters)
        main = is_main_process()
        if main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self._setup_logging()
            atomic_write_text(self.work_dir / "config.json", json.dumps(config_to_dict(cfg), indent=2))
        writer = self._tensorboard() if main and cfg.train.tensorboard else None
        previous = self._install_signal_handlers()
        loader = self._make_loader()
        batches = iter(loader)
        bar = tqdm(
            total=cfg.train.max_iters,
            initial=self.iteration,
            desc=cfg.name,
            disable=not (self.progress and main),
            dynamic_ncols=True,
        )
        # a resumed run keeps the validation of its last iteration (a finished run resumed runs no step)
        last_metrics: dict[str, float] = (
            {k: v for k, v in self.history[-1].items() if k != "iteration"}
            if self.history and self.history[-1].get("iteration") == float(self.iteration)
            else {}
        )
        start = time.perf_counter()
        self.net.train()
        try:
            while self.iteration < stop_at:
                batch = next(batches)
                step = self.train_step(batch)
                it = self.iteration
                bar.update(1)
                if it % cfg.train.log_interval == 0 or it == cfg.train.max_iters:
                    values = self._logged_losses(step.losses)  # host sync only when logging
                    if not all(math.isfinite(v) for v in values.values()):
                        self.check_finite()
                    lr = self.optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{values['total']:.4f}", lr=f"{lr:.2e}")
                    if main:
                        logger.info(
                            "iter %d/%d lr %.3e %s",
                            it,
                            cfg.train.max_iters,
                            lr,
                            " ".join(f"{k} {v:.4f}" for k, v in values.items()),
                        )
                        if writer is not None:
                            for key, value in values.items():
                                writer.add_scalar(f"loss/{key}", value, it)
                            writer.add_scalar("lr", lr, it)
                # the checkpoint first: validation must never cost the work done so far
                if cfg.train.ckpt_interval > 0 and it % cfg.train.ckpt_interval == 0:
                    self.save_checkpoint()
                if cfg.train.val_interval > 0 and (
                    it % cfg.train.val_interval == 0 or it == cfg.train.max_iters
                ):
                    self.check_finite()
                    last_metrics = self.validate()
                    if main:
                        logger.info("val iter %d %s", it, json.dumps(last_metrics))
                        self.history.append({"iteration": float(it), **last_metrics})
                        if writer is not None:
                            for key, value in last_metrics.items():
                                if not math.isnan(value):
                                    writer.add_scalar(f"val/{key}", value, it)
                            self._log_images(writer, step, batch, it)
                stop = self._agreed_stop_signal()
                if stop is not None:
                    self._stop_signal = stop
                    if main:
                        logger.warning("signal %d received: checkpoint at iteration %d", stop, it)
                    self.save_checkpoint()
                    raise KeyboardInterrupt
        finally:
            bar.close()
            for sig, old in previous.items():
                signal.signal(sig, old)
            if writer is not None:
                writer.close()
        self.save_checkpoint()
        if main:
            seconds = time.perf_counter() - start
            logger.info("reached iteration %d in %.1f s", self.iteration, seconds)
            atomic_write_text(
                self.work_dir / "metrics.json",
                json_dumps_finite({"final": last_metrics, "history": self.history}, "metrics.json"),
            )
        return last_metrics

    def _logged_losses(self, losses: dict[str, Tensor]) -> dict[str, float]:
        """The step's losses as floats, averaged over the processes: one all-reduce and one host transfer.

        Every rank gets the same values, so a non-finite loss on any rank is seen by all of them (and
        :meth:`check_finite` runs everywhere or nowhere).
        """
        keys = list(losses)
        stacked = torch.stack([losses[k].float() for k in keys])
        if is_distributed():
            stacked = all_reduce_sum(stacked) / self.world_size
        return dict(zip(keys, stacked.tolist()))

    def _agreed_stop_signal(self) -> int | None:
        """The stop signal any rank received (one small gloo all-reduce of host memory under DDP, no GPU
        sync), so that every rank stops at the same iteration; ``None``: carry on."""
        if not is_distributed():
            return self._stop_signal
        flag = torch.tensor([self._stop_signal or 0], dtype=torch.long)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._host_group)
        return int(flag[0]) or None

    # ------------------------------------------------------------------ logging
    def _setup_logging(self) -> None:
        handler = logging.FileHandler(self.work_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise MissingDependencyError(
                "train.tensorboard=true needs TensorBoard: pip install ecaseg[train] (or set it false)"
            ) from err

        return SummaryWriter(log_dir=str(self.work_dir / "tensorboard"))

    def _log_images(self, writer: Any, step: StepOutput, batch: dict[str, Any], it: int) -> None:
        """Image grids of the first images: image, CAM, CARM, CAM/CARM pseudo-labels, prediction."""
        from ecaseg.engine.visualize import training_panels

        if step.pseudo is None:
            return
        n = min(self.cfg.train.num_vis_images, batch["image"].shape[0])
        images = batch["image"][:n]
        if images.dtype == torch.uint8:
            box = batch.get("crop_box")
            images = normalize_crops(images, None if box is None else box[:n])
        # eval mode: under DDP the decoder's SyncBatchNorm is a collective in training mode, and this
        # forward runs on rank 0 only; in eval mode it uses the running statistics and talks to no one
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                pred = self.net.forward_seg(images.to(self.device)).argmax(1)
        finally:
            self.net.train(was_training)
        grid = training_panels(images, step.pseudo, pred, n, class_names=self.class_names or None)
        writer.add_image("train/panels", grid, it, dataformats="HWC")


def check_class_names(ckpt: dict[str, Any], current: list[str] | tuple[str, ...], where: str) -> None:
    """Raise :class:`~ecaseg.errors.CheckpointError` if the checkpoint's class names differ from ``current``
    (order included: a reordered ``classes.txt`` would swap the labels); a side without names is not
    compared."""
    saved = list(ckpt.get("class_names") or [])
    if not saved or not current:
        return
    diff = class_names_mismatch(saved, list(current))
    if diff is not None:
        raise CheckpointError(
            f"the checkpoint was trained with other classes than {where}: {diff}; class indices would "
            "silently change meaning, so give the classes in the checkpoint's order "
            f"({', '.join(saved[1:])}) or train a new model"
        )


def check_compatible(saved: Config, current: Config) -> None:
    """Raise :class:`CheckpointError` if the networks of two configs differ (listing the differing keys)."""
    keys = ("backbone", "decoder_dim", "strides", "attn_blocks")
    diff = [
        f"model.{k}: checkpoint {getattr(saved.model, k)!r} vs config {getattr(current.model, k)!r}"
        for k in keys
        if getattr(saved.model, k) != getattr(current.model, k)
    ]
    if saved.data.dataset != current.data.dataset:
        diff.append(f"data.dataset: checkpoint {saved.data.dataset!r} vs config {current.data.dataset!r}")
    if diff:
        raise CheckpointError(
            "checkpoint was trained with another config; differing keys: " + "; ".join(diff)
        )
