"""``ecaseg refine``: CAMs saved by another pipeline (IRN, AMN, MCTformer, yours) -> refined pseudo-labels.

Reads one CAM file per image, refines it with a method of :mod:`ecaseg.refine` (CARM + PAR by default)
and writes one label PNG per image (0 = background, ``1..K-1``, 255 = ignore, VOC palette), optionally the
refined maps as ``.npy`` in the same dict layout, and with ground-truth masks a ``metrics.json`` (mIoU and
per-class IoU, precision and recall) and a ``report.md``.

CAM files, by id (``<id>.npy`` / ``<id>.npz`` in the CAM folder):

* the multi-stage layout (IRN, AMN and others that reuse IRN's scripts): ``np.save`` of a dict with
  ``keys`` (0-based foreground class indices) and ``high_res`` (``[n_keys, H, W]`` at the image size)
  and/or ``cam`` (``[n_keys, h, w]`` at the network's stride; a numpy array or a torch tensor). ``high_res``
  is used when present. Reading it unpickles the file: read only files you trust.
* plain arrays ``[C, h, w]`` (one channel per foreground class, ``C = num_classes - 1``) in ``.npy`` or
  ``.npz`` (its only array, or ``high_res`` / ``cam`` / ``cams``), with the image labels from a labels file
  (the CSV / JSON formats of :class:`ecaseg.data.FolderDataset`).

Each map is ReLU'd and divided by its maximum (IRN's normalisation; maps that already peak at 1 are
unchanged), absent classes are zeroed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ecaseg.data.classes import voc_palette
from ecaseg.data.folder import parse_labels_file, resolve_class_names
from ecaseg.data.io import read_image, read_mask, write_mask
from ecaseg.engine.config import resolve_device
from ecaseg.errors import CheckpointError, ConfigError, DatasetError
from ecaseg.metrics import SegmentationMetric
from ecaseg.refine import DEFAULT_METHOD, REFINE_METHODS, CAMRefiner, RefineMethod
from ecaseg.utils.io import atomic_write, atomic_write_text, json_dumps_finite

__all__ = [
    "IMAGE_EXTENSIONS",
    "CAMFile",
    "RefineJob",
    "precision_recall",
    "read_cam_file",
    "refine_folder",
    "write_cam_file",
]

#: Image extensions looked up for an id, in this order (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_MANIFEST = "refine.json"
_MAX_ASPECT_DIFFERENCE = 0.15


@dataclass
class CAMFile:
    """One image's CAMs as read from disk.

    Attributes:
        cams: ``[C, h, w]`` float32 normalised foreground CAMs (absent classes zero).
        labels: ``[C]`` float32 0/1 image labels.
        layout: ``"dict"`` (IRN-style) or ``"array"``.
    """

    cams: torch.Tensor
    labels: torch.Tensor
    layout: str


def _as_array(value: Any, path: Path, key: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: {key!r} is not a numeric array ({type(value).__name__})") from None
    return arr


def _normalise(cams: np.ndarray, path: Path) -> torch.Tensor:
    if not np.isfinite(cams).all():
        raise DatasetError(f"{path}: the CAMs hold NaN or infinite values")
    t = torch.from_numpy(np.ascontiguousarray(cams)).float().clamp_min(0.0)
    peak = t.flatten(1).amax(dim=1).clamp_min(1e-5) if t.numel() else t.new_ones(t.shape[0])
    return t / peak[:, None, None]


def _check_grid(cams: np.ndarray, path: Path, image_size: tuple[int, int] | None, key: str) -> None:
    if cams.ndim != 3:
        raise DatasetError(f"{path}: {key!r} must be [n, h, w], got shape {cams.shape}")
    if image_size is None or cams.shape[0] == 0:
        return
    (h, w), (ih, iw) = cams.shape[1:], image_size
    if min(h, w) < 1 or abs(math.log((h / w) / (ih / iw))) > _MAX_ASPECT_DIFFERENCE or h > ih or w > iw:
        raise DatasetError(
            f"{path}: {key!r} has the grid {h}x{w}, which does not match its image of {ih}x{iw} (a map at "
            "the image size, or at a stride of it, is expected); is it the CAM of another image?"
        )


def read_cam_file(
    path: str | Path,
    num_fg: int,
    image_size: tuple[int, int] | None = None,
    labels: np.ndarray | None = None,
) -> CAMFile:
    """Read one CAM file (IRN-style dict or plain array; see the module docstring).

    Args:
        path: ``.npy`` or ``.npz`` file.
        num_fg: ``C``, the number of foreground classes (``num_classes - 1``).
        image_size: ``(H, W)`` of the image, to check the maps' grid against.
        labels: ``[C]`` 0/1 image labels, required for plain arrays; for a dict they must agree with
            ``keys`` when given.

    Returns:
        :class:`CAMFile` with dense ``[C, h, w]`` CAMs.

    Raises:
        DatasetError: a missing or malformed file (missing ``keys``, a shape that does not match the image,
            an unknown class index, non-finite values), naming the file.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.npy"
        >>> write_cam_file(p, np.array([1]), np.ones((1, 4, 4), np.float32))
        >>> f = read_cam_file(p, num_fg=3, image_size=(4, 4))
        >>> f.layout, f.labels.tolist(), tuple(f.cams.shape)
        ('dict', [0.0, 1.0, 0.0], (3, 4, 4))
    """
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"CAM file {file} does not exist")
    try:
        if file.suffix.lower() == ".npz":
            with np.load(file, allow_pickle=False) as npz:
                content: Any = {k: npz[k] for k in npz.files}
        else:
            content = np.load(file, allow_pickle=True)
    except Exception as err:  # numpy raises ValueError, OSError, pickle errors, EOFError ...
        raise DatasetError(f"cannot read CAM file {file}: {type(err).__name__}: {err}") from None
    if isinstance(content, np.ndarray) and content.dtype == object and content.shape == ():
        content = content.item()
    if isinstance(content, dict) and "keys" in content:
        keys = np.asarray(content["keys"]).reshape(-1)
        if keys.size and not np.issubdtype(keys.dtype, np.integer):
            raise DatasetError(f"{file}: 'keys' must be integer class indices, got {keys.dtype}")
        if keys.size and (keys.min() < 0 or keys.max() >= num_fg):
            raise DatasetError(
                f"{file}: 'keys' holds class index "
                f"{int(keys.max() if keys.max() >= num_fg else keys.min())}, "
                f"outside 0..{num_fg - 1} (0-based foreground classes; num_classes counts the background)"
            )
        if len(set(keys.tolist())) != keys.size:
            raise DatasetError(f"{file}: 'keys' repeats a class: {keys.tolist()}")
        key = "high_res" if "high_res" in content else "cam" if "cam" in content else None
        if key is None:
            raise DatasetError(f"{file}: the dict has 'keys' but neither 'high_res' nor 'cam'")
        maps = _as_array(content[key], file, key)
        _check_grid(maps, file, image_size, key)
        if maps.shape[0] != keys.size:
            raise DatasetError(
                f"{file}: {key!r} has {maps.shape[0]} maps but 'keys' names {keys.size} classes"
            )
        vec = np.zeros(num_fg, dtype=np.float32)
        vec[keys] = 1.0
        if labels is not None and not np.array_equal(np.asarray(labels, dtype=np.float32) > 0, vec > 0):
            raise DatasetError(
                f"{file}: 'keys' {keys.tolist()} disagree with the labels file "
                f"({np.nonzero(np.asarray(labels))[0].tolist()})"
            )
        dense = np.zeros((num_fg, *maps.shape[1:]), dtype=np.float32)
        dense[keys] = maps
        return CAMFile(_normalise(dense, file), torch.from_numpy(vec), "dict")
    if isinstance(content, dict):
        if file.suffix.lower() != ".npz" and ("high_res" in content or "cam" in content):
            raise DatasetError(f"{file}: the dict has no 'keys' (the 0-based foreground classes of its maps)")
        arrays = [k for k in ("high_res", "cam", "cams") if k in content]
        if not arrays and len(content) == 1:
            arrays = list(content)
        if not arrays:
            raise DatasetError(
                f"{file}: cannot tell which array holds the CAMs (arrays: {sorted(content)}); save one array "
                "or name it 'cam'"
            )
        content = content[arrays[0]]
    if not isinstance(content, np.ndarray) or content.dtype == object:
        raise DatasetError(
            f"{file}: expected an IRN-style dict or a [C, h, w] array, got {type(content).__name__}"
        )
    maps = _as_array(content, file, "array")
    _check_grid(maps, file, image_size, "array")
    if maps.shape[0] != num_fg:
        hint = " (drop the background channel)" if maps.shape[0] == num_fg + 1 else ""
        raise DatasetError(
            f"{file}: a plain CAM array must have one channel per foreground class, {num_fg}, got "
            f"{maps.shape[0]}{hint}"
        )
    if labels is None:
        raise DatasetError(
            f"{file}: a plain CAM array has no class keys; give the image labels (--labels FILE)"
        )
    vec = (np.asarray(labels, dtype=np.float32) > 0).astype(np.float32)
    cams = _normalise(maps, file) * torch.from_numpy(vec)[:, None, None]
    return CAMFile(cams, torch.from_numpy(vec), "array")


def write_cam_file(
    path: str | Path, keys: np.ndarray, high_res: np.ndarray, cam: np.ndarray | None = None, **extra: Any
) -> None:
    """Write ``np.save`` of an IRN-style dict (``keys``, ``high_res``, optionally ``cam``), atomically."""
    payload: dict[str, Any] = {"keys": np.asarray(keys, dtype=np.int64), "high_res": np.asarray(high_res)}
    if cam is not None:
        payload["cam"] = np.asarray(cam)
    payload.update(extra)
    with atomic_write(path) as fh:
        np.save(fh, np.array(payload, dtype=object), allow_pickle=True)


def precision_recall(confusion: torch.Tensor | Sequence[Sequence[int]]) -> tuple[list[float], list[float]]:
    """Per-class precision ``tp / predicted`` and recall ``tp / ground truth`` (NaN where undefined).

    Example:
        >>> precision_recall([[3, 1], [0, 2]])
        ([1.0, 0.6666666666666666], [0.75, 1.0])
    """
    conf = torch.as_tensor(confusion, dtype=torch.float64)
    tp = conf.diagonal()
    pred, gt = conf.sum(0), conf.sum(1)
    nan = torch.full_like(tp, math.nan)
    return (
        torch.where(pred > 0, tp / pred.clamp_min(1), nan).tolist(),
        torch.where(gt > 0, tp / gt.clamp_min(1), nan).tolist(),
    )


@dataclass
class RefineJob:
    """What ``ecaseg refine`` does (the CLI's options; see :func:`refine_folder`)."""

    cams: Path
    images: Path
    out: Path
    num_classes: int
    method: RefineMethod = DEFAULT_METHOD
    masks: Path | None = None
    labels: Path | None = None
    classes: Path | None = None
    dino: str = "dino_vits8"
    dino_weights: str | None = None
    alpha: float = 0.5
    save_npy: bool = False
    batch_size: int = 8
    device: str = "auto"
    progress: bool = True
    carm_overrides: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "cams": str(self.cams.resolve()),
            "images": str(self.images.resolve()),
            "num_classes": self.num_classes,
            "dino": self.dino,
            "dino_weights": self.dino_weights,
            "alpha": self.alpha,
            "carm_overrides": self.carm_overrides,
        }


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def _check_job(job: RefineJob) -> None:
    if job.method not in REFINE_METHODS:
        raise ConfigError(f"--method must be one of {', '.join(REFINE_METHODS)}, got {job.method!r}")
    if not isinstance(job.num_classes, int) or job.num_classes < 2:
        raise ConfigError(
            f"--num-classes counts the background (21 for VOC) and must be >= 2, got {job.num_classes}"
        )
    if not 0.0 < job.alpha <= 1.0:
        raise ConfigError(f"--alpha must be in (0, 1], got {job.alpha}")
    if job.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {job.batch_size}")
    for name, folder in (("--cams", job.cams), ("--images", job.images), ("--masks", job.masks)):
        if folder is not None and not folder.is_dir():
            raise DatasetError(f"{name} {folder} is not a folder")
        if folder is not None and _inside(job.out, folder):
            raise ConfigError(
                f"--out {job.out} is inside the input folder {name} {folder}; choose another folder"
            )
    for name, file in (("--labels", job.labels), ("--classes", job.classes)):
        if file is not None and not file.is_file():
            raise DatasetError(f"{name} {file} does not exist")
    if job.out.exists() and not job.out.is_dir():
        raise ConfigError(f"--out {job.out} is a file, not a folder")
    if job.out.is_dir() and any(job.out.iterdir()):
        manifest = job.out / _MANIFEST
        if not manifest.is_file():
            raise ConfigError(
                f"--out {job.out} is not empty and holds no {_MANIFEST} of an earlier 'ecaseg refine': "
                "choose an empty or new folder (nothing of yours is overwritten)"
            )
        try:
            earlier = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DatasetError(f"cannot read {manifest}: {err}") from None
        if earlier != job.manifest() and any(job.out.glob("*.png")):
            diff = sorted(k for k in job.manifest() if earlier.get(k) != job.manifest()[k])
            raise ConfigError(
                f"--out {job.out} holds the labels of another refine run (differs in {', '.join(diff)}); "
                "choose a new --out to keep both, or delete that folder"
            )


