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

**Opt-in** (``PNEUMOSCOPE_MALLOC=tuned``): the CLI's batch commands, ``fit`` and
``evaluate_model`` call :func:`tune_malloc`, which does nothing unless the variable asks for it.
Why not on by default: a whole main job (``pneumoscope run``: feature pass, 10 epochs, TTA-8
evaluation) with the tuned thresholds peaked at 14.8 GB resident instead of 3.1 GB — freed
blocks of many sizes stay in the heap and fragment it — against the 4 GB training target. Until a
setting is found that keeps the speed without the growth (a lower trim threshold, or an arena
limit), it is for short batch jobs on a machine with memory to spare. Other C libraries (musl,
macOS) are left as they are.
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

_applied: bool | None = None


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("PNEUMOSCOPE_MALLOC", "").lower() not in ("tuned", "on", "1", "yes"):
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
    log.debug("glibc malloc thresholds raised: %s", _applied)
    return _applied
