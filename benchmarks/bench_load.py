"""Load test of the real server with mixed good and hostile uploads (reliability issue #9).

``python -m pneumoscope.serve`` (the bundled default model unless ``--model``) is started on
127.0.0.1 in a subprocess; ``--clients`` threads then post for ``--seconds``, each request drawn
(seeded) from:

=================  ==========================================================  ============
kind               what is sent                                                expected
=================  ==========================================================  ============
``good``           a real test X-ray (JPEG), multipart field ``files``           200
``garbage``        random bytes named ``.jpeg``                                  422
``truncated``      the first half of a real X-ray                                422
``too_many_px``    a valid PNG header claiming 40000 x 40000 pixels              422
``oversize``       a body over the server's upload limit                         413
``not_multipart``  a JSON body instead of ``multipart/form-data``                422
=================  ==========================================================  ============

Good requests that get ``503 server busy`` (the server sheds load beyond 8 waiting requests) are
retried after a short pause, as a client honouring back-pressure does; the 503s are counted, and a
good request counts as a server error only if it finally gets another 5xx, a connection error or
is still refused after 60 s of retries. Recorded: requests per kind and status, server errors for good requests
(target 0), share of bad requests answered with a 4xx (target 100 %), latency p50/p95 per kind,
and the server's RSS (``/proc/<pid>/status`` ``VmRSS``) every second with a least-squares slope
in MB/min over the load (and after its first 10 s, the warm-up allocations), the peak RSS
(``VmHWM``), written to ``results/<name>.json`` / ``.md``.

    python benchmarks/bench_load.py                       # 16 clients x 60 s, bundled model
    python benchmarks/bench_load.py --seconds 5 --clients 4 --results-dir /tmp/bench   # smoke
"""

from __future__ import annotations

import argparse
import logging
import random
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from common import (DEFAULT_DATA, command_line, fmt, machine_info, md_table, percentile, proc_status_mb,
                    write_results)

log = logging.getLogger("bench_load")
KINDS = ("good", "garbage", "truncated", "too_many_px", "oversize", "not_multipart")
#: How long a client keeps retrying a good request answered 503 (back-pressure) before giving up.
RETRY_503_SECONDS = 60.0
#: RSS samples before this many seconds of load are warm-up (thread pools, allocator arenas).
WARMUP_S = 10.0


