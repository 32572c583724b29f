"""``pneumoscope sweep FILE``: a grid or list of config overrides → one run per point, resumable, one table.

A sweep file (see ``experiments/roadmap.yaml``)::

    name: roadmap
    base: seed-cnn3                 # built-in config name, or a YAML path relative to this file
    set: {train.early_stopping: null}          # overrides for every point (dotted keys, YAML values)
    select: val_auroc               # winners are chosen on this validation metric (never on test)
    test: {bootstrap: 1000, tta: 0} # how the chosen runs are evaluated on the test split, once
    reduced:                        # applied with --reduced, after every point's own overrides
      set: {data.limit_per_class: 300, preprocess.size: 128}
      max_epochs: 3                 # caps the epochs of every phase
    experiments:
      loss:                         # one experiment = one small grid or list of points
        grid: {train.loss.name: [bce, focal]}       # cartesian product of the lists
      augmentation:
        points:                     # or named points, each a mapping of overrides
          none: {augment.hflip: 0.0, augment.rotate: 0.0}
      finetune:
        base: other-config          # an experiment may have its own base, set and reduced sections
        points: {...}
    ensemble: {top: 3, rule: val_weighted}   # the ensemble of the best experiment winners

Each point is trained with :func:`pneumoscope.train.fit.fit` into ``OUT/<experiment>/<point>``,
where ``<point>`` is the point's name or, for a grid, ``key=value`` pairs of its overrides (last key
component, filesystem-safe, stable across runs). The dataset is scanned once per sweep (the
manifest is kept in ``OUT/manifest.parquet`` for restarts) and re-split by each point's own seed.

Resumable: a point whose run directory has ``summary.json`` and the same resolved config is
skipped; an unfinished one continues from its last checkpoint (``fit(resume=True)``, the
``train --resume`` mechanism); a run directory holding another config is refused, never
overwritten. So a killed sweep is continued by starting the same command again.

Results (``OUT/results.csv``, ``OUT/results.md``, ``OUT/val_<metric>.png``, ``OUT/sweep.json``):
one row per point with its validation metrics (what the winners are chosen on) and training
time; the winner of each experiment (best validation metric, ties to the lower validation loss);
then, in a separate, labelled table, the test-split metrics of the winners and of the ensemble,
each evaluated once (``RUN/eval/test``) and never used for any choice.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pneumoscope.config import RunConfig, _read_yaml, config_to_dict, validate_config
from pneumoscope.errors import ConfigError, PneumoscopeError
from pneumoscope.utils.io import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

TOP_KEYS = {"name", "base", "set", "select", "test", "reduced", "experiments", "ensemble", "description"}
EXPERIMENT_KEYS = {"base", "set", "reduced", "grid", "points", "description"}
REDUCED_KEYS = {"set", "max_epochs"}
SELECT_METRICS = {"val_auroc": ("auroc", True), "val_accuracy": ("accuracy", True), "val_loss": ("loss", False),
                  "val_f1": ("f1", True), "val_macro_auroc": ("macro_auroc", True)}
VAL_COLUMNS = ("val_auroc", "val_accuracy", "val_sensitivity", "val_specificity", "val_f1", "val_loss",
               "val_macro_auroc")


# --------------------------------------------------------------------------------------------
# the file


@dataclass
class Point:
    experiment: str
    name: str
    overrides: dict[str, Any]
    cfg: RunConfig
    run_dir: Path


@dataclass
class Sweep:
    file: Path
    name: str
    select: str
    test: dict[str, Any]
    points: list[Point]
    ensemble: dict[str, Any] | None
    reduced: bool
    descriptions: dict[str, str] = field(default_factory=dict)


def _set_key(raw: dict, key: str, value: Any, where: str) -> None:
    """``raw[a][b][c] = value`` for ``key = 'a.b.c'`` (numeric parts index lists), as ``--set`` does."""
    parts = str(key).strip().split(".")
    node: Any = raw
    for part in parts[:-1]:
        if part.isdigit() and isinstance(node, list):
            if int(part) >= len(node):
                raise ConfigError(f"{where}: {key}: index {part} out of range")
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {key}: {part} is not a section")
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if last.isdigit() and isinstance(node, list):
        node[int(last)] = copy.deepcopy(value)
    elif isinstance(node, dict):
        node[last] = copy.deepcopy(value)
    else:
        raise ConfigError(f"{where}: {key}: not a section")


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (int, str)):
        return str(v)
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def _safe(text: str, limit: int = 80) -> str:
    """Filesystem-safe and stable: [A-Za-z0-9._=+-] kept, the rest '_'; long names end in a short hash."""
    import hashlib

    s = re.sub(r"[^A-Za-z0-9._=+,-]", "_", text).strip("._") or "point"
    if len(s) > limit:
        s = s[: limit - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return s


def _grid_points(grid: dict, where: str) -> list[tuple[str, dict]]:
    keys = list(grid)
    if not keys:
        raise ConfigError(f"{where}: grid is empty")
    for k in keys:
        if not isinstance(grid[k], list) or not grid[k]:
            raise ConfigError(f"{where}: grid.{k}: expected a non-empty list of values")
    short = [k.split(".")[-1] for k in keys]
    labels = [k if short.count(s) > 1 else s for k, s in zip(keys, short)]
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        name = ",".join(f"{lab}={_fmt_value(v)}" for lab, v in zip(labels, combo))
        out.append((_safe(name), dict(zip(keys, combo))))
    return out


def _point_list(points: Any, where: str) -> list[tuple[str, dict]]:
    if isinstance(points, dict):
        return [(_safe(str(name)), _mapping(ov, f"{where}: points.{name}")) for name, ov in points.items()]
    if isinstance(points, list):
        out = []
        for i, ov in enumerate(points):
            ov = _mapping(ov, f"{where}: points[{i}]")
            out.append((_safe(",".join(f"{k.split('.')[-1]}={_fmt_value(v)}" for k, v in ov.items()) or f"point{i}"), ov))
        return out
    raise ConfigError(f"{where}: points must be a mapping (name: overrides) or a list of override mappings")


def _base_raw(base: str, sweep_file: Path) -> dict:
    local = (sweep_file.parent / base)
    return _read_yaml(local if local.suffix in (".yaml", ".yml") and local.exists() else base)


def _cap_epochs(raw: dict, max_epochs: int) -> None:
    phases = ((raw.get("train") or {}).get("phases"))
    if phases is None:  # the default single phase
        _set_key(raw, "train.phases", [{"epochs": max_epochs}], "reduced")
        return
    for ph in phases:
        if isinstance(ph, dict):
            ph["epochs"] = min(int(ph.get("epochs", 10)), int(max_epochs))


def load_sweep(path: str | Path, out: str | Path, *, reduced: bool = False, only: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file; every point's config is resolved and validated here, so a
    typo fails before anything is trained."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: sweep file not found")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a sweep file must be a mapping")
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(TOP_KEYS))})")
    experiments = _mapping(doc.get("experiments"), f"{path}: experiments")
    if not experiments:
        raise ConfigError(f"{path}: no experiments")
    if only:
        missing = [e for e in only if e not in experiments]
        if missing:
            raise ConfigError(f"{path}: no experiment named {', '.join(missing)} (have: {', '.join(experiments)})")
        experiments = {k: v for k, v in experiments.items() if k in only}
    select = str(doc.get("select", "val_auroc"))
    if select not in SELECT_METRICS:
        raise ConfigError(f"{path}: select: {select!r} is not one of {', '.join(SELECT_METRICS)}")
    top_reduced = _mapping(doc.get("reduced"), f"{path}: reduced")
    out = Path(out)
    points: list[Point] = []
    descriptions = {}
    for exp, spec in experiments.items():
        where = f"{path}: experiments.{exp}"
        spec = _mapping(spec, where)
        bad = set(spec) - EXPERIMENT_KEYS
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(bad))} (known: {', '.join(sorted(EXPERIMENT_KEYS))})")
        if ("grid" in spec) == ("points" in spec):
            raise ConfigError(f"{where}: give exactly one of grid or points")
        descriptions[exp] = str(spec.get("description", ""))
        pts = _grid_points(_mapping(spec["grid"], f"{where}.grid"), where) if "grid" in spec \
            else _point_list(spec["points"], where)
        names = [n for n, _ in pts]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"{where}: two points would share the run directory {sorted(dup)[0]!r}; name them")
        base = spec.get("base", doc.get("base", "default"))
        exp_reduced = _mapping(spec.get("reduced"), f"{where}.reduced")
        for red, w in ((top_reduced, f"{path}: reduced"), (exp_reduced, f"{where}.reduced")):
            if set(red) - REDUCED_KEYS:
                raise ConfigError(f"{w}: unknown key(s) {', '.join(sorted(set(red) - REDUCED_KEYS))}")
        for name, ov in pts:
            raw = _base_raw(str(base), path)
            layers = [(doc.get("set"), f"{path}: set"), (spec.get("set"), f"{where}.set"), (ov, f"{where}: {name}")]
            if reduced:
                layers += [(top_reduced.get("set"), f"{path}: reduced.set"), (exp_reduced.get("set"), f"{where}.reduced.set")]
            for layer, w in layers:
                for k, v in _mapping(layer, w).items():
                    _set_key(raw, k, v, w)
            if reduced:
                cap = exp_reduced.get("max_epochs", top_reduced.get("max_epochs"))
                if cap:
                    _cap_epochs(raw, int(cap))
            raw["name"] = f"{exp}-{name}"
            cfg = validate_config(raw, source=f"{where}: point {name}")
            points.append(Point(exp, name, dict(ov), cfg, out / exp / name))
    ens = doc.get("ensemble")
    if ens is not None:
        ens = _mapping(ens, f"{path}: ensemble")
        bad = set(ens) - {"top", "rule", "description"}
        if bad:
            raise ConfigError(f"{path}: ensemble: unknown key(s) {', '.join(sorted(bad))}")
    test = {"bootstrap": 1000, "tta": 0, **_mapping(doc.get("test"), f"{path}: test")}
    return Sweep(path, str(doc.get("name", path.stem)), select, test, points, ens, reduced, descriptions)


# --------------------------------------------------------------------------------------------
# state of one point


def _saved_config(run_dir: Path) -> dict | None:
    p = run_dir / "config.yaml"
    if not p.exists():
        return None
    try:
        return config_to_dict(validate_config(yaml.safe_load(p.read_text()) or {}, source=str(p)))
    except (yaml.YAMLError, ConfigError):
        return {"unreadable": True}


def point_status(point: Point) -> str:
    """``done`` (finished with this config), ``resume`` (started, unfinished) or ``new``.

    Raises :class:`ConfigError` when the run directory holds a run of another config: the sweep
    file changed under an existing output folder, and overwriting would lose that run.
    """
    saved = _saved_config(point.run_dir)
    if saved is None:
        if (point.run_dir / "checkpoints" / "last.json").exists():
            return "resume"
        return "new"
    if saved != config_to_dict(point.cfg):
        diff = _config_diff(saved, config_to_dict(point.cfg))
        raise ConfigError(f"{point.run_dir}: holds a run of another config ({diff}); the sweep file changed - "
                          "use another --out or delete that run directory")
    return "done" if (point.run_dir / "summary.json").exists() else "resume"


def _config_diff(a: dict, b: dict, prefix: str = "") -> str:
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if va != vb:
            if isinstance(va, dict) and isinstance(vb, dict):
                return _config_diff(va, vb, f"{prefix}{k}.")
            return f"{prefix}{k}: {va!r} there, {vb!r} now"
    return "unknown difference"


# --------------------------------------------------------------------------------------------
# running


class _Data:
    """The dataset scanned once per sweep, re-split per (val_fraction, seed, split method)."""

    def __init__(self, root: Path, out: Path, progress: bool) -> None:
        self.root, self.out, self.progress = root, out, progress
        self._raw = None
        self._split: dict[tuple[float, int, str], Any] = {}

    def raw(self):  # noqa: ANN201
        if self._raw is None:
            from pneumoscope.data.manifest import Manifest
            from pneumoscope.data.scan import scan_dataset

            saved, stamp = self.out / "manifest.parquet", self.out / "manifest.source.json"
            if saved.exists() and stamp.exists() and json.loads(stamp.read_text()).get("data") == str(self.root):
                self._raw = Manifest.load(saved)
                log.info("sweep: using the saved scan %s of %s", saved, self.root)
            elif self.root.is_file() and self.root.suffix == ".parquet":
                self._raw = Manifest.load(self.root)
            else:
                self._raw = scan_dataset(self.root, progress=self.progress)
                self._raw.save(saved)
                atomic_write_json(stamp, {"data": str(self.root)})
        return self._raw

    def manifest(self, cfg: RunConfig):  # noqa: ANN201
        from pneumoscope.data.split import patient_split

        key = (cfg.data.val_fraction, cfg.seed, cfg.data.split)
        if key not in self._split:
            self._split[key] = patient_split(self.raw(), val_fraction=key[0], seed=key[1], method=key[2])
        return self._split[key]


def _train_point(point: Point, status: str, data: _Data, progress: bool) -> None:
    from pneumoscope.train.fit import fit

    log.info("sweep: %s %s/%s -> %s", "resuming" if status == "resume" else "training", point.experiment,
             point.name, point.run_dir)
    resume = (point.run_dir / "checkpoints" / "last.json").exists()
    fit(point.cfg, point.run_dir, data_root=data.root, resume=resume, progress=progress,
        manifest=data.manifest(point.cfg))


def _row(point: Point, status: str) -> dict:
    row: dict[str, Any] = {"experiment": point.experiment, "point": point.name, "status": status,
                           "overrides": " ".join(f"{k}={_fmt_value(v)}" for k, v in point.overrides.items()),
                           "model": point.cfg.model.name, "size": point.cfg.preprocess.size,
                           "epochs": sum(p.epochs for p in point.cfg.train.phases)}
    summ_path = point.run_dir / "summary.json"
    if not summ_path.exists():
        return row
    summ = json.loads(summ_path.read_text())
    vm = summ.get("val_metrics") or {}
    for key in ("auroc", "accuracy", "sensitivity", "specificity", "f1", "macro_auroc"):
        if key in vm:
            row[f"val_{key}"] = vm[key]
    row["best_epoch"] = summ.get("best_epoch")
    row["train_minutes"] = (summ.get("train_seconds") or math.nan) / 60
    hist = point.run_dir / "metrics.csv"
    if hist.exists():
        h = pd.read_csv(hist)
        best = h[h["epoch"] == summ.get("best_epoch")]
        if len(best):
            row["val_loss"] = float(best["val_loss"].iloc[0])
        row["epochs_run"] = int(len(h))
    split = point.run_dir / "split.csv"
    if split.exists():
        s = pd.read_csv(split, usecols=["split"])
        row["n_train"], row["n_val"] = int((s["split"] == "train").sum()), int((s["split"] == "val").sum())
    row["run_dir"] = str(point.run_dir)
    return row


def choose_winners(df: pd.DataFrame, select: str) -> pd.DataFrame:
    """The best finished point of each experiment on the validation metric ``select`` (ties: lower val loss)."""
    higher = SELECT_METRICS[select][1]
    if select not in df or df[select].isna().all():
        return df.iloc[0:0]
    done = df[df[select].notna()].copy()
    done["_key"] = done[select] if higher else -done[select]
    done["_tie"] = -done["val_loss"] if "val_loss" in done else 0.0
    order = {e: i for i, e in enumerate(dict.fromkeys(df["experiment"]))}  # the sweep file's order
    done["_exp"] = done["experiment"].map(order)
    done = done.sort_values(["_exp", "_key", "_tie"], ascending=[True, False, False], kind="stable")
    return done.groupby("experiment", sort=False).head(1).drop(columns=["_exp", "_key", "_tie"])


def _test_row(name: str, kind: str, model_dir: Path, data_source: Path, cache_dir: str | None, test: dict,
              progress: bool) -> dict:
    """Test metrics of one chosen model, evaluated once (an existing RUN/eval/test is reused)."""
    from pneumoscope.evaluate.run import evaluate_model

    ev_path = model_dir / "eval" / "test" / "metrics.json"
    marker = model_dir / "summary.json" if (model_dir / "summary.json").exists() else model_dir / "model.json"
    if ev_path.exists() and ev_path.stat().st_mtime >= marker.stat().st_mtime:
        ev = json.loads(ev_path.read_text())
    else:
        ev = evaluate_model(model_dir, data_source, split="test", bootstrap=int(test.get("bootstrap", 1000)),
                            tta=int(test.get("tta", 0)), cache_root=cache_dir, progress=progress)
    m, ci = ev["metrics"], ev.get("ci") or {}
    row = {"chosen": name, "kind": kind, "test_images": ev["n_images"], "threshold": ev["threshold"]["value"]}
    for key in ("auroc", "accuracy", "sensitivity", "specificity", "f1", "macro_auroc", "macro_f1"):
        if key in m:
            row[f"test_{key}"] = m[key]
            c = ci.get(key)
            if c and c.get("lo") is not None:
                row[f"test_{key}_ci"] = f"[{c['lo']:.3f}, {c['hi']:.3f}]"
    for key in ("fn", "fp"):
        if key in m:
            row[f"test_{key.upper()}"] = m[key]
    row["model_dir"] = str(model_dir)
    return row


def _ensemble_step(sweep: Sweep, winners: pd.DataFrame, out: Path, progress: bool) -> dict | None:
    """Ensemble of the best ``top`` winners that can share one input and validation split."""
    from pneumoscope.ensemble import _check_compatible, _member_info, build_ensemble, is_ensemble_dir

    spec = sweep.ensemble or {}
    top, rule = int(spec.get("top", 3)), str(spec.get("rule", "mean"))
    higher = SELECT_METRICS[sweep.select][1]
    ranked = winners.sort_values(sweep.select, ascending=not higher, kind="stable")
    members: list[dict] = []
    skipped = []
    for r in ranked.itertuples():
        if len(members) == top:
            break
        info = _member_info(Path(r.run_dir))
        try:
            _check_compatible([*members, info])
        except PneumoscopeError as err:
            skipped.append(f"{r.experiment}/{r.point}: {err}")
            continue
        members.append(info)
    for s in skipped:
        log.info("sweep ensemble: skipped %s", s)
    if len(members) < 2:
        log.warning("sweep: fewer than two compatible winners; no ensemble")
        return None
    ens_dir = out / "ensemble"
    runs = [str(m["run"]) for m in members]
    if is_ensemble_dir(ens_dir):
        meta = json.loads((ens_dir / "model.json").read_text())["ensemble"]
        same = [m["source_run"] for m in meta["members"]] == runs and meta.get("rule") == rule
        same = same and all(Path(m["checkpoint"]).exists() and
                            (Path(m["checkpoint"]) / "model.safetensors").stat().st_mtime
                            <= (ens_dir / "model.json").stat().st_mtime for m in meta["members"])
        if same:
            log.info("sweep: ensemble %s is up to date", ens_dir)
            return {"dir": ens_dir, "members": runs, "rule": rule, "skipped": skipped}
    build_ensemble(runs, ens_dir, rule=rule, progress=progress)
    return {"dir": ens_dir, "members": runs, "rule": rule, "skipped": skipped}


def run_sweep(file: str | Path, data_root: str | Path, out: str | Path, *, reduced: bool = False,
              only: list[str] | None = None, progress: bool = False, evaluate_test: bool = True) -> dict:
    """Run (or continue) every point, then write the results; see the module docstring."""
    out = Path(out)
    sweep = load_sweep(file, out, reduced=reduced, only=only)
    out.mkdir(parents=True, exist_ok=True)
    data = _Data(Path(data_root), out, progress)
    statuses = {id(p): point_status(p) for p in sweep.points}  # refuses a changed sweep before any work
    failed = []
    t0 = time.perf_counter()
    for i, p in enumerate(sweep.points, 1):
        st = statuses[id(p)]
        if st == "done":
            log.info("sweep [%d/%d] %s/%s: finished earlier, skipped", i, len(sweep.points), p.experiment, p.name)
            statuses[id(p)] = "skipped (done)"
            continue
        log.info("sweep [%d/%d] %s/%s (%s)", i, len(sweep.points), p.experiment, p.name, st)
        try:
            _train_point(p, st, data, progress)
            statuses[id(p)] = "resumed" if st == "resume" else "trained"
        except (PneumoscopeError, RuntimeError, ValueError) as err:
            log.error("%s: %s/%s failed: %s", p.run_dir, p.experiment, p.name, err)
            statuses[id(p)] = f"failed: {err}"
            failed.append(p)
        _write_tables(sweep, out, [_row(q, statuses[id(q)]) for q in sweep.points], None, None)
    rows = pd.DataFrame([_row(p, statuses[id(p)]) for p in sweep.points])
    winners = choose_winners(rows, sweep.select)
    ens = _ensemble_step(sweep, winners, out, progress) if sweep.ensemble and len(winners) >= 2 else None
    test_rows = []
    if evaluate_test:
        source = out / "manifest.parquet" if (out / "manifest.parquet").exists() else Path(data_root)
        for w in winners.itertuples():
            cfg = next(p.cfg for p in sweep.points if str(p.run_dir) == w.run_dir)
            test_rows.append(_test_row(f"{w.experiment}/{w.point}", f"winner of {w.experiment}", Path(w.run_dir),
                                       source, cfg.data.cache_dir, sweep.test, progress))
        if ens is not None:
            cache = next(p.cfg.data.cache_dir for p in sweep.points if str(p.run_dir) == ens["members"][0])
            test_rows.append(_test_row("ensemble", f"ensemble ({ens['rule']}) of " + ", ".join(
                Path(m).parent.name + "/" + Path(m).name for m in ens["members"]), ens["dir"], source, cache,
                sweep.test, progress))
    tests = pd.DataFrame(test_rows)
    _write_tables(sweep, out, rows.to_dict("records"), winners, tests, ens)
    _plot(rows, winners, sweep, out / f"{sweep.select}.png")
    result = {"file": str(sweep.file), "out": str(out), "reduced": reduced, "select": sweep.select,
              "points": rows.to_dict("records"), "winners": winners.to_dict("records"),
              "ensemble": {k: str(v) if isinstance(v, Path) else v for k, v in ens.items()} if ens else None,
              "test": tests.to_dict("records"), "failed": [str(p.run_dir) for p in failed],
              "wall_minutes": (time.perf_counter() - t0) / 60}
    atomic_write_json(out / "sweep.json", result)
    log.info("sweep: %d points (%d failed) in %.1f min; results in %s", len(rows), len(failed),
             result["wall_minutes"], out / "results.md")
    return result


# --------------------------------------------------------------------------------------------
# output


def _md(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".4f") if len(df) else "(none)"


def _write_tables(sweep: Sweep, out: Path, rows: list[dict], winners: pd.DataFrame | None,
                  tests: pd.DataFrame | None, ens: dict | None = None) -> None:
    df = pd.DataFrame(rows)
    if winners is not None and len(winners):
        chosen = set(zip(winners["experiment"], winners["point"]))
        df["winner"] = [(e, p) in chosen for e, p in zip(df["experiment"], df["point"])]
    cols = [c for c in ("experiment", "point", "winner", "status", "overrides", "model", "size", "epochs",
                        "epochs_run", "best_epoch", *VAL_COLUMNS, "n_train", "n_val", "train_minutes", "run_dir")
            if c in df]
    df = df[cols]
    with atomic_path(out / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    shown = df.drop(columns=[c for c in ("run_dir", "overrides") if c in df])
    lines = [f"# Sweep {sweep.name}{' (reduced)' if sweep.reduced else ''}: {sweep.file}", "",
             f"Winners are chosen per experiment on **{sweep.select}** of the validation split (cut from the "
             "official train split by patient); the test split is not used for any choice.", "",
             "## Validation metrics (for choosing)", "", _md(shown), ""]
    for exp, desc in sweep.descriptions.items():
        if desc:
            lines.append(f"- **{exp}**: {desc}")
    if tests is not None:
        lines += ["", "## Test metrics of the chosen models (reported once, never used for choosing)", "",
                  f"Official test split; {sweep.test.get('bootstrap')} patient-bootstrap resamples for the 95 % CIs; "
                  "threshold chosen on validation.", "",
                  _md(tests.drop(columns=[c for c in ("model_dir",) if c in tests]))]
    if ens:
        lines += ["", f"Ensemble ({ens['rule']}): {', '.join(ens['members'])}"]
        lines += [f"- not in the ensemble: {s}" for s in ens.get("skipped", [])]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")


def _plot(rows: pd.DataFrame, winners: pd.DataFrame, sweep: Sweep, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    metric = sweep.select
    if metric not in rows:
        return
    exps = list(dict.fromkeys(rows["experiment"]))
    fig, axes = plt.subplots(len(exps), 1, figsize=(7, 1.1 + 0.45 * len(rows)), squeeze=False)
    chosen = set(zip(winners["experiment"], winners["point"])) if len(winners) else set()
    for ax, exp in zip(axes[:, 0], exps):
        sub = rows[rows["experiment"] == exp]
        vals = sub[metric].to_numpy(float)
        colors = ["tab:orange" if (exp, p) in chosen else "tab:blue" for p in sub["point"]]
        ax.barh(range(len(sub)), np.nan_to_num(vals), color=colors)
        ax.set_yticks(range(len(sub)), list(sub["point"]), fontsize=8)
        ax.invert_yaxis()
        finite = vals[np.isfinite(vals)]
        lo = max(0.0, float(finite.min()) - 0.05) if len(finite) else 0.0
        ax.set_xlim(lo, 1.0 if metric != "val_loss" else max(1.0, float(np.nanmax(vals)) * 1.1 if len(finite) else 1.0))
        for y, v in enumerate(vals):
            if np.isfinite(v):
                ax.text(v, y, f" {v:.3f}", va="center", fontsize=7)
        ax.set_title(exp, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel(f"{metric} (validation; orange = chosen)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# dry run: the plan and an estimate


def _count_pool_images(root: Path) -> int:
    """Images in the official train (+ val) folders, or all images when the layout is different."""
    from pneumoscope.predict import iter_image_files

    folders = [root / s for s in ("train", "val") if (root / s).is_dir()]
    return sum(1 for f in folders for _ in iter_image_files(f)) if folders else sum(1 for _ in iter_image_files(root))


def _cpu_seconds(fn) -> float:  # noqa: ANN001
    t = time.process_time()
    fn()
    return time.process_time() - t


def _bench(cfg: RunConfig, cache: dict) -> tuple[float, float]:
    """Measured seconds per image of one training step (forward + backward) and of one eval forward."""
    import torch

    from pneumoscope.models import create_model
    from pneumoscope.train.losses import num_outputs

    key = (cfg.model.name, json.dumps(cfg.model.kwargs, sort_keys=True), cfg.model.head, cfg.preprocess.size,
           cfg.model.in_chans)
    if key in cache:
        return cache[key]
    torch.manual_seed(0)
    model = create_model(cfg.model.name, num_classes=num_outputs(cfg.train.loss.name, 2), pretrained=False,
                         in_chans=cfg.model.in_chans, head=cfg.model.head, dropout=cfg.model.dropout, **cfg.model.kwargs)
    model = model.to(memory_format=torch.channels_last)
    n, s = 8, cfg.preprocess.size
    x = torch.randn(n, model.card.in_chans if cfg.model.in_chans is None else cfg.model.in_chans, s, s)
    x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-4)

    def step() -> None:
        opt.zero_grad()
        model(x).float().sum().backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    # CPU time of this process, best of 3: what the step costs, not how busy the machine happens to
    # be (other processes inflate wall time). With several torch threads it is the sum over threads,
    # so the estimate stays an upper bound.
    model.train()
    step()
    train_s = min(_cpu_seconds(step) for _ in range(3)) / n
    model.eval()
    forward()
    eval_s = min(_cpu_seconds(forward) for _ in range(3)) / n
    cache[key] = (train_s, eval_s)
    return cache[key]


def estimate_minutes(point: Point, pool_images: int, cache: dict) -> float:
    """An upper-bound estimate: every phase as full forward+backward passes (frozen phases with a
    feature cache are cheaper), validation each epoch, plus decoding the images once."""
    cfg = point.cfg
    if cfg.data.limit_per_class:
        n_train = 2 * cfg.data.limit_per_class
        n_val = 2 * max(4, cfg.data.limit_per_class // 3)
    else:
        n_val = int(pool_images * cfg.data.val_fraction)
        n_train = pool_images - n_val
    train_s, eval_s = _bench(cfg, cache)
    seconds = 10.0 + n_val * eval_s + 0.003 * (n_train + n_val)  # set-up, finalize, decoding into the cache
    for ph in cfg.train.phases:
        if ph.freeze != "none" and ph.feature_cache:  # frozen prefix once per view, then the small suffix
            seconds += n_train * ph.feature_views * eval_s + ph.epochs * n_train * train_s * 0.25
        else:
            seconds += ph.epochs * n_train * train_s
        # per epoch: validation, augmentation (~0.3 ms/image), checkpoints and the curves figure (~3 s)
        seconds += ph.epochs * (n_val * eval_s + 0.0003 * n_train + 3.0)
    return seconds / 60


def plan_text(sweep: Sweep, data_root: Path | None) -> tuple[str, float]:
    pool = _count_pool_images(data_root) if data_root is not None and data_root.is_dir() else 5216
    cache: dict = {}
    logging.getLogger("pneumoscope.models").setLevel(logging.WARNING)  # the benchmark's model builds
    rows = []
    total = 0.0
    for p in sweep.points:
        try:
            st = point_status(p)
        except ConfigError as err:
            st = f"CONFLICT: {err}"
        est = 0.0 if st == "done" else estimate_minutes(p, pool, cache)
        total += est
        c = p.cfg
        rows.append({"experiment": p.experiment, "point": p.name, "status": st, "model": c.model.name,
                     "size": c.preprocess.size, "images/class": c.data.limit_per_class or "all",
                     "epochs": "+".join(str(ph.epochs) for ph in c.train.phases), "batch": c.train.batch_size,
                     "est_min": round(est, 1), "run_dir": str(p.run_dir)})
    df = pd.DataFrame(rows)
    ens = sweep.ensemble
    text = (f"Sweep {sweep.name}{' (reduced)' if sweep.reduced else ''}: {len(sweep.points)} points in "
            f"{len(set(df['experiment']))} experiments; winners chosen on {sweep.select} (validation)\n\n"
            + df.to_markdown(index=False) + "\n\n"
            + (f"then: ensemble ({ens.get('rule', 'mean')}) of the best {ens.get('top', 3)} compatible winners\n" if ens else "")
            + f"then: test-split evaluation of each winner{' and the ensemble' if ens else ''} "
              f"({sweep.test.get('bootstrap')} bootstrap resamples), once\n"
            + f"estimated training time: {total:.0f} min on an otherwise idle machine (an upper bound from the CPU time of "
              f"a forward/backward micro-benchmark of each model at its size, {pool} pool images; plus a few minutes "
              "for the scan, the test evaluations and the ensemble)\n")
    return text, total


def sweep_command(file: str, *, data: str | None = None, out: str | None = None, reduced: bool = False,
                  dry_run: bool = False, only: list[str] | None = None, progress: bool = False) -> int:
    """CLI glue for ``pneumoscope sweep``; exit code 1 when any point failed."""
    from pneumoscope.data.paths import resolve_data_root

    out_dir = Path(out) if out else Path("runs") / "sweeps" / (Path(file).stem + ("-reduced" if reduced else ""))
    if dry_run:
        sweep = load_sweep(file, out_dir, reduced=reduced, only=only)
        try:
            root = resolve_data_root(data)
        except PneumoscopeError:
            root = None
        text, _ = plan_text(sweep, root)
        sys.stdout.write(text)
        return 0
    res = run_sweep(file, resolve_data_root(data), out_dir, reduced=reduced, only=only, progress=progress)
    sys.stdout.write((out_dir / "results.md").read_text())
    return 1 if res["failed"] else 0
