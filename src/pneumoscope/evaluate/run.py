"""``pneumoscope evaluate``: a trained model on a labelled split, evaluated like a clinical study.

Writes to ``<out>/`` (default ``<run>/eval/<split>/``)::

    predictions.csv   path, patient, label, P(class) (calibrated), decision, correct, uncertainty, refer
    metrics.json      metrics at the validation-chosen threshold and at 0.5, 95 % patient-bootstrap CIs,
                      confusion matrix, false negatives / positives by file, calibration, selective prediction
    metrics.md        the same as a readable table (percentages with their integer counts)
    roc.png pr.png confusion.png reliability.png coverage.png

Protocol: the threshold and the temperature were fitted on the patient-grouped validation split
at training time and are read from the checkpoint; the uncertainty cut-off for "refer to a
radiologist" is fitted here on the same validation split (re-derived from the run's ``split.csv``
or by re-cutting the split with the run's seed). Nothing is chosen on the evaluated split.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pneumoscope.data.cache import ImageCache, default_cache_root
from pneumoscope.data.tasks import task_labels
from pneumoscope.errors import DatasetError
from pneumoscope.evaluate.bootstrap import bootstrap_ci
from pneumoscope.evaluate.calibration import expected_calibration_error, reliability_curve
from pneumoscope.evaluate.metrics import binary_metrics, counts_text, multiclass_metrics
from pneumoscope.evaluate.uncertainty import (fit_refer_threshold, predictive_entropy, refer_flags,
                                              selective_prediction_curve)
from pneumoscope.inference import Predictor
from pneumoscope.utils.io import atomic_path, atomic_write_json, atomic_write_text
from pneumoscope.utils.memory import release_memory, tune_malloc

log = logging.getLogger(__name__)

HEADLINE_BINARY = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "auroc", "pr_auc", "brier")
HEADLINE_MULTI = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_auroc")


@dataclass
class SplitPredictions:
    rows: pd.DataFrame
    y: np.ndarray
    probs: np.ndarray  # (N, C) calibrated, single pass: what predict and serve return, so the metrics are theirs
    probs_raw: np.ndarray  # (N, C) at temperature 1, no TTA
    uncertainty: np.ndarray  # (N,) entropy of the TTA mean when tta > 0, else of ``probs``
    uncertainty_single: np.ndarray  # (N,) entropy of ``probs`` (the uncertainty predict and serve report)


def _cache_images(predictor: Predictor, rows: pd.DataFrame, cache_root: Path, progress: bool) -> np.ndarray:
    cache = ImageCache(cache_root, predictor.spec)
    report = cache.update(list(rows["path"]), list(rows["content_hash"]), progress=progress)
    for path, reason in report.failed.items():
        log.error("%s: %s", path, reason)
    return cache, report


def predict_rows(predictor: Predictor, rows: pd.DataFrame, y: np.ndarray, *, cache_root: Path, tta: int,
                 seed: int = 0, progress: bool = True) -> SplitPredictions:
    """Calibrated single-pass probabilities and per-image uncertainty for manifest rows.

    The probabilities, and so every metric, are the deployed predictor's (one pass, as ``predict``
    and ``serve`` answer); ``tta`` > 0 only changes ``uncertainty`` to the entropy of the mean of the
    plain pass and ``tta`` augmented passes (:func:`pneumoscope.predict.tta_mean_probs`).
    """
    cache, report = _cache_images(predictor, rows, cache_root, progress)
    keep = ~rows["path"].isin(report.failed.keys()).to_numpy()
    rows, y = rows[keep], y[keep]
    u8 = torch.from_numpy(cache.get(list(rows["content_hash"])))
    pred = predictor.predict_u8(u8)
    release_memory()
    probs_raw = predictor.probs_from_logits(pred.logits * predictor.temperature)  # T = 1
    single = predictive_entropy(pred.probs)
    if tta > 0:
        from pneumoscope.predict import tta_mean_probs

        uncertainty = predictive_entropy(tta_mean_probs(predictor, u8, tta, plain=pred.probs, seed=seed))
        release_memory()
    else:
        uncertainty = single
    return SplitPredictions(rows=rows, y=y, probs=pred.probs, probs_raw=probs_raw, uncertainty=uncertainty,
                            uncertainty_single=single)


def _unreadable(df: pd.DataFrame, split: str) -> list[dict]:
    """Files of ``split`` the scan could not use, each logged as one ``path: reason`` line: the
    evaluation goes on without them, and metrics.json lists them so the count is never silent."""
    bad = df[df["status"] != "ok"]
    if split != "all" and len(bad):
        official = bad["official_split"] if "official_split" in bad else bad["split"]
        bad = bad[((official == split) if split == "test" else (bad["split"] == split)).to_numpy()]
    out = [{"path": str(p), "reason": str(r)} for p, r in zip(bad["path"], bad["error"])]
    for item in out:
        log.error("%s: %s", item["path"], item["reason"])
    if out:
        log.warning("%d unreadable files left out of the evaluation (listed in metrics.json)", len(out))
    return out


def _val_rows(run_dir: Path | None, manifest_df: pd.DataFrame, task: str) -> tuple[pd.DataFrame, np.ndarray] | None:
    """The run's validation images (from ``split.csv``), labelled for ``task``; None if unavailable."""
    if run_dir is None or not (run_dir / "split.csv").exists():
        return None
    split = pd.read_csv(run_dir / "split.csv")
    val = split[split["split"] == "val"]
    if val.empty:
        return None
    return val.reset_index(drop=True), val["y"].to_numpy(np.int64)


