"""Helpers of worker processes (imports the standard library only)."""

from __future__ import annotations

import signal

__all__ = ["ignore_sigint"]


def ignore_sigint() -> None:
    """Initializer of pool workers: Ctrl-C goes to the main process, which stops the pool.

    Without it every worker also gets the terminal's SIGINT and prints its own ``KeyboardInterrupt``
    traceback under the command's one-line message.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
