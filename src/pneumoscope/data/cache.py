"""On-disk cache of preprocessed images: one memory-mapped uint8 array per preprocessing spec.

Why: decoding a JPEG and resizing it costs more than a CPU can spare every epoch. The cache stores
each image once, preprocessed, as raw ``size×size`` bytes; training, evaluation and later runs read
slices of a memory map and never decode a JPEG again.

Layout of ``<cache_root>/<spec.key()>/``::

    spec.json      the PreprocessSpec (and PREPROCESS_VERSION) the directory was built with
    images.u8      slot i occupies bytes [i*S*S, (i+1)*S*S)
    index.json     {"slots": {content_hash: slot}, "crc": [crc32 of each slot], "n": number of slots}

Keys are the *content* hash of each file (from the manifest) plus the spec's key, so a changed file
or a changed parameter rebuilds only what changed (MONAI's ``PersistentDataset`` with
``hash_transform``, not torchvision's path-keyed cache). Robustness:

* New slots are appended to ``images.u8`` and fsynced *before* the index naming them is replaced
  atomically. A process killed mid-build leaves extra bytes past the last indexed slot, which the
  next open truncates; it never leaves an index pointing at missing data.
* Every slot has a CRC-32 in the index; :meth:`ImageCache.verify` (run on open) finds damaged
  slots and the next :meth:`ImageCache.update` rebuilds them.
* Builders take an exclusive lock, so two processes (e.g. DDP ranks) never write at once; readers
  only read the index that was fully written.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from pneumoscope.data.preprocess import PREPROCESS_VERSION, PreprocessSpec, preprocess
from pneumoscope.errors import ImageDecodeError, RunLockedError
from pneumoscope.utils.faults import fault_point
from pneumoscope.utils.io import RunLock, atomic_write_json, storage_error

log = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """``$PNEUMOSCOPE_CACHE`` or ``~/.cache/pneumoscope`` (used only when the caller passes none)."""
    env = os.environ.get("PNEUMOSCOPE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pneumoscope"


@dataclass
class BuildReport:
    """What an :meth:`ImageCache.update` call did."""

    added: int = 0
    reused: int = 0
    repaired: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason


class ImageCache:
    """Preprocessed uint8 images addressed by content hash. See the module docstring."""

    def __init__(self, root: str | os.PathLike[str], spec: PreprocessSpec) -> None:
        self.spec = spec
        self.dir = Path(root) / spec.key()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._slot_bytes = spec.size * spec.size
        self._slots: dict[str, int] = {}
        self._crc: list[int] = []
        self._bad: set[int] = set()
        self._mmap: np.memmap | None = None
        try:  # repair a killed build's leftovers now, unless a builder is at work right now
            with RunLock(self.dir):
                self._load_index(repair=True)
        except (RunLockedError, OSError):  # a builder holds the lock, or the cache is read-only
            self._load_index()

    # ------------------------------------------------------------------ index
    @property
    def data_path(self) -> Path:
        return self.dir / "images.u8"

    def _load_index(self, repair: bool = False) -> None:
        """Read the index. ``repair`` (only under the build lock) also truncates ``images.u8`` to
        the indexed slots: bytes past them are a killed build's unindexed tail, and new slots are
        appended, so a tail left in place would shift every new slot off its offset."""
        idx_path = self.dir / "index.json"
        spec_path = self.dir / "spec.json"
        self._slots, self._crc, self._bad = {}, [], set()
        if not idx_path.exists():
            if repair and self.data_path.exists() and self.data_path.stat().st_size:
                log.warning("cache data %s has no index (a build was killed); starting it again", self.data_path)
                with open(self.data_path, "r+b") as fh:
                    fh.truncate(0)
            return
        try:
            idx = json.loads(idx_path.read_text())
            spec_ok = json.loads(spec_path.read_text()) == {"version": PREPROCESS_VERSION, **self.spec.to_dict()}
            if not spec_ok:
                raise ValueError("spec.json does not match")
            slots, crc = dict(idx["slots"]), list(idx["crc"])
            if len(crc) != int(idx["n"]) or any(not (0 <= s < len(crc)) for s in slots.values()):
                raise ValueError("inconsistent index")
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("cache index %s is damaged (%s); rebuilding the cache", idx_path, err)
            self._reset_files(delete=repair)
            return
        size = self.data_path.stat().st_size if self.data_path.exists() else 0
        need = len(crc) * self._slot_bytes
        if size < need:
            log.warning("cache data %s is shorter than its index; rebuilding", self.data_path)
            self._reset_files(delete=repair)
            return
        if size > need and repair:  # a build was killed after appending, before writing the index
            with open(self.data_path, "r+b") as fh:
                fh.truncate(need)
        self._slots, self._crc = slots, crc

    def _reset_files(self, delete: bool = True) -> None:
        """Forget the index; ``delete`` (under the build lock only) also removes the files."""
        for name in ("index.json", "images.u8") if delete else ():
            (self.dir / name).unlink(missing_ok=True)
        self._slots, self._crc, self._bad = {}, [], set()
        self._mmap = None

    def _write_index(self) -> None:
        atomic_write_json(self.dir / "spec.json", {"version": PREPROCESS_VERSION, **self.spec.to_dict()})
        atomic_write_json(self.dir / "index.json", {"n": len(self._crc), "slots": self._slots, "crc": self._crc})

    # ------------------------------------------------------------------ reading
    def __contains__(self, content_hash: str) -> bool:
        return content_hash in self._slots and self._slots[content_hash] not in self._bad

    def __len__(self) -> int:
        return len(self._slots)

    def _array(self) -> np.ndarray:
        if self._mmap is None or self._mmap.shape[0] != len(self._crc):
            if not self._crc:
                return np.zeros((0, self.spec.size, self.spec.size), np.uint8)
            self._mmap = np.memmap(self.data_path, dtype=np.uint8, mode="r",
                                   shape=(len(self._crc), self.spec.size, self.spec.size))
        return self._mmap

    def slots_for(self, content_hashes: Sequence[str]) -> np.ndarray:
        """Slot numbers for ``content_hashes`` (KeyError naming the first missing hash)."""
        try:
            return np.fromiter((self._slots[h] for h in content_hashes), dtype=np.int64, count=len(content_hashes))
        except KeyError as err:
            raise KeyError(f"image {err.args[0]} is not in the cache {self.dir}; call update() first") from None

    def get(self, content_hashes: Sequence[str]) -> np.ndarray:
        """A (N, S, S) uint8 copy of the images with these content hashes."""
        return np.asarray(self._array()[self.slots_for(content_hashes)])

    def array(self) -> np.ndarray:
        """The whole memory-mapped (slots, S, S) array (read-only)."""
        return self._array()

    def verify(self) -> list[int]:
        """Check every slot's CRC-32; damaged slots are forgotten so the next update rebuilds them."""
        arr = self._array()
        bad = [i for i in range(len(self._crc)) if zlib.crc32(arr[i].tobytes()) != self._crc[i]]
        if bad:
            log.warning("%d damaged slot(s) in %s will be rebuilt", len(bad), self.dir)
            self._bad.update(bad)
        return bad

    # ------------------------------------------------------------------ building
    def update(self, paths: Sequence[str], content_hashes: Sequence[str], *, workers: int = 2,
               progress: bool = True, verify: bool = True) -> BuildReport:
        """Make sure every (path, content_hash) is cached; decode+preprocess only what is missing.

        A file that fails to decode is reported in ``BuildReport.failed`` (path → reason) and skipped;
        the build goes on.
        """
        from pneumoscope.data.imageio import decode_image

        report = BuildReport()
        with RunLock(self.dir):
            self._load_index(repair=True)
            if verify:
                self.verify()
            todo: dict[str, str] = {}
            for path, h in zip(paths, content_hashes):
                if h in self._slots and self._slots[h] not in self._bad:
                    report.reused += 1
                elif h not in todo:
                    todo[h] = path
            if not todo:
                return report

            def work(item: tuple[str, str]) -> tuple[str, str, np.ndarray | None, str]:
                h, path = item
                try:
                    return h, path, preprocess(decode_image(path), self.spec), ""
                except ImageDecodeError as err:
                    return h, path, None, err.reason

            items = list(todo.items())
            bar = tqdm(total=len(items), desc=f"cache {self.spec.size}px", unit="img", disable=not progress)
            chunk = 256
            try:
                with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, open(self.data_path, "ab") as fh:
                    for start in range(0, len(items), chunk):
                        results = list(pool.map(work, items[start : start + chunk]))
                        for h, path, img, reason in results:
                            if img is None:
                                report.failed[path] = reason
                                continue
                            data = np.ascontiguousarray(img, dtype=np.uint8).tobytes()
                            old = self._slots.get(h)
                            if old is not None and old in self._bad:  # repair in place
                                with open(self.data_path, "r+b") as rw:
                                    rw.seek(old * self._slot_bytes)
                                    rw.write(data)
                                    rw.flush()
                                    os.fsync(rw.fileno())
                                self._crc[old] = zlib.crc32(data)
                                self._bad.discard(old)
                                report.repaired += 1
                            else:
                                fh.write(data)
                                self._slots[h] = len(self._crc)
                                self._crc.append(zlib.crc32(data))
                                report.added += 1
                        fh.flush()
                        os.fsync(fh.fileno())
                        fault_point("cache_build")  # tests: killed here, the next open truncates the tail
                        self._write_index()  # data first, then the index that names it
                        self._mmap = None
                        bar.update(len(results))
            except OSError as err:
                # a full disk mid-append: the index still names only complete, fsynced slots
                disk = storage_error(self.data_path, err)
                if disk is None:
                    raise
                raise disk from None
            finally:
                bar.close()
        log.info("cache %s: %d added, %d reused, %d repaired, %d failed", self.dir, report.added,
                 report.reused, report.repaired, len(report.failed))
        return report


def build_cache(manifest_df, cache_root: str | os.PathLike[str], spec: PreprocessSpec, *,
                workers: int = 2, progress: bool = True) -> tuple[ImageCache, BuildReport]:
    """Cache every ``status == 'ok'`` row of a manifest table; returns the cache and the build report."""
    ok = manifest_df[manifest_df["status"] == "ok"]
    cache = ImageCache(cache_root, spec)
    report = cache.update(list(ok["path"]), list(ok["content_hash"]), workers=workers, progress=progress)
    return cache, report


def iter_chunks(n: int, size: int) -> Iterable[slice]:
    """Slices covering range(n) in steps of ``size``."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