def split_of(meta: dict) -> dict:
    """``load_manifest`` arguments that re-cut a model's own validation split from its ``model.json``
    (models from before ``val_split`` was recorded used the random 15 % split)."""
    val_split = meta.get("val_split") or {}
    if val_split.get("val_source"):  # external validation (data.val_source)
        return {"val_fraction": 0.15, "seed": int(meta.get("seed", 0)), "method": "random",
                "val_source": str(val_split["val_source"])}
    return {"val_fraction": float(val_split.get("val_fraction", 0.15)), "seed": int(meta.get("seed", 0)),
            "method": str(val_split.get("method", "random"))}


def default_eval_dir(model_dir: Path, split: str) -> Path:
    """``MODEL/eval/SPLIT``, except for a model shipped inside the installed package (the bundled
    model), whose evaluation goes to ``./out/eval/<name>/SPLIT``: never write into site-packages."""
    package = Path(__file__).resolve().parents[1]
    if Path(model_dir).resolve().is_relative_to(package):
        return Path("out") / "eval" / Path(model_dir).name / split
    return Path(model_dir) / "eval" / split


def evaluate_model(model_path: str | Path, data_root: str | Path, *, split: str = "test", out: str | Path | None = None,
                   bootstrap: int = 1000, tta: int = 8, refer_fraction: float = 0.1, cache_root: str | Path | None = None,
                   progress: bool = True, seed: int = 0) -> dict:
    """Evaluate a model on one split of a labelled dataset; write predictions, metrics and plots."""
    from pneumoscope.evaluate import plots
    from pneumoscope.train.fit import load_manifest

    tune_malloc()

    predictor = Predictor.load(model_path)
    # a run, or an ensemble directory (its split.csv holds the validation split its members share)
    run_dir = Path(model_path) if any((Path(model_path) / f).exists() for f in ("checkpoints", "split.csv")) else None
    out_dir = Path(out) if out else default_eval_dir(run_dir or predictor.source_dir, split)
    cache_root = Path(cache_root) if cache_root else default_cache_root()
    task, class_names = predictor.meta["task"], predictor.class_names

    cut = split_of(predictor.meta)
    if split == "test":  # the official test rows need no validation cut: an external set is not scanned for them
        cut.pop("val_source", None)
    manifest = load_manifest(data_root, progress=progress, require_split=False, **cut)
    df = manifest.df.reset_index(drop=True)
    try:
        mask, y_all, ds_classes = task_labels(df, task)
    except DatasetError as err:
        raise DatasetError(f"{data_root}: cannot evaluate a {task} model on this dataset: {err}") from None
    if [c.lower() for c in ds_classes] != [c.lower() for c in class_names]:
        raise DatasetError(f"{data_root}: dataset classes {ds_classes} do not match the model's classes {class_names}")
    rows = df[mask].assign(y=y_all)
    splits = sorted(set(rows["split"]))
    if split != "all":
        official = rows["official_split"] if "official_split" in rows else rows["split"]
        sel = (official == split) if split == "test" else (rows["split"] == split)
        rows = rows[sel.to_numpy()]
    if rows.empty:
        raise DatasetError(f"{data_root}: no labelled images in split {split!r} (splits here: {', '.join(splits)})")
    rows = rows.reset_index(drop=True)
    unreadable = _unreadable(df, split)
    log.info("evaluating %s on %s split %s: %d images", predictor.model_id, data_root, split, len(rows))

    ev = predict_rows(predictor, rows, rows["y"].to_numpy(np.int64), cache_root=cache_root, tta=tta, seed=seed,
                      progress=progress)
    val = _val_rows(run_dir, df, task)
    val_pred = None
    if val is not None:
        val_pred = predict_rows(predictor, val[0], val[1], cache_root=cache_root, tta=tta, seed=seed, progress=progress)

    binary = len(class_names) == 2
    thr = predictor.threshold if (binary and predictor.threshold is not None) else 0.5
    y, probs = ev.y, ev.probs
    groups = ev.rows["patient_id"].astype(str).to_numpy()
    decision = predictor.decide(probs) if binary else probs.argmax(1)

    lost = sorted(set(rows["path"]) - set(ev.rows["path"]))  # scanned fine, failed when cached (logged there)
    unreadable += [{"path": p, "reason": "could not be decoded for the cache"} for p in lost]
    result: dict = {"model": predictor.model_id, "model_dir": str(predictor.source_dir), "data": str(data_root),
                    "split": split, "n_images": int(len(y)), "n_patients": int(len(set(groups))), "task": task,
                    "class_names": class_names, "tta_samples": tta,
                    "threshold": {"value": thr, **(predictor.threshold_info or {"rule": "argmax" if not binary else "0.5"})},
                    "temperature": predictor.temperature, "unreadable": unreadable}
    if binary:
        p1 = probs[:, 1]
        at_thr = binary_metrics(y, p1, threshold=thr)
        at_half = binary_metrics(y, p1, threshold=0.5)
        result["metrics"] = at_thr
        result["metrics_at_0.5"] = at_half
        if bootstrap:  # binary_metrics has a vectorised bootstrap path; keep the headline keys only
            ci = bootstrap_ci(functools.partial(binary_metrics, threshold=thr), y, p1, groups=groups,
                              n_boot=bootstrap, seed=seed)
            result["ci"] = {k: ci[k] for k in HEADLINE_BINARY if k in ci}
        cm = np.array([[at_thr["tn"], at_thr["fp"]], [at_thr["fn"], at_thr["tp"]]])
    else:
        mm = multiclass_metrics(y, probs, class_names)
        result["metrics"] = mm
        if bootstrap:
            ci = bootstrap_ci(functools.partial(multiclass_metrics, class_names=class_names), y, probs,
                              groups=groups, n_boot=bootstrap, seed=seed)
            result["ci"] = {k: v for k, v in ci.items() if k in HEADLINE_MULTI or k.startswith("per_class.")}
        cm = np.asarray(mm["confusion"])
    result["confusion"] = cm.tolist()
    wrong = decision != y
    result["errors"] = [
        {"path": r.path, "patient_id": r.patient_id, "label": class_names[int(t)], "predicted": class_names[int(d)],
         "prob": float(probs[i, int(d)]), "kind": ("false_negative" if binary and t == 1 else "false_positive")
         if binary else "misclassified"}
        for i, (r, t, d) in enumerate(zip(ev.rows.itertuples(), y, decision)) if wrong[i]]

    # calibration (before = temperature 1; after = the validation-fitted temperature)
    target = probs[:, 1] if binary else probs.max(1)
    target_raw = ev.probs_raw[:, 1] if binary else ev.probs_raw.max(1)
    yc = y if binary else (decision == y).astype(int)
    result["calibration"] = {"ece_before": expected_calibration_error(yc, target_raw, n_bins=10),
                             "ece_after": expected_calibration_error(yc, target, n_bins=10),
                             "temperature": predictor.temperature}

    # uncertainty and referral (cut-off fitted on validation, when the run's validation split is known)
    # ``single_pass_threshold`` is the same rule on the single-pass entropy that predict and serve
    # compute; it is the cut-off a bundle stores (pneumoscope.bundle), so a served "refer" means
    # what the evaluation measured.
    fit_on = val_pred if val_pred is not None else ev
    u_thr = fit_refer_threshold(fit_on.uncertainty, refer_fraction)
    u_thr_single = fit_refer_threshold(fit_on.uncertainty_single, refer_fraction)
    if val_pred is not None:
        rule = f"uncertainty > {u_thr:.4f} (refers {refer_fraction:.0%} of validation)"
    else:
        rule = f"top {refer_fraction:.0%} most uncertain of this split (no validation split available)"
    refer = refer_flags(ev.uncertainty, uncertainty_threshold=u_thr)
    sel = selective_prediction_curve(y, probs[:, 1] if binary else probs, ev.uncertainty, threshold=thr)
    kept = ~refer
    result["referral"] = {"rule": rule, "uncertainty_threshold": u_thr, "single_pass_threshold": u_thr_single,
                          "referred": int(refer.sum()),
                          "accuracy_all": float((decision == y).mean()),
                          "accuracy_not_referred": float((decision[kept] == y[kept]).mean()) if kept.any() else math.nan,
                          "coverage": float(kept.mean()), "aurc": sel["aurc"], "uncertainty": "entropy of the "
                          + (f"mean of the plain pass and {tta} TTA samples" if tta else "prediction")}

    # predictions table
    pred = pd.DataFrame({"path": ev.rows["path"], "patient_id": ev.rows["patient_id"],
                         "label": [class_names[i] for i in y]})
    for j, c in enumerate(class_names):
        pred[f"prob_{c}"] = probs[:, j]
    pred["decision"] = [class_names[i] for i in decision]
    pred["correct"] = decision == y
    pred["uncertainty"] = ev.uncertainty
    pred["refer"] = refer
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "predictions.csv") as tmp:
        pred.to_csv(tmp, index=False)

    # plots
    figs = {}
    curves_p = {split: (y, probs[:, 1])} if binary else {}
    if binary:
        if val_pred is not None:
            curves_p["validation"] = (val_pred.y, val_pred.probs[:, 1])
        figs["roc"] = plots.plot_roc(curves_p, out_dir / "roc.png", operating_points={split: thr})
        figs["pr"] = plots.plot_pr(curves_p, out_dir / "pr.png", operating_points={split: thr})
    else:
        ovr = {c: ((y == j).astype(int), probs[:, j]) for j, c in enumerate(class_names)}
        figs["roc"] = plots.plot_roc(ovr, out_dir / "roc.png", title="ROC, one-vs-rest")
        figs["pr"] = plots.plot_pr(ovr, out_dir / "pr.png", title="Precision–recall, one-vs-rest")
    figs["confusion"] = plots.plot_confusion(cm, class_names, out_dir / "confusion.png",
                                             title=f"Confusion matrix ({split}, threshold {thr:.3f})" if binary
                                             else f"Confusion matrix ({split})")
    figs["reliability"] = plots.plot_reliability(reliability_curve(yc, target_raw), reliability_curve(yc, target),
                                                 out_dir / "reliability.png",
                                                 labels=("before (T = 1)", f"after (T = {predictor.temperature:.2f})"))
    figs["coverage"] = plots.plot_coverage(sel, out_dir / "coverage.png")
    result["figures"] = {k: str(Path(v).name) for k, v in figs.items()}
    atomic_write_json(out_dir / "metrics.json", result)
    atomic_write_text(out_dir / "metrics.md", metrics_markdown(result))
    log.info("evaluation written to %s", out_dir)
    result["out_dir"] = str(out_dir)
    return result


