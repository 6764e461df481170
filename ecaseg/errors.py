"""Exceptions raised for bad user input.

The command line turns every :class:`EcasegError` into one line on stderr and a non-zero exit status;
library users can catch the specific subclasses.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "EcasegError",
    "MissingDependencyError",
    "TrainingDivergedError",
]


class EcasegError(Exception):
    """Base class of every user-facing ecaseg error."""


class DatasetError(EcasegError, ValueError):
    """A dataset root, image, mask or label file is missing or malformed (the message names it)."""


class CheckpointError(EcasegError, RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the model (the message lists the keys)."""


class ConfigError(EcasegError, ValueError):
    """A configuration key or value is invalid (the message lists the valid choices)."""


class TrainingDivergedError(EcasegError, RuntimeError):
    """The loss or the weights became non-finite (the message names the iteration and the last checkpoint)."""


class MissingDependencyError(EcasegError, ImportError):
    """An optional dependency that the requested feature needs is not installed (the message is the
    ``pip install`` command)."""
