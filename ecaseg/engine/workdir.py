"""A training run's hold on its work dir: one run at a time, stale files of killed runs cleaned up.

:class:`WorkDirLock` creates ``WORK_DIR/.ecaseg.lock`` (with ``O_EXCL``) holding the owner's host, pid and
start time, for the life of a run. A second run into the same work dir is refused with a one-line error;
a lock left by a process that no longer exists on this host is taken over, and so is one whose pid now
belongs to another process (the lock records the process's start time; Linux). :func:`clean_stale_temp_files`
removes the temporary checkpoint files (``.last.pth.*.tmp``) that a killed run left behind.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from ecaseg.errors import EcasegError

__all__ = ["LOCK_NAME", "WorkDirLock", "WorkDirLockedError", "clean_stale_temp_files"]

LOCK_NAME = ".ecaseg.lock"


class WorkDirLockedError(EcasegError):
    """Another live run holds the work dir."""


def _start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or None if unknown.

    With the pid it identifies a process: a pid reused by another process (a restarted container) has
    another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: fields after its closing ")"
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _is_owner(owner: dict[str, object]) -> bool:
    """Whether the lock's process still runs: its pid exists and, where the lock recorded it and this
    system reports it, with the same start time (else the pid now belongs to another process)."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return False
    recorded = owner.get("start_time")
    if isinstance(recorded, int):
        now = _start_time(pid)
        if now is not None and now != recorded:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkDirLock:
    """Context manager holding ``work_dir/.ecaseg.lock`` for one run.

    Args:
        work_dir: The run's folder (created if missing).

    Raises:
        WorkDirLockedError: On entry, when a live process on this host (or any process on another host)
            holds the lock.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d, WorkDirLock(d):
        ...     (Path(d) / LOCK_NAME).is_file()
        True
    """

    def __init__(self, work_dir: str | os.PathLike[str]) -> None:
        self.path = Path(work_dir) / LOCK_NAME
        self._held = False

    def _owner(self) -> dict[str, object]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me: dict[str, object] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": _start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                pid = owner.get("pid")
                same_host = owner.get("host") == me["host"]
                if isinstance(pid, int) and (not same_host or _is_owner(owner)):
                    where = "" if same_host else f" on {owner.get('host')}"
                    raise WorkDirLockedError(
                        f"work dir {self.path.parent} is in use by another run (pid {pid}{where}, since "
                        f"{owner.get('since', '?')}); wait for it to finish or choose another --work-dir "
                        f"(if no run is alive, delete {self.path})"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone (or its pid was reused)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self._held = True
            return
        raise WorkDirLockedError(f"could not take the lock {self.path}; another run may be starting")

    def release(self) -> None:
        if self._held:
            if self._owner().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> WorkDirLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def clean_stale_temp_files(work_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary checkpoint files (``.*.tmp``) left by killed runs; returns what was removed.

    Call it while holding :class:`WorkDirLock`: no live writer can own them then.
    """
    removed: list[Path] = []
    folder = Path(work_dir)
    if not folder.is_dir():
        return removed
    for path in folder.glob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
