"""Atomic writes and run-directory locks.

Every file pneumoscope writes goes through :func:`atomic_write_bytes`: the content is written to a
temporary file in the same directory, flushed and fsynced, then renamed over the target. A reader
therefore sees either the old file or the new one, never half of one, even if the process is
killed (SIGKILL) or the disk fills up mid-write.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from pneumoscope.errors import RunLockedError, StorageError
from pneumoscope.utils.faults import fault_point

#: errno values that mean "the disk refused the write", not "the program is wrong".
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def storage_error(path: str | os.PathLike[str], err: BaseException) -> StorageError | None:
    """A one-line :class:`StorageError` for a full / read-only disk (None for anything else).

    Also recognises writers that wrap the OS error in their own type: safetensors (Rust) raises
    ``SafetensorError("... No space left on device (os error 28)")``, not an ``OSError``.
    """
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        text = str(err)
        code = next((c for c in _DISK_ERRNOS if f"(os error {c})" in text), None)
    if code not in _DISK_ERRNOS:
        return None
    return StorageError(f"{path}: {os.strerror(code)} while writing; the previous version of the file is intact")


def _umask_mode() -> int:
    """The mode a normally created file gets (0o666 minus the umask): mkstemp's 0600 is too strict
    for reports and figures other users (or a server) must read."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())
        fault_point("atomic_write")
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, Exception) and (disk := storage_error(path, err)) is not None:
            raise disk from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (NaN written as null)."""
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_write_yaml(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as YAML atomically."""
    return atomic_write_text(path, yaml.safe_dump(_jsonable(obj), sort_keys=False))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds.

    For writers that insist on a file name (matplotlib's ``savefig``, safetensors, ONNX export).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, _umask_mode())
        fault_point("atomic_write")
        os.replace(tmp_path, path)
    except Exception as err:
        if (disk := storage_error(path, err)) is not None:
            raise disk from None
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths and NaN into plain JSON-able Python values."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, os.PathLike):
        return str(obj)
    return obj


class RunLock:
    """An exclusive, non-blocking lock on a directory (``<dir>/.lock``, ``fcntl.flock``).

    The lock dies with the process (the kernel releases ``flock`` on exit, also on SIGKILL), so a
    killed run never leaves a stale lock behind, and a second process started on the same run
    directory is refused at once with a clear message instead of interleaving writes.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._fh: Any = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        fh = open(self.directory / ".lock", "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            fh.close()
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLockedError(
                    f"{self.directory}: another pneumoscope process is using this run directory"
                ) from None
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
