"""The load benchmark's bookkeeping: which requests count as server errors, the 4xx share of bad
requests, and the RSS slope. The load run itself lives in ``benchmarks/`` (no timing in tests)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench_load():  # noqa: ANN201
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("pneumoscope_benchmarks_bench_load", BENCH / "bench_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rec(kind: str, status: int, ms: float = 10.0, busy: int = 0) -> dict:
    return {"kind": kind, "status": status, "ms": ms, "busy_retries": busy, "error": "" if status > 0 else "boom"}


def test_summary_counts_server_errors_and_4xx_share(bench_load) -> None:  # noqa: ANN001
    records = [_rec("good", 200, busy=3), _rec("good", 200), _rec("good", 503), _rec("good", -1),
               _rec("garbage", 422), _rec("oversize", 413), _rec("truncated", 503), _rec("not_multipart", 422)]
    samples = [(float(t), 100.0 + 2.0 * t / 60.0) for t in range(0, 61)]  # +2 MB/min exactly
    res = bench_load.summarize(records, samples, elapsed=2.0)
    assert res["good"] == {**res["good"], "requests": 4, "ok_200": 2, "server_errors": 2, "busy_503_retries": 3}
    assert res["bad"]["answered_4xx"] == 3 and res["bad"]["share_4xx"] == pytest.approx(0.75)
    assert res["bad"]["not_4xx"] == ["truncated:503"]
    assert res["by_kind"]["good"]["status_counts"] == {"-1": 1, "200": 2, "503": 1}
    assert res["rss"]["slope_mb_per_min"] == pytest.approx(2.0)
    assert res["rss"]["slope_after_warmup_mb_per_min"] == pytest.approx(2.0)
    assert math.isnan(bench_load.slope_mb_per_min([(0.0, 1.0)]))


def test_payloads_have_every_kind_and_a_real_oversize_body(bench_load, data_root: Path) -> None:  # noqa: ANN001
    payloads = bench_load.build_payloads(data_root, 4, max_upload=10_000)
    assert set(payloads) == set(bench_load.KINDS)
    assert len(payloads["oversize"][0][1]) > 10_000 and payloads["good"][0][1][:2] == b"\xff\xd8"
    from pneumoscope.data.imageio import read_image
    from pneumoscope.errors import ImageDecodeError

    for kind in ("garbage", "truncated", "too_many_px"):
        for name, body in payloads[kind]:
            with pytest.raises(ImageDecodeError):
                read_image(body, name=name)
