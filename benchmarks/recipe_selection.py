"""Recipe selection by the rule of docs/recipe_selection.md: validation Brier, texture-swap check, then test once.

Each candidate is ``LABEL=MODEL`` (a run directory, or a bare model directory such as the bundled
model, whose validation split is re-cut from the dataset with its seed). For each one this
script reads or computes, on the seed-0 patient-grouped **validation** split only:

* the Brier score of the calibrated probabilities (recomputed here from the model, so runs,
  bundles and fp16 weights are scored the same way), the AUROC, and the specificity at the
  model's own validation threshold;
* the same specificity on the texture-swapped copy (``benchmarks/shortcut_texture.py``).

It applies the rule (lowest Brier; texture-swapped specificity at most 2 points below the
incumbent's) with the first candidate as the incumbent, and only then reads each candidate's
official-test evaluation (``MODEL/eval/test/metrics.json``, running ``pneumoscope evaluate
--tta 0`` where it is missing) for the table. Every test figure is published, chosen or not.

    PYTHONPATH=src python benchmarks/recipe_selection.py \\
        --candidates "default (bundled)=src/pneumoscope/weights/default" "+sharpness=out/exp_sharp" "lpft=out/exp_lpft"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, fmt, machine_info, md_table, publish  # noqa: E402

SPEC_MARGIN = 0.02


def validation_scores(model: str, data: str) -> dict:
    from shortcut_texture import model_part

    m = model_part(model, data)
    return {"n_val": m["n_val"], "threshold": m["threshold"], "clean": m["clean"], "swapped": m["texture_swapped"]}


def choose(cands: list[dict]) -> tuple[str, list[str]]:
    """The pre-registered rule; returns the chosen label and one line of reasoning per challenger."""
    incumbent = cands[0]
    best, why = incumbent, []
    for c in cands[1:]:
        lower = c["val"]["clean"]["brier"] < best["val"]["clean"]["brier"]
        robust = c["val"]["swapped"]["specificity"] >= incumbent["val"]["swapped"]["specificity"] - SPEC_MARGIN
        why.append(f"{c['label']}: Brier {c['val']['clean']['brier']:.5f} vs {best['val']['clean']['brier']:.5f} "
                   f"({'lower' if lower else 'not lower'}); texture-swapped specificity "
                   f"{100 * c['val']['swapped']['specificity']:.1f} % vs incumbent "
                   f"{100 * incumbent['val']['swapped']['specificity']:.1f} % ({'ok' if robust else 'too low'})")
        if lower and robust:
            best = c
    return best["label"], why


def test_metrics(model: str, data: str, eval_root: Path, label: str) -> dict | None:
    """A run's own ``eval/test``; a bare model directory (the bundled model) is evaluated into
    ``eval_root/<label>`` so nothing is written inside the installed package."""
    is_run = (Path(model) / "checkpoints").is_dir()
    out = Path(model) / "eval" / "test" if is_run else eval_root / "".join(ch if ch.isalnum() else "_" for ch in label)
    path = out / "metrics.json"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pneumoscope", "evaluate", model, "--data", data, "--split", "test",
                        "--tta", "0", "--out", str(out), "--no-progress"], check=True)
    return json.loads(path.read_text()) if path.exists() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, "recipe_selection")
    ap.add_argument("--candidates", nargs="+", required=True, help="LABEL=MODEL; the first is the incumbent")
    ap.add_argument("--eval-root", default="out/recipe_selection", help="test evaluations of bare model directories")
    args = ap.parse_args()
    machine = machine_info()
    cands = []
    for item in args.candidates:
        label, model = item.rsplit("=", 1)
        cands.append({"label": label, "model": model, "val": validation_scores(model, args.data)})
    chosen, why = choose(cands)  # decided before any test figure is read
    for c in cands:
        ev = test_metrics(c["model"], args.data, Path(args.eval_root), c["label"])
        c["test"] = None if ev is None else {"metrics": {k: ev["metrics"][k] for k in
                                                         ("accuracy", "sensitivity", "specificity", "auroc", "tn",
                                                          "fp", "fn", "tp")},
                                             "ci": {k: ev["ci"][k] for k in ("accuracy", "auroc") if k in ev.get("ci", {})},
                                             "tta_samples": ev.get("tta_samples")}
    rows = []
    for c in cands:
        v, t = c["val"], c["test"]
        tm = t["metrics"] if t else {}
        ci = t["ci"] if t else {}
        acc = (f"{100 * tm['accuracy']:.1f} [{100 * ci['accuracy']['lo']:.1f}, {100 * ci['accuracy']['hi']:.1f}]"
               if "accuracy" in ci else fmt(100 * tm.get("accuracy", float("nan"))))
        auc = (f"{tm['auroc']:.3f} [{ci['auroc']['lo']:.3f}, {ci['auroc']['hi']:.3f}]" if "auroc" in ci
               else fmt(tm.get("auroc", float("nan")), 3))
        rows.append([("**" if c["label"] == chosen else "") + c["label"] + ("**" if c["label"] == chosen else ""),
                     f"`{c['model']}`", fmt(v["clean"]["brier"], 5), fmt(v["clean"]["auroc"], 4),
                     fmt(100 * v["clean"]["specificity"]), fmt(100 * v["swapped"]["specificity"]), acc,
                     fmt(100 * tm.get("sensitivity", float("nan"))), fmt(100 * tm.get("specificity", float("nan"))),
                     auc, f"[[{tm.get('tn')}, {tm.get('fp')}], [{tm.get('fn')}, {tm.get('tp')}]]"])
    md = ("Rule (docs/recipe_selection.md, fixed before the test figures were read): the lowest validation Brier "
          "score of the calibrated probabilities wins, provided its specificity on the texture-swapped validation "
          f"copy is at most {100 * SPEC_MARGIN:.0f} points below the incumbent's (the first row). Validation: the "
          "seed-0 patient-grouped split cut from train. Test: the official split (624 images), single-pass "
          "predictions at each model's validation threshold, 95 % patient-bootstrap CIs; read once, after the "
          "choice.\n\n"
          + md_table(["candidate", "model", "val Brier", "val AUROC", "val specificity %",
                      "texture-swapped val specificity %", "test accuracy % [CI]", "test sensitivity %",
                      "test specificity %", "test AUROC [CI]", "test confusion [[TN, FP], [FN, TP]]"], rows)
          + f"\n\nChosen: **{chosen}**.\n\n" + "\n".join(f"- {w}" for w in why) + "\n")
    publish(args, {"candidates": cands, "chosen": chosen, "reasons": why, "spec_margin": SPEC_MARGIN}, md, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
