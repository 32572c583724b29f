"""The main job: data check → train → evaluate on test → report, in one output folder.

Each step is one library call; a step whose output already exists and is complete is skipped, so
an interrupted main job continues where it stopped (training resumes from its last checkpoint).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pneumoscope.data.paths import resolve_data_root

log = logging.getLogger(__name__)


def main_job(data: str | None, out: Path, *, config: str = "default", overrides: list[str] | None = None,
             progress: bool = True) -> int:
    from pneumoscope.config import load_config
    from pneumoscope.data.check import check_command
    from pneumoscope.evaluate.run import evaluate_model
    from pneumoscope.train.fit import fit

    root = resolve_data_root(data)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    cfg = load_config(config, overrides or [])
    log.info("[1/4] data check of %s", root)
    # the check reports the same validation split the training run will cut
    check_rc = check_command(str(root), out / "data_check", val_fraction=cfg.data.val_fraction, seed=cfg.seed,
                             split_method=cfg.data.split, val_source=cfg.data.val_source, progress=progress)
    # Training and evaluation read the data check's manifest instead of scanning (and decoding
    # every image) again; it is re-split there by the run's own seed and split method.
    manifest_path = out / "data_check" / "manifest.parquet"
    source = manifest_path if manifest_path.exists() else root
    timings["data_check"] = time.perf_counter() - t0

    run_dir = out / "runs" / cfg.name
    t = time.perf_counter()
    if (run_dir / "summary.json").exists():
        log.info("[2/4] training: %s already finished, skipping", run_dir)
    else:
        resume = (run_dir / "checkpoints" / "last.json").exists()
        log.info("[2/4] training %s into %s%s", config, run_dir, " (resuming)" if resume else "")
        fit(cfg, run_dir, data_root=source, resume=resume, progress=progress)
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    log.info("[3/4] evaluating on the official test split")
    res = evaluate_model(run_dir, source, split="test", progress=progress)
    timings["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    report_path = None
    try:
        from pneumoscope.report.html import build_report
    except ImportError:
        build_report = None
    if build_report is not None:
        log.info("[4/4] writing the report")
        report_path = build_report(run_dir, out / "report.html", data_check_dir=out / "data_check")
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    from pneumoscope.utils.io import atomic_write_json

    atomic_write_json(out / "timings.json", timings)
    m = res["metrics"]
    log.info("test: accuracy %.4f, sensitivity %s, specificity %s, AUROC %.4f (threshold %.4f from validation)",
             m["accuracy"], m.get("sensitivity"), m.get("specificity"), m.get("auroc", m.get("macro_auroc", float("nan"))),
             res["threshold"]["value"])
    log.info("timings (s): %s", {k: round(v, 1) for k, v in timings.items()})
    if report_path:
        log.info("report: %s", report_path)
    return 0 if check_rc in (0, 1) else check_rc
