"""``pneumoscope report RUN``: one self-contained HTML file with every result a reviewer asks for.

Sections: model card (intended use, data, limits) · dataset summary (from the data check) ·
training curves · test metrics with 95 % CIs and counts · operating point · ROC / PR ·
confusion matrix · calibration · uncertainty and referral · Grad-CAM galleries with the
lung-field attention check. Images are inlined as base64 ``data:`` URIs, so the file can be
mailed or archived alone. Sections whose inputs are missing say so instead of disappearing.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from pneumoscope.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

SECTIONS = ("Model card", "Dataset", "Training", "Test metrics", "Operating point", "ROC and PR curves",
            "Confusion matrix", "Calibration", "Uncertainty and referral", "Grad-CAM", "Reproduce")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0} .sub{color:#666;margin-top:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em} td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3} img{max-width:100%;border:1px solid #eee} .grid{display:grid;grid-template-columns:1fr 1fr;gap:1em}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.6em 1em} .note{color:#555;font-size:.9em}
code,pre{background:#f6f6f6;padding:.1em .3em} pre{padding:.6em;overflow-x:auto}
"""


def _img(path: Path, alt: str) -> str:
    if not path.exists():
        return f'<p class="note">({html.escape(alt)}: not available — {html.escape(path.name)} missing)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption class="note">{html.escape(alt)}</figcaption></figure>'


def _table(rows: list[list[Any]], header: list[str]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
    return str(v)


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.1f} % ({k}/{n})" if n else "—"


def _ci(result: dict, key: str, pct: bool) -> str:
    ci = (result.get("ci") or {}).get(key)
    if not ci or ci.get("lo") is None:
        return "—"
    f = (lambda v: f"{100 * v:.1f} %") if pct else (lambda v: f"{v:.3f}")
    return f"{f(ci['lo'])} – {f(ci['hi'])}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _section(title: str, body: str) -> str:
    anchor = title.lower().replace(" ", "-")
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def validation_description(meta: dict) -> str:
    """How the model's validation set was made (``model.json``'s ``val_split``), in a sentence."""
    vs = meta.get("val_split") or {}
    if vs.get("val_source"):
        return (f"The validation set is external: the labelled images of {html.escape(str(vs['val_source']))} "
                "(its test split unused); the official train split trained, less any image sharing a patient or the "
                "pixels with that set.")
    if vs.get("method") == "ordered":
        return ("The validation split is cut from the official train split by patient: the earliest patient numbers "
                "of each naming series (a temporal split).")
    return "The validation split is cut from the official train split by patient."


def model_card_html(meta: dict, ev: dict | None) -> str:
    m = meta.get("model", {})
    card = m.get("card", {})
    val = meta.get("val_metrics", {})
    rows = [["architecture", m.get("name")], ["weights at start", meta.get("pretrained_source") or "random init"],
            ["task / classes", f"{meta.get('task')}: {', '.join(meta.get('class_names', []))}"],
            ["input", f"{meta['preprocess']['size']} px grayscale, resize {meta['preprocess']['resize']}, "
                      f"CLAHE {meta['preprocess']['clahe']}, blur σ {meta['preprocess']['blur_sigma']}"],
            ["normalisation", f"mean {card.get('mean')} std {card.get('std')} ({card.get('in_chans')} channel(s))"],
            ["training images (per class)", meta.get("train_counts")], ["validation images (per class)", meta.get("val_counts")],
            ["selected epoch", meta.get("epoch")], ["validation AUROC", val.get("auroc", val.get("macro_auroc"))],
            ["license of the starting weights", card.get("license")]]
    intended = ("<p><b>Intended use:</b> research and education — a demonstration of how a pneumonia classifier for "
                "pediatric chest radiographs is trained and evaluated. <b>Not a medical device; not for clinical "
                "diagnosis.</b></p>"
                "<p><b>Data:</b> Kermany et al. (Cell 2018; Mendeley doi:10.17632/rscbjbr9sj.2, CC BY 4.0): pediatric "
                "(1–5 years) anterior-posterior chest X-rays from Guangzhou Women and Children's Medical Center. "
                f"{validation_description(meta)}</p>"
                "<p><b>Limits:</b> one hospital, children only, images downsampled to 224 px; labels are per image from "
                "the dataset, not from a reference standard; the official test split is known to differ in "
                "distribution from train (more borderline normals), so thresholds chosen on validation may not "
                "transfer; performance on adults, other hospitals, devices or views is unknown. Grad-CAM maps are "
                "coarse and do not prove causal reasoning.</p>")
    return _table(rows, ["field", "value"]) + intended


