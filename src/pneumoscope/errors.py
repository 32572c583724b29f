"""Exception types shared by the whole package.

Every error a user can cause carries the offending file (or config key) in its message, so the
CLI can print it as one line without a traceback.
"""

from __future__ import annotations


class PneumoscopeError(Exception):
    """Base class: the CLI prints ``str(err)`` as a one-line error and exits non-zero."""


class ImageDecodeError(PneumoscopeError):
    """A file could not be read as an image. ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DatasetError(PneumoscopeError):
    """A dataset folder or CSV cannot be used as a whole (no classes, missing columns, ...)."""


class ConfigError(PneumoscopeError):
    """A configuration value is unknown, mistyped or out of range; the message names the key."""


class ModelError(PneumoscopeError):
    """A model cannot be built or loaded (unknown name, missing weights, unsafe file, ...)."""


class RunLockedError(PneumoscopeError):
    """Another process holds the lock on a run directory."""


class StorageError(PneumoscopeError):
    """The disk refused a write (full, quota, read-only). The file being replaced is left intact."""
