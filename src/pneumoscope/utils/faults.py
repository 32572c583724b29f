"""Fault injection for the reliability tests: ``PNEUMOSCOPE_FAULT=<point>:<n>`` kills the process
with SIGKILL at the ``n``-th time (1-based) the named point is reached.

Why: "a kill at any moment leaves a usable state" is only believable when the test can put the
kill at the worst moments - between writing a checkpoint's files and moving its pointer, halfway
through appending to the image cache, in the middle of an epoch - reproducibly, instead of hoping
a timer lands there. SIGKILL (not an exception) so that no ``finally``, ``atexit`` or buffered
write runs: exactly what the OOM killer or a pulled plug does.

Points (see the callers): ``atomic_write`` (temp file written and fsynced, not yet renamed),
``checkpoint_write`` (checkpoint files written, pointer not yet replaced), ``cache_build`` (a
chunk of images appended to ``images.u8``, index not yet rewritten), ``train_step`` (after an
optimiser step, inside an epoch), ``predict_batch`` (a batch predicted, the CSV not yet rewritten).

Zero cost when unset: the variable is read once at import, and :func:`fault_point` is then a
dictionary lookup on an empty dict. Several points may be armed at once, comma-separated
(``checkpoint_write:2,train_step:7``). Never set it outside tests.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "PNEUMOSCOPE_FAULT"

log = logging.getLogger(__name__)


def _parse(spec: str) -> dict[str, int]:
    armed: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, n = item.partition(":")
        try:
            armed[name.strip()] = max(1, int(n or 1))
        except ValueError:
            log.warning("%s: ignoring malformed entry %r (expected <point>:<n>)", ENV, item)
    return armed


_ARMED: dict[str, int] = _parse(os.environ.get(ENV, ""))
_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Count a pass through ``name``; SIGKILL this process on the armed pass (no-op when unarmed)."""
    if name not in _ARMED:
        return
    _HITS[name] = _HITS.get(name, 0) + 1
    if _HITS[name] == _ARMED[name]:
        os.kill(os.getpid(), signal.SIGKILL)
