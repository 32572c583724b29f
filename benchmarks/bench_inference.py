"""Inference and serving benchmark: PyTorch eager vs ONNX Runtime, then the HTTP server under load.

1. The model (``--model``: a run, checkpoint or exported directory) is exported to a temporary
   directory with :func:`pneumoscope.export.export_onnx` (its parity check included).
2. Each backend is measured in its own fresh process (so its peak RSS is its own) on real test
   X-rays, decoded and preprocessed with the model's own preprocessing (``Predictor.prepare``):
   single-image latency p50/p99 of ``predict_u8`` (EvalPreset + network + calibration), the
   batch-1 throughput that implies, batch-32 throughput, and the per-image decode+preprocess
   time a server request adds.
3. ``python -m pneumoscope.serve`` is started as a subprocess on 127.0.0.1 (a free port) with the
   chosen backend (``--backend onnx`` serves the export, ``pytorch`` the original directory),
   ``--clients`` threads post real X-rays to ``/v1/predict`` for ``--seconds``, and the server's
   requests, errors, latency p50/p99, requests/s, the ratio to the backend's raw batch-1 rate and
   its peak RSS (``VmHWM``) are recorded. The server is always stopped (``try/finally``).

The clients run in this process on the same machine, so on a small CPU they take cores from the
server; the ratio to the raw rate includes that, HTTP, multipart parsing and JPEG decoding.
The server refuses more than 8 waiting requests (503): with more than 8 clients expect errors.

    PYTHONPATH=src python benchmarks/bench_inference.py --model runs/default
    PYTHONPATH=src python benchmarks/bench_inference.py --model /tmp/run --seconds 3 --clients 2  # smoke
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

# benchmarks/ is on sys.path (it is this script's folder); common also puts the working tree's src/ there.
from common import (REPO, DEFAULT_DATA, Timer, command_line, fmt, machine_info, md_table, peak_rss_mb, percentile,
                    proc_status_mb, rate, write_results)

log = logging.getLogger("bench_inference")
BACKEND_NAMES = {"pytorch": "PyTorch eager", "onnx": "ONNX Runtime"}
MAX_REQUESTS_PER_CLIENT = 1_000_000  # a bound on every client loop besides the deadline


# ----------------------------------------------------------------------------------- images
def select_test_images(data: Path, n: int) -> list[Path]:
    """``n`` real X-rays from ``data/test/<CLASS>/`` (else ``data``), classes alternated, evenly spread."""
    from pneumoscope.data.imageio import is_image_name

    split = data / "test" if (data / "test").is_dir() else data
    if not split.is_dir():
        raise SystemExit(f"{data}: not found; pass --data with the chest_xray folder")
    classes = [d for d in sorted(split.iterdir()) if d.is_dir() and not d.name.startswith(".")] or [split]
    per_class = [sorted(p for p in d.iterdir() if is_image_name(p) and not p.name.startswith("."))
                 for d in classes]
    per = -(-n // len(classes))
    picked = [[files[i] for i in np.linspace(0, len(files) - 1, min(per, len(files))).round().astype(int)]
              for files in per_class if files]
    out = [f for group in zip(*picked) for f in group] if picked else []
    if not out:
        raise SystemExit(f"{split}: no images")
    return out[:n]


# ----------------------------------------------------------------------------------- backends
def measure_backend(backend: str, model_dir: str, image_paths: list[str], *, latency_iters: int,
                    batch_iters: int, batch_size: int, warmup: int, threads: int | None) -> dict:
    """Runs in a fresh (spawned) process: load one backend and time it. Returns plain numbers."""
    import torch

    from pneumoscope.data.imageio import decode_image
    from pneumoscope.inference import backend_of, load_predictor

    if threads:
        torch.set_num_threads(threads)
    rss_start = peak_rss_mb()
    with Timer() as t_load:
        p = load_predictor(model_dir, backend=backend, threads=threads)
    assert backend_of(p) == backend, (backend_of(p), backend)
    blobs = [Path(f).read_bytes() for f in image_paths]
    prep_ms = []
    for name, data in zip(image_paths, blobs):  # what a server request does before the model
        t0 = time.perf_counter()
        p.prepare([decode_image(data, name=name)])
        prep_ms.append((time.perf_counter() - t0) * 1000)
    u8 = p.prepare([decode_image(d, name=n) for n, d in zip(image_paths, blobs)])
    n = len(u8)

    for i in range(warmup):
        p.predict_u8(u8[i % n : i % n + 1], batch_size=1)
    lat_ms = []
    for i in range(latency_iters):
        j = i % n
        t0 = time.perf_counter()
        p.predict_u8(u8[j : j + 1], batch_size=1)
        lat_ms.append((time.perf_counter() - t0) * 1000)

    batch = u8[torch.arange(batch_size) % n]
    p.predict_u8(batch, batch_size=batch_size)  # warm-up at this batch size
    batch_s = []
    for _ in range(batch_iters):
        t0 = time.perf_counter()
        p.predict_u8(batch, batch_size=batch_size)
        batch_s.append(time.perf_counter() - t0)

    mean_ms = float(np.mean(lat_ms))
    return {
        "backend": backend, "load_seconds": t_load.seconds, "images": n, "input_size": int(u8.shape[-1]),
        "torch_threads": torch.get_num_threads(), "ort_threads": threads,
        "latency_iters": latency_iters, "latency_ms": {"p50": percentile(lat_ms, 50), "p99": percentile(lat_ms, 99),
                                                       "mean": mean_ms, "min": float(np.min(lat_ms))},
        "batch1_images_per_s": 1000.0 / mean_ms if mean_ms > 0 else math.nan,
        "batch_size": batch_size, "batch_iters": batch_iters,
        "batch_images_per_s": rate(batch_size * batch_iters, sum(batch_s)),
        "decode_preprocess_ms": {"p50": percentile(prep_ms, 50), "mean": float(np.mean(prep_ms))},
        "peak_rss_mb": peak_rss_mb(), "peak_rss_before_load_mb": rss_start,  # VmHWM of this fresh process
    }


def measure_in_child(backend: str, model_dir: Path, image_paths: list[Path], args: argparse.Namespace) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        fut = pool.submit(measure_backend, backend, str(model_dir), [str(p) for p in image_paths],
                          latency_iters=args.latency_iters, batch_iters=args.batch_iters,
                          batch_size=args.batch_size, warmup=args.warmup, threads=args.threads)
        return fut.result()


# ----------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, log_path: Path, *, startup_s: float = 180.0,
                 extra_args: Sequence[str] = ()) -> tuple[subprocess.Popen, str]:
    """``python -m pneumoscope.serve [extra_args]`` on 127.0.0.1:<free port>; returns once ``/health`` answers 200."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH"))
                                                       if p)}
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen([sys.executable, "-m", "pneumoscope.serve", "--model", str(model_dir),
                                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                                 *extra_args],
                                stdout=log_fh, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_s
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    return proc, base
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy after {startup_s:g} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen) -> bool:
    """SIGINT (uvicorn's graceful shutdown), then SIGKILL after 15 s; True when it stopped by itself.

    uvicorn re-raises the captured SIGINT after shutting down, so a graceful stop exits with a
    ``KeyboardInterrupt`` traceback and code 1 (or -2): that is expected, not an error.
    """
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


