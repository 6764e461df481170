"""Atomic file output: write to a temporary file in the same folder, then rename over the target.

A crash (or SIGKILL) while writing leaves the previous file, or no file, never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_save_torch",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable",
    "json_dumps_finite",
    "read_text_utf8",
    "weights_file_problem",
]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it is fsynced and renamed to ``path``.

    Args:
        path: the final file name; its parent folder is created if needed.
        mode: ``"wb"`` or ``"w"``.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_write(d / "a.txt", "w") as f:
        ...     _ = f.write("hello")
        >>> (d / "a.txt").read_text()
        'hello'
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write supports modes 'wb' and 'w', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (checkpoints, caches)."""
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def json_dumps_finite(obj: Any, what: str = "JSON", indent: int | None = 2) -> str:
    """``json.dumps`` that writes ``null`` for NaN and infinite floats (bare ``NaN`` is not valid JSON).

    A :class:`RuntimeWarning` names the keys that held them (e.g. the mIoU of a split with no image).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     json_dumps_finite({"miou": float("nan"), "n": [1.0, float("inf")]}, indent=None)
        '{"miou": null, "n": [1.0, null]}'
    """
    replaced: list[str] = []

    def clean(value: Any, where: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            replaced.append(f"{where} ({value})")
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    text = json.dumps(clean(obj, ""), indent=indent, allow_nan=False)
    if replaced:
        shown = ", ".join(replaced[:5]) + (f" and {len(replaced) - 5} more" if len(replaced) > 5 else "")
        warnings.warn(
            f"{what}: {len(replaced)} value(s) are not finite numbers and are written as null: {shown} "
            "(e.g. a metric of a split without images or without a class)",
            RuntimeWarning,
            stacklevel=2,
        )
    return text


def check_writable(path: str | os.PathLike[str], what: str) -> None:
    """Raise ``OSError`` (naming ``what`` and the path) unless a file can be written at ``path``.

    Checked before a long run so that it does not fail at its end: ``path`` must not be a folder, and the
    nearest existing folder on its way must accept a new file (probed with a temporary file, removed at once;
    missing folders are not created).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> check_writable(d / "new" / "metrics.json", "--out")
        >>> check_writable(d, "--out")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        IsADirectoryError: [Errno 21] --out ... is a folder; give a file name: '...'
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(21, f"{what} {target} is a folder; give a file name", str(target))
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(20, f"{what} {target}: {folder} is a file, not a folder", str(target))
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OSError(
            err.errno, f"{what} {target} cannot be written ({err.strerror}) in {folder}", str(target)
        ) from None


def read_text_utf8(path: str | os.PathLike[str], what: str) -> str:
    """The text of a UTF-8 file (with or without a byte-order mark, which is dropped).

    Raises:
        OSError: The file cannot be read (as ``Path.read_text``).
        ValueError: The file is not UTF-8; the message names ``what``, the file, the first bad byte and
            its position, and says how to fix it.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "classes.txt"
        >>> _ = p.write_bytes(b"\\xef\\xbb\\xbfcat\\n")
        >>> read_text_utf8(p, "class names file")
        'cat\\n'
        >>> _ = p.write_bytes("caf\\xe9\\n".encode("latin-1"))
        >>> read_text_utf8(p, "class names file")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: class names file ... is not UTF-8 text (byte 0xe9 at position 3); save it as UTF-8 ...
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        bad = data[err.start : err.start + 1].hex()
        raise ValueError(
            f"{what} {path} is not UTF-8 text (byte 0x{bad} at position {err.start}); save it as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8, or 'Save as UTF-8' in an editor)"
        ) from None


def weights_file_problem(path: str | os.PathLike[str], error: BaseException, hint: str = "") -> str:
    """Why ``torch.load`` could not read ``path``, in words (the reader's own message is often one token,
    e.g. ``101`` for a text file); ``hint`` says what the file should be. Reads the file's first bytes
    and, for a ``torch.save`` archive, searches its pickle for ecaseg's checkpoint tag, unpickling nothing.
    """
    p = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        with open(p, "rb") as handle:
            head = handle.read(16)
        archive = zipfile.is_zipfile(p)
        tagged = False
        if archive:
            with zipfile.ZipFile(p) as z:
                pickles = [n for n in z.namelist() if n.endswith("data.pkl")]
                tagged = bool(pickles) and b"ecaseg-checkpoint-v" in z.read(pickles[0])
    except OSError as err:
        return f"cannot read {p}: {err.strerror or err}{tail}"
    if tagged:
        return (
            f"{p} is an ecaseg training checkpoint (what ecaseg train writes: the segmentation network and "
            f"its training state), not a weights file of this kind{tail}"
        )
    if archive and "weights_only" in str(error).replace(" ", "_").lower():
        return (
            f"{p} holds Python objects besides tensors, which are not loaded (weights_only=True, so that no "
            f"code in the file runs); save a plain state dict: torch.save(model.state_dict(), path){tail}"
        )
    if not archive and head[:1] != b"\x80":
        return (
            f"{p} is not a weights file (a torch.save archive or .safetensors); it starts with {head!r}{tail}"
        )
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"cannot read checkpoint {p}: {first[:200]}{tail}"