def dataset_html(check_dir: Path | None) -> str:
    if check_dir is None or not (check_dir / "data_check.json").exists():
        return '<p class="note">No data check found (run <code>pneumoscope data check</code>).</p>'
    md = (check_dir / "data_check.md").read_text() if (check_dir / "data_check.md").exists() else ""
    figs = "".join(_img(check_dir / f, f) for f in ("counts.png", "sizes.png", "samples.png"))
    return f"{markdown_html(md)}<div class='grid'>{figs}</div>"


def markdown_html(md: str) -> str:
    """The data check's Markdown as HTML inside a report section (its tables as tables).

    Raw HTML in the text (a file name, say) is escaped, not passed through. The document's own
    ``# title`` is dropped and ``##`` headings become ``<h3>``, under the section's ``<h2>``.
    """
    from markdown_it import MarkdownIt

    lines = md.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    lines = ["#" + ln if ln.startswith("## ") else ln for ln in lines]
    return MarkdownIt("commonmark", {"html": False}).enable("table").render("\n".join(lines))


def training_html(run_dir: Path) -> str:
    parts = [_img(run_dir / "curves.png", "training curves (loss, AUROC, learning rate per epoch)")]
    if (run_dir / "metrics.csv").exists():
        df = pd.read_csv(run_dir / "metrics.csv")
        cols = [c for c in ("epoch", "phase", "lr", "train_loss", "val_loss", "val_accuracy", "val_auroc",
                            "images_per_s", "epoch_seconds") if c in df]
        parts.append(_table(df[cols].values.tolist(), cols))
    summ = _read_json(run_dir / "summary.json")
    if summ and "train_seconds" in summ:
        parts.append(f"<p>Wall time of training (incl. caching and feature extraction): {summ['train_seconds'] / 60:.1f} min.</p>")
    return "".join(parts)