def load_test(base: str, uploads: list[tuple[str, bytes]], *, clients: int, seconds: float,
              timeout_s: float = 60.0) -> dict:
    """``clients`` threads post one X-ray per request to ``/v1/predict`` until ``seconds`` have passed."""
    import httpx

    records: list[list[tuple[float, int]]] = [[] for _ in range(clients)]  # (latency ms, status or -1)
    errors: list[list[str]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1, timeout=120)
    deadline = [0.0]

    def client(k: int) -> None:
        with httpx.Client(base_url=base, timeout=timeout_s) as http:
            start.wait()
            i = k
            while time.perf_counter() < deadline[0] and len(records[k]) < MAX_REQUESTS_PER_CLIENT:
                name, data = uploads[i % len(uploads)]
                i += clients
                t0 = time.perf_counter()
                try:
                    status = http.post("/v1/predict", files={"files": (name, data, "image/jpeg")}).status_code
                except httpx.HTTPError as err:
                    status = -1
                    if len(errors[k]) < 5:
                        errors[k].append(f"{type(err).__name__}: {err}")
                records[k].append(((time.perf_counter() - t0) * 1000, status))

    threads = [threading.Thread(target=client, args=(k,), name=f"client-{k}", daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    t_start = time.perf_counter()
    deadline[0] = t_start + seconds
    start.wait()
    for t in threads:
        t.join(timeout=seconds + timeout_s + 30)
    elapsed = time.perf_counter() - t_start
    flat = [r for rs in records for r in rs]
    ok_ms = [ms for ms, status in flat if status == 200]
    statuses: dict[str, int] = {}
    for _, status in flat:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "clients": clients, "seconds": seconds, "elapsed_seconds": elapsed, "requests": len(flat),
        "ok": len(ok_ms), "errors": len(flat) - len(ok_ms), "status_counts": statuses,
        "error_samples": [e for es in errors for e in es][:5],
        "latency_ms": {"p50": percentile(ok_ms, 50), "p99": percentile(ok_ms, 99),
                       "mean": float(np.mean(ok_ms)) if ok_ms else math.nan},
        "requests_per_s": rate(len(ok_ms), elapsed),
        "clients_alive_after_join": sum(t.is_alive() for t in threads),
    }


def run_server_load(model_dir: Path, uploads: list[tuple[str, bytes]], backend: str, tmp: Path,
                    args: argparse.Namespace) -> dict:
    import httpx

    log_path = tmp / "server.log"
    with Timer() as t_start:
        proc, base = start_server(model_dir, log_path)
    result: dict = {"backend": backend, "startup_seconds": t_start.seconds, "server_pid": proc.pid}
    try:
        info = httpx.get(base + "/v1/model", timeout=10).json()
        if info.get("backend") != backend:
            raise RuntimeError(f"the server runs backend {info.get('backend')!r}, expected {backend!r}")
        result["server_rss_idle_mb"] = proc_status_mb(proc.pid, "VmRSS")
        for name, data in uploads[:2]:  # warm-up requests (first ORT run, first torch kernels)
            httpx.post(base + "/v1/predict", files={"files": (name, data, "image/jpeg")}, timeout=60)
        result.update(load_test(base, uploads, clients=args.clients, seconds=args.seconds))
        result["server_peak_rss_mb"] = proc_status_mb(proc.pid, "VmHWM")  # read before the process ends
        return result
    finally:
        graceful = stop_server(proc)
        result.update(server_stopped_gracefully=graceful, server_exit_code=proc.returncode)
        log.info("server stopped (%s, exit code %s)", "graceful" if graceful else "killed", proc.returncode)
        if not graceful:
            log.warning("server log tail:\n%s", log_path.read_text(errors="replace")[-2000:])


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="run, checkpoint or exported model directory")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="chest_xray folder (test/<CLASS>/*) "
                   "(default: %(default)s)")
    p.add_argument("--images", type=int, default=32, help="real test X-rays to cycle through (default: 32)")
    p.add_argument("--backend", choices=("onnx", "pytorch"), default="onnx", help="the server's backend")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=30.0, help="load duration (default: %(default)s)")
    p.add_argument("--latency-iters", type=int, default=200, help="timed single-image calls per backend")
    p.add_argument("--batch-iters", type=int, default=10, help="timed batches per backend")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5, help="untimed single-image calls first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch / ONNX Runtime intra-op threads for step 2 (default: the libraries' choice, "
                        "which is also what the server uses)")
    p.add_argument("--out-name", default=None, help="results file name (default: inference_<model>_<backend>)")
    p.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    args = p.parse_args(argv)
    if min(args.images, args.clients, args.latency_iters, args.batch_iters, args.batch_size) < 1 or args.seconds <= 0:
        p.error("--images, --clients, --latency-iters, --batch-iters, --batch-size and --seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("pneumoscope", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise SystemExit("bench_inference needs httpx: pip install -e '.[test]'") from None
    machine = machine_info()
    command = command_line([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])

    from pneumoscope.export import export_onnx
    from pneumoscope.inference import resolve_model_dir

    src_dir = resolve_model_dir(args.model)
    image_paths = select_test_images(args.data, args.images)
    uploads = [(p.name, p.read_bytes()) for p in image_paths]
    log.info("model %s; %d test X-rays from %s", src_dir, len(image_paths), args.data)

    with tempfile.TemporaryDirectory(prefix="pneumoscope-bench-inference-") as tmp_s:
        tmp = Path(tmp_s)
        log.info("exporting to ONNX ...")
        with Timer() as t_export:
            export = export_onnx(src_dir, tmp / "onnx", check_images=image_paths[:16], include_weights=False)
        dirs = {"pytorch": src_dir, "onnx": tmp / "onnx"}
        raw = {}
        for backend in ("pytorch", "onnx"):
            log.info("measuring %s in a fresh process ...", BACKEND_NAMES[backend])
            raw[backend] = measure_in_child(backend, dirs[backend], image_paths, args)
        log.info("server (%s) under %d clients for %g s ...", args.backend, args.clients, args.seconds)
        server = run_server_load(dirs[args.backend], uploads, args.backend, tmp, args)

    raw_b1 = raw[args.backend]["batch1_images_per_s"]
    server["ratio_to_raw_batch1"] = server["requests_per_s"] / raw_b1 if raw_b1 > 0 else math.nan
    meta_name = str(args.model.resolve().name)
    out_name = args.out_name or f"inference_{meta_name}_{args.backend}"

    rows = [[BACKEND_NAMES[b], fmt(r["load_seconds"], 2), fmt(r["latency_ms"]["p50"], 2), fmt(r["latency_ms"]["p99"], 2),
             fmt(r["batch1_images_per_s"]), fmt(r["batch_images_per_s"]), fmt(r["decode_preprocess_ms"]["mean"], 2),
             fmt(r["peak_rss_mb"], 0)] for b, r in raw.items()]
    s = server
    table = "\n\n".join([
        f"Model `{src_dir}` ({raw['pytorch']['input_size']} px), {len(image_paths)} real test X-rays; "
        f"ONNX export {fmt(t_export.seconds, 1)} s, parity max |Δp| = {export['parity']['max_abs_diff_prob']:.1e}.",
        md_table(["backend", "load s", "1-image p50 ms", "1-image p99 ms", "batch-1 img/s",
                  f"batch-{args.batch_size} img/s", "decode+preprocess ms/img", "peak RSS MiB"], rows),
        md_table(["server", "requests", "errors", "p50 ms", "p99 ms", "req/s", "÷ raw batch-1", "server peak RSS MiB"],
                 [[f"`python -m pneumoscope.serve` ({BACKEND_NAMES[args.backend]}), {args.clients} clients × "
                   f"{args.seconds:g} s", s["requests"], s["errors"], fmt(s["latency_ms"]["p50"], 1),
                   fmt(s["latency_ms"]["p99"], 1), fmt(s["requests_per_s"]), f"{fmt(s['ratio_to_raw_batch1'], 2)}×",
                   fmt(s["server_peak_rss_mb"], 0)]]),
        f"Single-image requests, so the server is compared with the batch-1 rate of its backend. "
        f"Clients run on the same machine. Status counts: {s['status_counts']}. Peak RSS includes importing "
        f"torch (~{fmt(raw['pytorch']['peak_rss_before_load_mb'], 0)} MiB before the model is loaded).",
    ])
    payload = {
        "model_dir": str(src_dir), "images": [str(p) for p in image_paths], "backend_served": args.backend,
        "export": {**export, "seconds": t_export.seconds}, "raw": raw, "server": server,
        "bench_peak_rss_mb": peak_rss_mb(), "load_avg_end": [round(x, 2) for x in os.getloadavg()],
    }
    json_path, md_path = write_results(out_name, payload, table, command, results_dir=args.results_dir,
                                       machine=machine)
    sys.stdout.write(table + f"\n\nwrote {json_path} and {md_path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
