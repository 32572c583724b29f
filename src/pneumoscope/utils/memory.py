"""Keep glibc from returning freed tensor memory to the kernel after every batch.

Why: glibc ``malloc`` serves every block above ``M_MMAP_THRESHOLD`` (128 KiB, raised dynamically
to at most 32 MiB) with its own ``mmap`` and gives it back with ``munmap`` on ``free``. A CNN
forward pass on a batch of 224-px images allocates and frees dozens of activations larger than
that, so every batch maps fresh pages and the kernel zero-fills each one on first touch. Measured
on the 2-core development machine (EfficientNet-Lite0, batch 64, channels_last, inference):
~670,000 minor page faults per batch and a third of the CPU time in the kernel; with the two
settings below, ~0 faults per batch and 1.5–1.8x the images per second, for ~0.3–0.5 GB more
resident memory (freed blocks stay in the heap for the next batch). PyTorch's CPU allocator has
no caching of its own; jemalloc/tcmalloc via ``LD_PRELOAD`` fix the same thing, but cannot be
switched on from inside a running process, while ``mallopt`` can.

**On by default for batch work; ``PNEUMOSCOPE_MALLOC=default`` switches it off.** The CLI's
batch commands, ``fit`` and ``evaluate_model`` call :func:`tune_malloc`, and :func:`release_memory`
trims the heap between phases (after a feature pass, each epoch, each evaluation pass). The
server never tunes, for its small steady footprint. Measured on the whole main job
(``benchmarks/results/main_job.md``): feature pass 170 s instead of 325 s, peak RSS 3.7 GB.
History: on 2026-12-01 this was first made opt-in after a main job peaked at 14.8 GB with it;
that peak was not the allocator's: ``evaluate --tta`` ran each TTA pass over a whole split in one
batch (13.2 GB with glibc's defaults too), fixed the same day. Other C libraries (musl, macOS)
are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap and are reused; larger ones are still mmapped
MMAP_THRESHOLD = 512 * 1024 * 1024
#: free memory at the top of the heap is returned to the kernel only beyond this much
TRIM_THRESHOLD = 1024 * 1024 * 1024

#: values of ``PNEUMOSCOPE_MALLOC`` that leave glibc's own behaviour (anything else tunes)
OFF = ("default", "glibc", "off", "0", "no", "false")

_applied: bool | None = None
_libc = None


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they are in effect."""
    global _applied, _libc
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("PNEUMOSCOPE_MALLOC", "tuned").lower() in OFF:
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _applied = bool(ok)
    _libc = libc if _applied else None
    log.debug("glibc malloc thresholds raised: %s", _applied)
    return _applied


def release_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc ``malloc_trim(0)``, all arenas).

    Only when :func:`tune_malloc` is in effect (otherwise glibc already unmaps large blocks and
    this is a no-op returning False). Called between the phases of a job — after a feature pass,
    after each epoch, after each evaluation pass — so the blocks kept for reuse within a phase do
    not pile up across phases of different shapes, while every batch inside a phase still reuses
    the heap.
    """
    if _libc is None:
        return False
    try:
        trim = _libc.malloc_trim
    except AttributeError:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
