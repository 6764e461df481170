"""Image-level labels: derived from masks once, cached on disk, or parsed from a labels file.

The cache is a small ``.npz`` file holding the labels and a fingerprint of what they were computed from:
the ordered id list, ``num_classes``, ``ignore_index`` and each mask file's size and modification time
(nanoseconds). A dataset whose fingerprint differs (ids added or removed, a mask edited or replaced)
recomputes the labels and rewrites the cache atomically; nothing is re-read from the masks otherwise.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ecaseg.data.io import read_mask
from ecaseg.utils.io import atomic_write_bytes

__all__ = [
    "default_cache_dir",
    "labels_from_mask",
    "load_or_compute_mask_labels",
    "mask_labels_fingerprint",
]

_CACHE_VERSION = 1


def labels_from_mask(mask: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Image-level multi-hot label of a mask: the foreground classes present in it.

    Args:
        mask: ``[H, W]`` integer mask with class ids ``0..K-1`` and ``ignore_index``.
        num_classes: K, including background (id 0).
        ignore_index: ignored value, never a label.

    Returns:
        ``np.ndarray`` ``[K-1]`` uint8; entry ``c - 1`` is 1 iff class id ``c`` (``c >= 1``) occurs.

    Example:
        >>> labels_from_mask(np.array([[0, 2], [255, 2]]), num_classes=4).tolist()
        [0, 1, 0]
    """
    counts = np.bincount(
        np.asarray(mask, dtype=np.int64).ravel(), minlength=max(num_classes, ignore_index + 1)
    )
    return (counts[1:num_classes] > 0).astype(np.uint8)


def default_cache_dir() -> Path:
    """Fallback folder for label caches when the dataset folder is not writable.

    ``$ECASEG_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/ecaseg``, else ``~/.cache/ecaseg``.
    """
    env = os.environ.get("ECASEG_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ecaseg"


def mask_labels_fingerprint(
    ids: Sequence[str], mask_paths: Sequence[Path], num_classes: int, ignore_index: int = 255
) -> str:
    """SHA-256 over the id list, the class count and every mask file's size and mtime (ns).

    Raises:
        FileNotFoundError: a mask file is missing (callers check existence first).
    """
    digest = hashlib.sha256()
    digest.update(f"ecaseg-labels-v{_CACHE_VERSION}|{num_classes}|{ignore_index}|{len(ids)}\n".encode())
    for image_id, path in zip(ids, mask_paths, strict=True):
        st = os.stat(path)
        digest.update(f"{image_id}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cache_candidates(data_root: Path, cache_name: str, cache_dir: Path | None) -> list[Path]:
    # In a shared cache folder, the name carries a hash of the data root so that datasets cannot collide.
    root_tag = hashlib.sha256(str(data_root.resolve()).encode()).hexdigest()[:12]
    shared_name = f"labels-{cache_name}-{root_tag}.npz"
    if cache_dir is not None:
        return [Path(cache_dir) / shared_name]
    return [data_root / f".ecaseg-labels-{cache_name}.npz", default_cache_dir() / shared_name]


def _dir_writable(folder: Path) -> bool:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.access(probe, os.W_OK)


def _load_cache(path: Path, fingerprint: str, n: int, num_fg: int) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != fingerprint:
                return None
            labels = np.asarray(data["labels"], dtype=np.uint8)
    except (OSError, KeyError, ValueError, EOFError):
        return None
    if labels.shape != (n, num_fg):
        return None
    return labels


def _compute(mask_paths: Sequence[Path], num_classes: int, ignore_index: int, num_workers: int) -> np.ndarray:
    def one(path: Path) -> np.ndarray:
        return labels_from_mask(read_mask(path, num_classes, ignore_index), num_classes, ignore_index)

    out = np.zeros((len(mask_paths), num_classes - 1), dtype=np.uint8)
    if num_workers <= 1 or len(mask_paths) < 64:
        for i, path in enumerate(mask_paths):
            out[i] = one(path)
        return out
    # Image decoding releases the GIL: threads give a near-linear speed-up without pickling.
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        for i, row in enumerate(pool.map(one, mask_paths, chunksize=32)):
            out[i] = row
    return out


def load_or_compute_mask_labels(
    ids: Sequence[str],
    mask_paths: Sequence[Path],
    num_classes: int,
    *,
    data_root: Path,
    cache_name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    ignore_index: int = 255,
    num_workers: int | None = None,
) -> np.ndarray:
    """Image-level labels of every mask, read from the cache when it is up to date.

    Cache location: ``cache_dir/labels-<cache_name>-<hash of data_root>.npz`` when ``cache_dir`` is given;
    otherwise ``data_root/.ecaseg-labels-<cache_name>.npz``, or, if ``data_root`` is not writable, the same
    name as with ``cache_dir`` under :func:`default_cache_dir`. A cache is used only if its fingerprint
    (:func:`mask_labels_fingerprint`) matches; otherwise the masks are read (in ``num_workers`` threads) and
    the cache is rewritten atomically. Failure to write the cache only warns.

    Args:
        ids: image ids, in dataset order.
        mask_paths: the mask file of each id.
        num_classes: K including background.
        data_root: the dataset folder (default cache location).
        cache_name: a short name for the split (e.g. ``"voc-train_aug"``), part of the file name.
        cache_dir: explicit cache folder.
        ignore_index: ignored mask value.
        num_workers: reader threads (default ``min(8, os.cpu_count())``).

    Returns:
        ``np.ndarray`` ``[len(ids), K-1]`` uint8 multi-hot labels.

    Raises:
        DatasetError: a mask is unreadable or holds invalid values (from :func:`~ecaseg.data.io.read_mask`).

    Example:
        >>> import tempfile, cv2
        >>> root = Path(tempfile.mkdtemp())
        >>> _ = cv2.imwrite(str(root / "a.png"), np.array([[0, 2], [255, 0]], np.uint8))
        >>> y = load_or_compute_mask_labels(["a"], [root / "a.png"], 4, data_root=root, cache_name="demo")
        >>> y.tolist()
        [[0, 1, 0]]
        >>> sorted(p.name for p in root.iterdir())
        ['.ecaseg-labels-demo.npz', 'a.png']
    """
    if len(ids) != len(mask_paths):
        raise ValueError(f"got {len(ids)} ids but {len(mask_paths)} mask paths")
    paths = [Path(p) for p in mask_paths]
    fingerprint = mask_labels_fingerprint(ids, paths, num_classes, ignore_index)
    candidates = _cache_candidates(
        Path(data_root), cache_name, None if cache_dir is None else Path(cache_dir)
    )
    for candidate in candidates:
        if candidate.is_file():
            cached = _load_cache(candidate, fingerprint, len(ids), num_classes - 1)
            if cached is not None:
                return cached

    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    labels = _compute(paths, num_classes, ignore_index, workers)

    buffer = io.BytesIO()
    np.savez(buffer, labels=labels, fingerprint=np.array(fingerprint), version=np.array(_CACHE_VERSION))
    errors = []
    for candidate in candidates:
        if not _dir_writable(candidate.parent):
            errors.append(f"{candidate.parent}: not writable")
            continue
        try:
            atomic_write_bytes(candidate, buffer.getvalue())
            break
        except OSError as exc:
            errors.append(f"{candidate}: {exc}")
    else:
        warnings.warn(
            "could not write the image-level label cache (" + "; ".join(errors) + "); labels will be "
            "recomputed from the masks next time. Pass cache_dir= to choose a writable folder.",
            RuntimeWarning,
            stacklevel=2,
        )
    return labels