def metrics_html(ev: dict) -> str:
    m = ev["metrics"]
    if "tp" in m:
        tp, fp, tn, fn = m["tp"], m["fp"], m["tn"], m["fn"]
        half = ev["metrics_at_0.5"]
        rows = [["accuracy", _pct(tp + tn, tp + tn + fp + fn), _ci(ev, "accuracy", True), _pct(half["tp"] + half["tn"], half["n"])],
                ["sensitivity (recall)", _pct(tp, tp + fn), _ci(ev, "sensitivity", True), _pct(half["tp"], half["tp"] + half["fn"])],
                ["specificity", _pct(tn, tn + fp), _ci(ev, "specificity", True), _pct(half["tn"], half["tn"] + half["fp"])],
                ["precision (PPV)", _pct(tp, tp + fp), _ci(ev, "precision", True), _pct(half["tp"], half["tp"] + half["fp"])],
                ["NPV", _pct(tn, tn + fn), _ci(ev, "npv", True), _pct(half["tn"], half["tn"] + half["fn"])],
                ["F1", f"{m['f1']:.4f}", _ci(ev, "f1", False), f"{half['f1']:.4f}"],
                ["AUROC", f"{m['auroc']:.4f}", _ci(ev, "auroc", False), "(threshold-free)"],
                ["PR-AUC", f"{m['pr_auc']:.4f}", _ci(ev, "pr_auc", False), "(threshold-free)"],
                ["Brier score", f"{m['brier']:.4f}", _ci(ev, "brier", False), "(threshold-free)"]]
        head = ["metric", f"at the validation threshold {ev['threshold']['value']:.4f}", "95 % CI (patient bootstrap)",
                "at 0.5 (shown for reference)"]
        errs = ev.get("errors", [])
        fns = [e for e in errs if e["kind"] == "false_negative"]
        fps = [e for e in errs if e["kind"] == "false_positive"]
        lists = (f"<details><summary>False negatives: {len(fns)} (missed pneumonia)</summary>"
                 + _table([[Path(e["path"]).name, e["patient_id"], f"{e['prob']:.3f}"] for e in fns], ["file", "patient", "P(decision)"])
                 + f"</details><details><summary>False positives: {len(fps)}</summary>"
                 + _table([[Path(e["path"]).name, e["patient_id"], f"{e['prob']:.3f}"] for e in fps], ["file", "patient", "P(decision)"])
                 + "</details>")
        return (f"<p>{ev['n_images']} images from {ev['n_patients']} patients ({html.escape(ev['split'])} split). "
                f"Every percentage is shown with its integer counts.</p>" + _table(rows, head) + lists)
    rows = [[k, f"{m[k]:.4f}", _ci(ev, k, False)] for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_auroc")]
    per = [[c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", f"{v['specificity']:.3f}",
            f"{v['auroc_ovr']:.3f}", v["support"]] for c, v in m["per_class"].items()]
    return (_table(rows, ["metric", "value", "95 % CI (patient bootstrap)"])
            + _table(per, ["class", "precision", "recall", "F1", "specificity", "AUROC (one-vs-rest)", "support"]))


def operating_point_html(ev: dict) -> str:
    t = ev["threshold"]
    desc = t.get("rule_description") or t.get("rule")
    ach = t.get("achieved") or t.get("achieved_") or {}
    extra = f" On validation it gave sensitivity {ach.get('sensitivity'):.3f} and specificity {ach.get('specificity'):.3f}." if ach.get("sensitivity") is not None else ""
    if len(ev.get("class_names") or []) > 2:  # no threshold: the most probable class wins
        return (f"<p>Decision: the <b>argmax</b> of the calibrated softmax over {len(ev['class_names'])} classes, no "
                f"threshold. Temperature T = {ev['temperature']:.3f} (fitted on the validation "
                f"set at training time and applied unchanged to the {html.escape(ev['split'])} split).</p>")
    return (f"<p>Decision threshold <b>{t['value']:.4f}</b> on the calibrated P(positive), chosen by <b>{html.escape(str(desc))}</b> "
            f"on the validation set at training time and applied unchanged to the {html.escape(ev['split'])} split.{extra} "
            f"Temperature T = {ev['temperature']:.3f} (fitted on validation).</p>")


def gradcam_html(cam: dict | None, eval_dir: Path) -> str:
    if not cam:
        return '<p class="note">Grad-CAM galleries were not computed.</p>'
    imgs = "".join(_img(eval_dir / fname, f"{name}") for name, fname in cam.get("galleries", {}).items())
    att = cam.get("attention", {})
    rows = []
    if isinstance(att.get("overall"), dict):
        o = att["overall"]
        rows.append(["all", "all", o.get("n"), o.get("mean_lung_attention"), o.get("mean_border_attention")])
    for group in ("by_class", "by_outcome"):
        for k, v in (att.get(group) or {}).items():
            if isinstance(v, dict):
                rows.append([group.replace("by_", ""), k, v.get("n"), v.get("mean_lung_attention"),
                             v.get("mean_border_attention")])
    method = ("<p class='note'>Lung-field attention = share of the Grad-CAM mass that falls inside an automatic lung mask "
              "(threshold-based segmentation of the dark lung fields, with an anatomical two-ellipse prior as fallback; "
              "see <code>pneumoscope.explain.lungs</code> for the method and its limits). Border attention = share in the outer "
              "10 % frame, where text markers sit. Mask methods used: "
              f"{html.escape(json.dumps(att.get('mask_method_counts', {})))}.</p>")
    return (_table(rows, ["group", "name", "images", "lung attention", "border attention"]) if rows else "") + method + imgs


def build_report(run_dir: str | Path, out: str | Path | None = None, *, eval_dir: str | Path | None = None,
                 data_check_dir: str | Path | None = None, galleries: bool = True) -> Path:
    """Write ``out`` (default ``RUN/report.html``) from a run directory and its test evaluation."""
    from pneumoscope.inference import resolve_model_dir

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    eval_dir = Path(eval_dir) if eval_dir else run_dir / "eval" / "test"
    model_dir = resolve_model_dir(run_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    ev = _read_json(eval_dir / "metrics.json")
    cam = _read_json(eval_dir / "gradcam.json")
    if ev is not None and cam is None and galleries:
        cam = compute_galleries(run_dir, eval_dir)
    body = [_section("Model card", model_card_html(meta, ev)),
            _section("Dataset", dataset_html(Path(data_check_dir) if data_check_dir else None)),
            _section("Training", training_html(run_dir))]
    if ev is None:
        body.append('<div class="warn">No test evaluation found: run <code>pneumoscope evaluate RUN</code> first.</div>')
    else:
        body += [_section("Test metrics", metrics_html(ev)),
                 _section("Operating point", operating_point_html(ev)),
                 _section("ROC and PR curves", "<div class='grid'>" + _img(eval_dir / "roc.png", "ROC curve") + _img(eval_dir / "pr.png", "Precision–recall curve") + "</div>"),
                 _section("Confusion matrix", _img(eval_dir / "confusion.png", "confusion matrix at the validation threshold")),
                 _section("Calibration", f"<p>Expected calibration error {ev['calibration']['ece_before']:.4f} before and "
                          f"{ev['calibration']['ece_after']:.4f} after temperature scaling (T = {ev['calibration']['temperature']:.3f}, fitted on validation).</p>"
                          + _img(eval_dir / "reliability.png", "reliability diagram")),
                 _section("Uncertainty and referral", f"<p>Uncertainty: {html.escape(ev['referral']['uncertainty'])}. Rule: {html.escape(ev['referral']['rule'])}. "
                          f"Referred {ev['referral']['referred']} of {ev['n_images']} images; accuracy {ev['referral']['accuracy_all']:.3f} on all, "
                          f"{ev['referral']['accuracy_not_referred']:.3f} on those not referred; area under the risk–coverage curve {ev['referral']['aurc']:.4f}.</p>"
                          + _img(eval_dir / "coverage.png", "accuracy vs coverage (selective prediction)")),
                 _section("Grad-CAM", gradcam_html(cam, eval_dir))]
    cfg = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    env = (run_dir / "env.json").read_text() if (run_dir / "env.json").exists() else ""
    body.append(_section("Reproduce", f"<p>Resolved config:</p><pre>{html.escape(cfg)}</pre><p>Environment:</p><pre>{html.escape(env)}</pre>"))
    toc = " · ".join(f'<a href="#{s.lower().replace(" ", "-")}">{s}</a>' for s in SECTIONS)
    title = f"pneumoscope report — {meta.get('run_name', run_dir.name)} ({meta['model'].get('name')})"
    doc = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
           f"<p class='sub'>Research and education only — not a diagnostic device.</p><nav>{toc}</nav>{''.join(body)}</body></html>")
    atomic_write_text(out, doc)
    log.info("report written to %s", out)
    return out


def compute_galleries(run_dir: Path, eval_dir: Path, n_per_group: int = 8) -> dict | None:
    """Grad-CAM galleries (TP/TN/FP/FN) and lung attention from the evaluation's predictions."""
    try:
        from pneumoscope.explain.gallery import outcome_galleries
        from pneumoscope.inference import Predictor
    except ImportError as err:  # pragma: no cover - the explain package ships with pneumoscope
        log.warning("Grad-CAM galleries unavailable: %s", err)
        return None
    pred = pd.read_csv(eval_dir / "predictions.csv")
    ev = json.loads((eval_dir / "metrics.json").read_text())
    names = ev["class_names"]
    rows = pd.DataFrame({"path": pred["path"], "label": pred["label"].map(names.index),
                         "decision": pred["decision"].map(names.index),
                         "prob": pred[[f"prob_{c}" for c in names]].max(axis=1)})
    predictor = Predictor.load(run_dir)
    cam = outcome_galleries(predictor, rows, eval_dir, n_per_group=n_per_group)
    atomic_write_json(eval_dir / "gradcam.json", cam)
    return cam