def _index(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes:
            if p.stem in found and suffixes.index(p.suffix.lower()) >= suffixes.index(
                found[p.stem].suffix.lower()
            ):
                continue
            found[p.stem] = p
    return found


def _class_names(job: RefineJob) -> list[str]:
    if job.classes is None:
        return ["background", *(f"class{i}" for i in range(1, job.num_classes))]
    names = list(resolve_class_names(job.classes))
    if len(names) != job.num_classes:
        raise DatasetError(
            f"--classes {job.classes} lists {len(names)} names but --num-classes is {job.num_classes} "
            "(both count the background, first)"
        )
    return names


def _batches(ids: list[str], sizes: dict[str, tuple[int, int]], batch_size: int) -> Iterator[list[str]]:
    """Consecutive runs of same-size images, at most ``batch_size`` each (order kept)."""
    run: list[str] = []
    for i in ids:
        if run and (len(run) == batch_size or sizes[run[0]] != sizes[i]):
            yield run
            run = []
        run.append(i)
    if run:
        yield run


def refine_folder(job: RefineJob) -> dict[str, Any]:
    """Run ``ecaseg refine``: read, refine, write labels (and metrics with masks). Returns the summary.

    Finished ids (their PNG exists in ``out``) are skipped, so an interrupted run resumes; their labels are
    read back for the metrics. Every file is written atomically; ``out`` may not lie inside an input folder
    and is refused when it holds files of anything but an earlier run with the same settings.
    """
    _check_job(job)
    names = _class_names(job)
    num_fg = job.num_classes - 1
    cams_index = _index(job.cams, (".npy", ".npz"))
    if not cams_index:
        raise DatasetError(f"--cams {job.cams} holds no .npy or .npz CAM files")
    images_index = _index(job.images, IMAGE_EXTENSIONS)
    missing = sorted(set(cams_index) - set(images_index))
    if missing:
        raise DatasetError(
            f"no image for {len(missing)} CAM file(s) in --images {job.images} (e.g. {missing[0]} with any "
            f"of {', '.join(IMAGE_EXTENSIONS)})"
        )
    label_of: dict[str, np.ndarray] = {}
    if job.labels is not None:
        ids, vectors = parse_labels_file(job.labels, names)
        label_of = dict(zip(ids, vectors))
    mask_index = _index(job.masks, (".png",)) if job.masks is not None else {}
    if job.masks is not None:
        lacking = sorted(set(cams_index) - set(mask_index))
        if lacking:
            raise DatasetError(f"no mask {lacking[0]}.png in --masks {job.masks} ({len(lacking)} missing)")
    ids = sorted(cams_index)
    if job.labels is not None:
        absent = [i for i in ids if i not in label_of]
        if absent:
            raise DatasetError(
                f"--labels {job.labels} has no row for {absent[0]} ({len(absent)} ids missing)"
            )
    # every check, and the ViT's weights, before the first file is written
    device = resolve_device(job.device, "--device")
    refiner = _build_refiner(job, device)
    job.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job.out / _MANIFEST, json.dumps(job.manifest(), indent=2))
    todo = [i for i in ids if not (job.out / f"{i}.png").is_file()]
    palette = voc_palette()
    metric = SegmentationMetric(job.num_classes) if job.masks is not None else None
    start = time.perf_counter()
    refine_seconds = 0.0
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="refine", unit="img", disable=not job.progress)
    images: dict[str, np.ndarray] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for chunk_start in range(0, len(todo), 256):  # bounded memory: read a chunk, batch it by size
        chunk = todo[chunk_start : chunk_start + 256]
        images = {i: read_image(images_index[i]) for i in chunk}
        sizes = {i: (images[i].shape[0], images[i].shape[1]) for i in chunk}
        for batch_ids in _batches(chunk, sizes, job.batch_size):
            files = [read_cam_file(cams_index[i], num_fg, sizes[i], label_of.get(i)) for i in batch_ids]
            grids = {tuple(f.cams.shape[-2:]) for f in files}
            if len(grids) > 1:  # CAMs at different grids: bring them to the first image's size
                size = sizes[batch_ids[0]]
                cams = torch.stack(
                    [F.interpolate(f.cams[None], size=size, mode="bilinear")[0] for f in files]
                )
            else:
                cams = torch.stack([f.cams for f in files])
            img = (
                torch.stack([torch.from_numpy(images[i]).permute(2, 0, 1) for i in batch_ids]).float() / 255.0
            )
            labels = torch.stack([f.labels for f in files])
            t0 = time.perf_counter()
            out = refiner(img.to(device), cams.to(device), labels.to(device))
            refine_seconds += time.perf_counter() - t0
            label = out.label.cpu().numpy()
            for j, i in enumerate(batch_ids):
                if job.save_npy:
                    keys = np.nonzero(labels[j].numpy())[0]
                    maps = out.scores[j].cpu().float().numpy()
                    write_cam_file(job.out / "npy" / f"{i}.npy", keys, maps[keys + 1], bg=maps[0])
                write_mask(job.out / f"{i}.png", label[j], palette=palette)
                if metric is not None:
                    _score(metric, label[j], mask_index[i], job.num_classes)
            bar.update(len(batch_ids))
    bar.close()
    summary: dict[str, Any] = {
        "images": len(ids),
        "refined": len(todo),
        "skipped": len(ids) - len(todo),
        "method": job.method,
        "seconds": time.perf_counter() - start,
        "refine_ms_per_image": 1000.0 * refine_seconds / max(len(todo), 1),
        "device": str(device),
    }
    if metric is not None:
        done = set(todo)
        for i in ids:  # labels of an earlier run, read back so that the metrics cover every id
            if i not in done:
                _score(
                    metric, read_mask(job.out / f"{i}.png", job.num_classes), mask_index[i], job.num_classes
                )
        scores = metric.compute()
        precision, recall = precision_recall(scores["confusion"])
        metrics = {
            "miou": scores["miou"],
            "per_class": {
                name: {"iou": iou, "precision": p, "recall": r}
                for name, iou, p, r in zip(names, scores["per_class_iou"], precision, recall)
            },
            "pixel_accuracy": scores["pixel_accuracy"],
            **summary,
        }
        atomic_write_text(job.out / "metrics.json", json_dumps_finite(metrics, "metrics.json"))
        atomic_write_text(job.out / "report.md", _report(metrics, job))
        summary["miou"] = scores["miou"]
    return summary