def _png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def build_payloads(data: Path, n_images: int, max_upload: int, seed: int = 0) -> dict[str, list[tuple[str, bytes]]]:
    """The request bodies of each kind (real X-rays from ``data/test/<CLASS>/``)."""
    files = []
    for cls in ("NORMAL", "PNEUMONIA"):
        files += sorted((data / "test" / cls).glob("*.jpeg"))[: n_images // 2]
    if not files:
        raise SystemExit(f"{data}: no test X-rays found (expected test/NORMAL/*.jpeg); pass --data")
    rng = random.Random(seed)
    good = [(p.name, p.read_bytes()) for p in files]
    return {
        "good": good,
        "garbage": [(f"noise{i}.jpeg", rng.randbytes(rng.randint(100, 50_000))) for i in range(8)],
        "truncated": [(f"cut-{n}", b[: len(b) // 2]) for n, b in good[:8]],
        "too_many_px": [("bomb.png", _png_bomb())],
        "oversize": [("big.jpeg", good[0][1] + b"\0" * (max_upload + 1))],
        "not_multipart": [("-", b"")],
    }


def run_load(base: str, payloads: dict, *, clients: int, seconds: float, good_share: float, seed: int,
             timeout_s: float = 120.0) -> list[dict]:
    """``clients`` threads send requests until ``seconds`` pass; one record per request."""
    import httpx

    bad_kinds = [k for k in KINDS if k != "good"]
    records: list[list[dict]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1, timeout=120)
    deadline = [0.0]

    def send(http: httpx.Client, kind: str, name: str, body: bytes) -> int:
        if kind == "not_multipart":
            return http.post("/v1/predict", json={"files": ["a.jpeg"]}).status_code
        return http.post("/v1/predict", files={"files": (name, body, "image/jpeg")}).status_code

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with httpx.Client(base_url=base, timeout=timeout_s) as http:
            barrier.wait()
            while time.perf_counter() < deadline[0]:
                kind = "good" if rng.random() < good_share else rng.choice(bad_kinds)
                name, body = rng.choice(payloads[kind])
                t0 = time.perf_counter()
                busy, status, error = 0, None, ""
                while True:
                    try:
                        status = send(http, kind, name, body)
                    except httpx.HTTPError as err:
                        status, error = -1, f"{type(err).__name__}: {err}"[:200]
                        if kind == "oversize":  # the server may close the connection on a refused body
                            http.close()
                            http = httpx.Client(base_url=base, timeout=timeout_s)
                    if status == 503 and kind == "good" and time.perf_counter() - t0 < RETRY_503_SECONDS:
                        busy += 1
                        time.sleep(0.05 + 0.05 * rng.random())
                        continue
                    break
                records[k].append({"kind": kind, "status": status, "ms": (time.perf_counter() - t0) * 1000,
                                   "busy_retries": busy, "error": error})

    threads = [threading.Thread(target=client, args=(k,), name=f"client-{k}", daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    barrier.wait()
    for t in threads:
        t.join(timeout=seconds + timeout_s + 60)
    return [r for rs in records for r in rs]


class RssSampler(threading.Thread):
    """``VmRSS`` of ``pid`` every ``interval`` seconds: ``[(seconds since start, MiB), ...]``."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()
        self._t0 = time.perf_counter()

    def run(self) -> None:
        while not self._halt.is_set():
            mb = proc_status_mb(self.pid, "VmRSS")
            if mb is not None:
                self.samples.append((time.perf_counter() - self._t0, mb))
            self._halt.wait(self.interval)

    def stop(self) -> list[tuple[float, float]]:
        self._halt.set()
        self.join(timeout=5)
        return self.samples


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS over time, MB/min (NaN with fewer than 3 samples)."""
    if len(samples) < 3:
        return float("nan")
    t, mb = np.asarray(samples, dtype=np.float64).T
    return float(np.polyfit(t / 60.0, mb, 1)[0])


def summarize(records: list[dict], samples: list[tuple[float, float]], elapsed: float) -> dict:
    by_kind: dict[str, dict] = {}
    for kind in KINDS:
        rs = [r for r in records if r["kind"] == kind]
        statuses: dict[str, int] = {}
        for r in rs:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        ms = [r["ms"] for r in rs]
        by_kind[kind] = {"requests": len(rs), "status_counts": dict(sorted(statuses.items())),
                         "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
                         "busy_503_retries": sum(r["busy_retries"] for r in rs),
                         "error_samples": sorted({r["error"] for r in rs if r["error"]})[:3]}
    good = [r for r in records if r["kind"] == "good"]
    bad = [r for r in records if r["kind"] != "good"]
    good_server_errors = [r for r in good if r["status"] == -1 or r["status"] >= 500]
    good_ok = [r for r in good if r["status"] == 200]
    bad_4xx = [r for r in bad if 400 <= r["status"] < 500]
    warm = [s for s in samples if s[0] >= WARMUP_S]
    mbs = [mb for _, mb in samples]
    return {
        "elapsed_seconds": elapsed, "requests": len(records), "requests_per_s": len(records) / elapsed,
        "good": {"requests": len(good), "ok_200": len(good_ok), "server_errors": len(good_server_errors),
                 "other_status": len(good) - len(good_ok) - len(good_server_errors),
                 "busy_503_retries": sum(r["busy_retries"] for r in good),
                 "p50_ms": percentile([r["ms"] for r in good_ok], 50),
                 "p95_ms": percentile([r["ms"] for r in good_ok], 95)},
        "bad": {"requests": len(bad), "answered_4xx": len(bad_4xx),
                "share_4xx": len(bad_4xx) / len(bad) if bad else float("nan"),
                "not_4xx": sorted({f"{r['kind']}:{r['status']}" for r in bad if not 400 <= r["status"] < 500})},
        "by_kind": by_kind,
        "rss": {"samples": [(round(t, 2), round(mb, 1)) for t, mb in samples],
                "start_mb": mbs[0] if mbs else None, "end_mb": mbs[-1] if mbs else None,
                "max_mb": max(mbs) if mbs else None,
                "slope_mb_per_min": slope_mb_per_min(samples),
                "slope_after_warmup_mb_per_min": slope_mb_per_min(warm),
                "warmup_seconds": WARMUP_S},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="run, checkpoint or exported model (default: bundled)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="chest_xray folder (default: %(default)s)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--good-share", type=float, default=0.5, help="fraction of requests that are good X-rays")
    p.add_argument("--images", type=int, default=32, help="real X-rays to cycle through")
    p.add_argument("--max-upload-bytes", type=int, default=5_000_000,
                   help="the server's limit (the oversize kind sends one byte more than this)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-name", default="load_default")
    p.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from bench_inference import stop_server  # the same graceful stop as the inference benchmark

    from pneumoscope.bundle import resolve_model

    model = resolve_model(args.model)
    machine = machine_info()
    payloads = build_payloads(args.data, args.images, args.max_upload_bytes, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        proc, base = _start(model, log_path, args.max_upload_bytes)
        try:
            import httpx

            info = httpx.get(base + "/v1/model", timeout=30).json()
            for name, body in payloads["good"][:2]:  # warm-up (first kernels)
                httpx.post(base + "/v1/predict", files={"files": (name, body, "image/jpeg")}, timeout=120)
            idle = proc_status_mb(proc.pid, "VmRSS")
            sampler = RssSampler(proc.pid)
            sampler.start()
            t0 = time.perf_counter()
            records = run_load(base, payloads, clients=args.clients, seconds=args.seconds,
                               good_share=args.good_share, seed=args.seed)
            elapsed = time.perf_counter() - t0
            samples = sampler.stop()
            peak = proc_status_mb(proc.pid, "VmHWM")
            alive = proc.poll() is None
        finally:
            graceful = stop_server(proc)
            server_log = log_path.read_text(errors="replace")
    res = summarize(records, samples, elapsed)
    res.update(model=str(model), model_id=f"{info.get('name')}:{info.get('run_name')}", backend=info.get("backend"),
               clients=args.clients, seconds=args.seconds, good_share=args.good_share,
               max_upload_bytes=args.max_upload_bytes, server_rss_idle_mb=idle, server_peak_rss_mb=peak,
               server_alive_after_load=alive, server_stopped_gracefully=graceful,
               server_unhandled_errors=server_log.count("unhandled error"))
    g, b, r = res["good"], res["bad"], res["rss"]
    verdict = ("PASS" if g["server_errors"] == 0 and b["share_4xx"] == 1.0 and alive else "FAIL")
    kinds = md_table(["kind", "requests", "status counts", "p50 ms", "p95 ms", "503 retries"],
                     [[k, v["requests"], ", ".join(f"{s}: {n}" for s, n in v["status_counts"].items()),
                       fmt(v["p50_ms"]), fmt(v["p95_ms"]), v["busy_503_retries"]] for k, v in res["by_kind"].items()])
    table = "\n\n".join([
        f"`python -m pneumoscope.serve` ({res['model_id']}, {res['backend']}) on 127.0.0.1, {args.clients} clients × "
        f"{args.seconds:g} s, {args.good_share:.0%} good X-rays; upload limit {args.max_upload_bytes:,} bytes.",
        md_table(["requests", "req/s", "good → 200", "good server errors (target 0)", "bad → 4xx (target 100 %)",
                  "good p50 / p95 ms", "503 retries (good)"],
                 [[res["requests"], fmt(res["requests_per_s"]), f"{g['ok_200']} / {g['requests']}", g["server_errors"],
                   f"{b['answered_4xx']} / {b['requests']} ({b['share_4xx']:.1%})",
                   f"{fmt(g['p50_ms'])} / {fmt(g['p95_ms'])}", g["busy_503_retries"]]]),
        kinds,
        md_table(["server RSS idle MiB", "start → end MiB", "max MiB", "peak (VmHWM) MiB", "slope MB/min",
                  f"slope after {WARMUP_S:g} s warm-up MB/min"],
                 [[fmt(idle, 0), f"{fmt(r['start_mb'], 0)} → {fmt(r['end_mb'], 0)}", fmt(r["max_mb"], 0),
                   fmt(peak, 0), fmt(r["slope_mb_per_min"], 2), fmt(r["slope_after_warmup_mb_per_min"], 2)]]),
        f"**Verdict: {verdict}** (0 server errors for good requests, every bad request a 4xx, server alive). "
        f"{len(r['samples'])} RSS samples, one per second. Unhandled errors in the server log: "
        f"{res['server_unhandled_errors']}. "
        "Latencies are end-to-end per request (a good request's 503 retries included). "
        "Clients run on the same machine and take CPU from the server.",
    ])
    json_path, md_path = write_results(args.out_name, res, table, command_line(), results_dir=args.results_dir,
                                       machine=machine)
    sys.stdout.write(table + "\n")
    log.info("written %s and %s", json_path, md_path)
    return 0 if verdict == "PASS" else 1


def _start(model: Path, log_path: Path, max_upload: int):  # noqa: ANN202
    """``python -m pneumoscope.serve`` with our upload limit on a free port."""
    from bench_inference import start_server

    return start_server(model, log_path, startup_s=300.0, extra_args=("--max-upload-bytes", str(max_upload)))


if __name__ == "__main__":
    sys.exit(main())
