"""Helpers shared by the benchmark scripts: machine description, timing, peak memory, results files.

Every benchmark writes ``results/<name>.json`` (machine, exact command, numbers, the Markdown
table) and ``results/<name>.md`` (the same for people), both atomically through
:mod:`pneumoscope.utils.io`, so an interrupted run never leaves half a results file.
The scripts import this module as ``common`` (Python puts a script's own folder first on
``sys.path``); tests load it by path.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"
#: The dataset the benchmarks read by default (never copied into the repository).
DEFAULT_DATA = Path(os.environ.get("PNEUMOSCOPE_DATA") or REPO.parent / "shared" / "data" / "chest_xray")
#: Environment variables that change what a benchmark measures; echoed in the command line.
_PERF_ENV = ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PNEUMOSCOPE_DATA", "PNEUMOSCOPE_CACHE",
             "PNEUMOSCOPE_MALLOC")

if str(REPO / "src") not in sys.path and (REPO / "src" / "pneumoscope").is_dir():
    # The benchmarks measure the working tree's code, also when PYTHONPATH was not set.
    sys.path.insert(0, str(REPO / "src"))


# ----------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError):
        pass
    return None


def _git_commit() -> str | None:
    """``HEAD`` of the repository (read-only), with ``+dirty`` when the tree has changes."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, RAM, library versions, threads, current load."""
    import numpy as np
    import torch

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gb": _mem_total_gb(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "cuda": torch.cuda.is_available(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
    }
    for mod in ("torchvision", "onnxruntime", "pneumoscope"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def machine_line(m: dict[str, Any]) -> str:
    """One Markdown line describing the machine of a result, with a warning when it was busy."""
    load = m.get("load_avg")
    cores = m.get("cpu_affinity") or m.get("cpu_count") or 1
    line = (f"{m.get('cpu_model')} · {cores} cores · {m.get('ram_gb')} GB RAM · Python {m.get('python')} · "
            f"torch {m.get('torch')} ({m.get('torch_threads')} threads) · onnxruntime {m.get('onnxruntime')} · "
            f"commit {m.get('git_commit')}")
    if load:
        line += f" · load avg at start {load[0]}"
        if load[0] >= 0.5 * cores:
            line += (f" · **⚠ busy machine** (load {load[0]} on {cores} cores): other processes shared the CPU, "
                     "so these numbers are lower and noisier than on a quiet machine")
    return line


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run: the performance-relevant environment plus ``python argv``."""
    argv = list(sys.argv if argv is None else argv)
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in _PERF_ENV if os.environ.get(k)]
    return " ".join([*env, "python", *(shlex.quote(a) for a in argv)])


# ----------------------------------------------------------------------------------- measuring
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB.

    ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux, bytes on macOS), except that on
    Linux ``/proc/self/status`` ``VmHWM`` is preferred: the kernel carries the parent's peak into
    ``ru_maxrss`` across fork+exec, so a freshly spawned measuring process would otherwise report
    its parent's peak (measured: a 500 MB parent made an 8 MB child report 510 MB).
    """
    hwm = proc_status_mb(os.getpid(), "VmHWM") if sys.platform.startswith("linux") else None
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024**2 if sys.platform == "darwin" else 1024)


def proc_status_mb(pid: int, field: str = "VmHWM") -> float | None:
    """A memory field of ``/proc/<pid>/status`` in MiB (``VmHWM`` = peak RSS, ``VmRSS`` = current)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Timer:
    """Wall-clock timer (``time.perf_counter``): ``with Timer() as t: ...; t.seconds``."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.seconds: float = math.nan

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - (self.start or 0.0)

    @property
    def elapsed(self) -> float:
        """Seconds since the start (also inside the ``with`` block)."""
        return time.perf_counter() - (self.start or 0.0)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation, like ``numpy.percentile``); NaN when empty."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else math.nan


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.nan


def fmt(x: float | None, digits: int = 1) -> str:
    """A number for a table cell ("–" for missing/NaN), with thousands separators."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:,.{digits}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- results
def write_results(name: str, payload: dict, table_md: str, command: str, *,
                  results_dir: str | os.PathLike[str] | None = None,
                  machine: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``<results_dir>/<name>.json`` and ``<name>.md`` atomically; returns both paths.

    ``machine`` defaults to :func:`machine_info` now; pass the one taken at the start of the run
    so its load average describes the machine the benchmark started on.
    """
    from pneumoscope.utils.io import atomic_write_json, atomic_write_text

    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"results name must be a plain file name, got {name!r}")
    out = Path(results_dir) if results_dir is not None else DEFAULT_RESULTS_DIR
    machine = dict(machine) if machine is not None else machine_info()
    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    doc = {"name": name, "created_utc": created, "command": command, "cwd": os.getcwd(),
           "machine": machine, "results": payload, "table_md": table_md}
    md = (f"# {name}\n\n{created} · `{command}`\n\nMachine: {machine_line(machine)}\n\n"
          f"{table_md.rstrip()}\n")
    json_path = atomic_write_json(out / f"{name}.json", doc)
    md_path = atomic_write_text(out / f"{name}.md", md)
    return json_path, md_path


def add_common_args(ap: Any, out_name: str) -> None:
    """``--data`` (default ``$PNEUMOSCOPE_DATA``), ``--results-dir`` and ``--out-name``."""
    ap.add_argument("--data", default=os.environ.get("PNEUMOSCOPE_DATA", "../shared/data/chest_xray"))
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--out-name", default=out_name)


def save_figure(fig: Any, path: Path) -> Path:
    """A matplotlib figure as PNG, atomically, then closed."""
    import matplotlib.pyplot as plt

    from pneumoscope.utils.io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def publish(args: Any, payload: dict, table_md: str, machine: dict[str, Any]) -> None:
    """``write_results`` under ``args.out_name`` / ``args.results_dir``, then print the table and the paths."""
    j, md = write_results(args.out_name, payload, table_md, command_line(), results_dir=args.results_dir,
                          machine=machine)
    print(table_md)
    print(f"wrote {j} and {md}")