def _fmt_ci(result: dict, key: str, pct: bool) -> str:
    ci = result.get("ci", {}).get(key)
    if not ci or ci.get("lo") is None or (isinstance(ci["lo"], float) and math.isnan(ci["lo"])):
        return ""
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")
    return f" [{f(ci['lo'])}, {f(ci['hi'])}]"


def metrics_markdown(result: dict) -> str:
    """A Markdown table of the headline metrics with 95 % CIs and the counts behind every percentage."""
    m = result["metrics"]
    lines = [f"# Evaluation of {result['model']} on {result['split']} ({result['n_images']} images, "
             f"{result['n_patients']} patients)", ""]
    if "tp" in m:
        tp, fp, tn, fn = m["tp"], m["fp"], m["tn"], m["fn"]
        thr = result["threshold"]
        lines += [f"Operating threshold: **{thr['value']:.4f}** ({thr.get('rule_description', thr.get('rule'))}); "
                  f"probabilities calibrated with T = {result['temperature']:.3f}.", "",
                  "| metric | at the validation threshold (95 % CI, patient bootstrap) | at 0.5 |", "|---|---|---|"]
        half = result["metrics_at_0.5"]
        rows = [("accuracy", tp + tn, tp + tn + fp + fn, "accuracy"), ("sensitivity", tp, tp + fn, "sensitivity"),
                ("specificity", tn, tn + fp, "specificity"), ("precision (PPV)", tp, tp + fp, "precision"),
                ("NPV", tn, tn + fn, "npv")]
        for label, k, n, key in rows:
            hk = {"accuracy": half["tp"] + half["tn"], "sensitivity": half["tp"], "specificity": half["tn"],
                  "precision": half["tp"], "npv": half["tn"]}[key]
            hn = {"accuracy": half["n"], "sensitivity": half["tp"] + half["fn"], "specificity": half["tn"] + half["fp"],
                  "precision": half["tp"] + half["fp"], "npv": half["tn"] + half["fn"]}[key]
            lines.append(f"| {label} | {counts_text(k, n)}{_fmt_ci(result, key, True)} | {counts_text(hk, hn)} |")
        for label, key in (("F1", "f1"), ("AUROC", "auroc"), ("PR-AUC", "pr_auc"), ("Brier score", "brier")):
            lines.append(f"| {label} | {m[key]:.4f}{_fmt_ci(result, key, False)} | {half[key]:.4f} |")
        lines += ["", f"Confusion matrix (rows = truth): NORMAL→ TN {tn}, FP {fp}; PNEUMONIA→ FN {fn}, TP {tp}."]
    else:
        lines += ["| metric | value (95 % CI, patient bootstrap) |", "|---|---|"]
        for key in HEADLINE_MULTI:
            lines.append(f"| {key} | {m[key]:.4f}{_fmt_ci(result, key, False)} |")
        lines += ["", "| class | precision | recall | F1 | specificity | AUROC (OvR) | support |", "|---|---|---|---|---|---|---|"]
        for c, pc in m["per_class"].items():
            lines.append(f"| {c} | {pc['precision']:.3f} | {pc['recall']:.3f} | {pc['f1']:.3f} | {pc['specificity']:.3f} "
                         f"| {pc['auroc_ovr']:.3f} | {pc['support']} |")
        lines += ["", "Confusion matrix (rows = truth, columns = prediction): " + str(result["confusion"])]
    cal, ref = result["calibration"], result["referral"]
    lines += ["", f"Calibration: ECE {cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after temperature scaling.",
              f"Referral ({ref['uncertainty']}): {ref['rule']}; referred {ref['referred']} of {result['n_images']}; "
              f"accuracy {ref['accuracy_all']:.3f} on all, {ref['accuracy_not_referred']:.3f} on the rest.", "",
              f"Errors: {len(result['errors'])} (listed in metrics.json and predictions.csv)."]
    return "\n".join(lines) + "\n"