def _score(metric: SegmentationMetric, label: np.ndarray, mask_path: Path, num_classes: int) -> None:
    gt = read_mask(mask_path, num_classes)
    if gt.shape != label.shape:
        raise DatasetError(
            f"mask {mask_path} is {gt.shape[0]}x{gt.shape[1]} but its image is "
            f"{label.shape[0]}x{label.shape[1]}; is it the mask of another image?"
        )
    metric.update(torch.from_numpy(label).long(), torch.from_numpy(gt).long())


def _pct(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{100 * v:.1f}"


def _report(metrics: dict[str, Any], job: RefineJob) -> str:
    lines = [
        "# ecaseg refine",
        "",
        f"Pseudo-labels of {metrics['images']} images from the CAMs in `{job.cams}`, method `{job.method}`, "
        f"scored against the masks in `{job.masks}` (pixels labelled 255 in a mask are left out).",
        "",
        f"**mIoU {_pct(metrics['miou'])} %** (mean over classes of intersection over union); precision = "
        "share of the pixels given a class that truly are that class, recall = share of a class's pixels "
        "that were given it.",
        "",
        "| class | IoU % | precision % | recall % |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {_pct(row['iou'])} | {_pct(row['precision'])} | {_pct(row['recall'])} |")
    return "\n".join(lines) + "\n"


def _build_refiner(job: RefineJob, device: torch.device) -> CAMRefiner:
    dino = None
    if job.method in ("random_walk", "carm", "carm_par", "carm_crf"):
        from ecaseg.dino_affinity import DINOAffinity

        try:
            dino = DINOAffinity(job.dino, weights=job.dino_weights).to(device)
        except CheckpointError as err:
            raise CheckpointError(
                f"--dino {job.dino}: {err} With ecaseg refine: --dino-weights FILE."
            ) from None
    carm = None
    if job.method.startswith("carm") and job.carm_overrides:
        from ecaseg.carm import CARMGenerator

        carm = CARMGenerator.for_affinity(dino, job.num_classes, **job.carm_overrides)
    return CAMRefiner(job.num_classes, job.method, dino, alpha=job.alpha, carm=carm).to(device)
