"""Model tests run single-threaded.

The forward passes here are tiny (batch 1-2, 64 px); on a small CPU shared with a training job,
torch's OpenMP worker threads spin-wait against the other process and the suite ran 6-8x slower
with the default thread count (≈170-245 s vs 28 s measured on the 2-core dev box). One thread also
keeps the exact-equality checks free of thread-count-dependent reduction orders. The previous
setting is restored after each module, so tests elsewhere are unaffected.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
