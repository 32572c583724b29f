"""``pneumoscope gan evaluate``: the discriminator as a classifier, and how close the fakes are to real images.

(a) **Discriminator class head as a three-class classifier** (the seed notebook's second use of the
    ACGAN): softmax of its class logits on the GAN's own held-out validation patients and on the
    official test split, with :func:`~pneumoscope.evaluate.metrics.multiclass_metrics` and 95 %
    patient-bootstrap CIs (:func:`~pneumoscope.evaluate.bootstrap.bootstrap_ci`). Nothing is chosen
    on either split (the checkpoint is the last epoch); test is reported, not selected on.

(b) **Fréchet distance per class** between real validation images and as many synthetic images of
    the same class, in the penultimate-feature space (pooled features entering the classifier) of a
    trained pneumoscope classifier run (``--classifier RUN``). This is FID's formula (Heusel et al.
    2017) with *our own classifier instead of Inception-v3*, because no Inception weights are
    available offline and an ImageNet network is a questionable judge of radiographs anyway. The
    numbers are therefore **not comparable with published FID values**, only with each other (same
    classifier, same sample sizes). Both real and synthetic images go through the same path: GAN
    resolution (real images are squashed to it from the cache) → the classifier's own preprocessing
    (upscaling to its input size, CLAHE/blur if it uses them), so the distance measures content, not
    the resolution gap. A **real-vs-real baseline** (validation vs. an equally large random set of
    train images of the class) is reported beside it: with a few hundred images and a 1,000+-dim
    feature space the estimate is biased upwards, and the baseline shows the floor that sample size
    alone produces.

Outputs in ``OUT`` (default ``GAN_DIR/eval``): ``gan_eval.json``, ``gan_eval.md``, ``samples.png``
(a grid, one row per class), ``gan_report.html`` (self-contained).
"""

from __future__ import annotations

import functools
import html
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pneumoscope.errors import DatasetError
from pneumoscope.gan.train import (cached_images, discriminator_logits, load_gan, sample_grid, write_grid_png)
from pneumoscope.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- Fréchet distance
def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½)`` between two Gaussians.

    ``Tr((S1 S2)^½)`` is computed as the sum of the square roots of the eigenvalues of the symmetric
    PSD matrix ``S1^½ S2 S1^½`` (same eigenvalues as ``S1 S2``), with ``eigh`` rather than
    ``scipy.linalg.sqrtm``: real and stable for the rank-deficient covariances that a few hundred
    samples in a 1,280-dim space give; tiny negative eigenvalues from rounding are clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1_half @ s2 @ s1_half
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt))


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets (N, D) and (M, D)."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


class FeatureExtractor:
    """Penultimate features (``card.num_features``-dim pooled vector) of a trained pneumoscope classifier."""

    def __init__(self, classifier: str | Path) -> None:
        from pneumoscope.inference import Predictor

        self.predictor = Predictor.load(classifier)
        self.name = self.predictor.model_id

    @torch.no_grad()
    def __call__(self, u8_small: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Features of uint8 images at any size: the classifier's preprocessing (resize etc.) is applied first."""
        from pneumoscope.data.preprocess import preprocess

        p = self.predictor
        model = p.model.eval()
        out = []
        for i in range(0, len(u8_small), batch_size):
            u8 = torch.from_numpy(np.stack([preprocess(im, p.spec) for im in u8_small[i : i + batch_size]]))
            x = p.preset(u8[:, None]).to(p.device)
            out.append(model.head.forward_pre_logits(model.forward_features(x)).float().cpu().numpy())
        return np.concatenate(out)


# --------------------------------------------------------------------------- evaluation
def _discriminator_metrics(gan, images: np.ndarray, y: np.ndarray, groups: np.ndarray, names: list[str],
                           bootstrap: int, seed: int) -> dict:
    from pneumoscope.evaluate.bootstrap import bootstrap_ci
    from pneumoscope.evaluate.metrics import multiclass_metrics

    probs = torch.softmax(torch.from_numpy(discriminator_logits(gan, images)), 1).numpy().astype(np.float64)
    probs = probs / probs.sum(1, keepdims=True)
    m = multiclass_metrics(y, probs, names)
    res = {"n_images": int(len(y)), "n_patients": int(len(set(groups))), "metrics": m}
    if bootstrap:
        ci = bootstrap_ci(functools.partial(multiclass_metrics, class_names=names), y, probs, groups=groups,
                          n_boot=bootstrap, seed=seed)
        res["ci"] = {k: v for k, v in ci.items()
                     if k in ("accuracy", "macro_f1", "macro_auroc", "macro_recall") or k.endswith(".recall")}
    return res


def _test_rows(data_root: Path, names: list[str], progress: bool) -> pd.DataFrame:
    from pneumoscope.data.scan import scan_dataset
    from pneumoscope.data.tasks import task_labels

    manifest = scan_dataset(data_root, progress=progress) if not str(data_root).endswith(".parquet") else None
    if manifest is None:
        from pneumoscope.data.manifest import Manifest

        manifest = Manifest.load(data_root)
    df = manifest.df.reset_index(drop=True)
    mask, y, _ = task_labels(df, "three_class")
    rows = df[mask].assign(y=y)
    return rows[rows["official_split"] == "test"].reset_index(drop=True)


def evaluate_gan(gan_dir: str | Path, data_root: str | Path | None = None, *, classifier: str | Path | None = None,
                 out: str | Path | None = None, n_synthetic: int | None = None, bootstrap: int = 1000,
                 include_test: bool = True, cache_root: str | Path | None = None, seed: int = 0,
                 progress: bool = True) -> dict:
    """Evaluate a trained ACGAN (see the module docstring); returns the summary written to ``gan_eval.json``."""
    from pneumoscope.data.cache import default_cache_root
    from pneumoscope.gan.sample import generate

    gan_dir = Path(gan_dir)
    gan, meta, ckpt = load_gan(gan_dir)
    cfg = meta["config"]
    names = list(meta["class_names"])
    out = Path(out) if out else gan_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    cache_root = Path(cache_root) if cache_root else default_cache_root()
    split_csv = gan_dir / "split.csv"
    if not split_csv.exists():
        raise DatasetError(f"{split_csv}: missing (the GAN directory is incomplete)")
    rows = pd.read_csv(split_csv, dtype={"patient_id": str}, keep_default_na=False)
    if data_root is None:
        import json

        data_root = Path(json.loads((gan_dir / "config.json").read_text())["data"])
    size = int(meta["model"]["size"])

    result: dict = {"gan_dir": str(gan_dir), "checkpoint": ckpt.name, "epoch": meta.get("epoch"), "size": size,
                    "class_names": names, "data": str(data_root), "config": cfg}
    val = rows[rows["split"] == "val"].reset_index(drop=True)
    val_u8, keep = cached_images(val, size, cache_root, progress=progress)
    val = val[keep].reset_index(drop=True)
    y_val = val["y"].to_numpy(np.int64)
    result["discriminator"] = {"val": _discriminator_metrics(gan, val_u8, y_val, val["patient_id"].to_numpy(str),
                                                             names, bootstrap, seed)}
    if include_test:
        test = _test_rows(Path(data_root), names, progress)
        if len(test):
            test_u8, keep = cached_images(test, size, cache_root, progress=progress)
            test = test[keep].reset_index(drop=True)
            result["discriminator"]["test"] = _discriminator_metrics(
                gan, test_u8, test["y"].to_numpy(np.int64), test["patient_id"].to_numpy(str), names, bootstrap, seed)
        else:
            log.warning("%s: no official test images; the discriminator is evaluated on validation only", data_root)

    grid = write_grid_png(sample_grid(gan, names, 8, int(cfg.get("seed", 0))), names, out / "samples.png",
                          title=f"ACGAN {size} px, epoch {meta.get('epoch')}")
    result["samples_png"] = grid.name

    if classifier is not None:
        fx = FeatureExtractor(classifier)
        train = rows[rows["split"] == "train"].reset_index(drop=True)
        rng = np.random.default_rng(seed)
        fd = {}
        for k, c in enumerate(names):
            real = val_u8[y_val == k]
            n_fake = n_synthetic or len(real)
            fake = generate(gan, k, n_fake, seed=seed)
            tr = train[train["y"] == k]
            tr = tr.iloc[np.sort(rng.permutation(len(tr))[: len(real)])]
            tr_u8, _ = cached_images(tr, size, cache_root, progress=False)
            f_real, f_fake, f_train = fx(real), fx(fake), fx(tr_u8)
            fd[c] = {"fd_synthetic_vs_val": frechet_distance_features(f_fake, f_real),
                     "fd_train_vs_val_baseline": frechet_distance_features(f_train, f_real),
                     "n_val": int(len(real)), "n_synthetic": int(n_fake), "n_train_baseline": int(len(tr_u8)),
                     "feature_dim": int(f_real.shape[1])}
            log.info("Fréchet distance %s: synthetic vs val %.2f | real train vs val (baseline) %.2f", c,
                     fd[c]["fd_synthetic_vs_val"], fd[c]["fd_train_vs_val_baseline"])
        result["frechet"] = {"classifier": str(classifier), "classifier_model": fx.name,
                             "classifier_input": fx.predictor.spec.to_dict(), "per_class": fd,
                             "note": "Fréchet distance in the penultimate-feature space of our own classifier "
                                     "(not Inception-v3: no Inception weights offline); not comparable with "
                                     "published FID values. Real and synthetic images both pass through the GAN "
                                     "resolution and then the classifier's preprocessing."}
    atomic_write_json(out / "gan_eval.json", result)
    atomic_write_text(out / "gan_eval.md", gan_markdown(result))
    atomic_write_text(out / "gan_report.html", gan_html(result, out))
    log.info("GAN evaluation written to %s", out)
    result["out_dir"] = str(out)
    return result


# --------------------------------------------------------------------------- reporting
def _ci_text(res: dict, key: str) -> str:
    ci = (res.get("ci") or {}).get(key)
    if not ci or ci.get("lo") is None or ci["lo"] != ci["lo"]:
        return ""
    return f" [{ci['lo']:.3f}, {ci['hi']:.3f}]"


def _disc_rows(result: dict) -> list[list[str]]:
    rows = []
    for split, res in result["discriminator"].items():
        m = res["metrics"]
        rec = ", ".join(f"{c} {m['per_class'][c]['recall']:.3f}{_ci_text(res, f'per_class.{c}.recall')}"
                        for c in result["class_names"])
        rows.append([split, f"{res['n_images']} ({res['n_patients']} patients)",
                     f"{m['accuracy']:.3f}{_ci_text(res, 'accuracy')}", f"{m['macro_f1']:.3f}{_ci_text(res, 'macro_f1')}",
                     f"{m['macro_auroc']:.3f}{_ci_text(res, 'macro_auroc')}", rec])
    return rows


DISC_HEADER = ["split", "images", "accuracy", "macro F1", "macro AUROC (OvR)", "recall per class"]
FD_HEADER = ["class", "FD synthetic vs val", "FD real train vs val (baseline)", "n val", "n synthetic"]


def _fd_rows(result: dict) -> list[list[str]]:
    fr = result.get("frechet")
    if not fr:
        return []
    return [[c, f"{v['fd_synthetic_vs_val']:.2f}", f"{v['fd_train_vs_val_baseline']:.2f}", str(v["n_val"]),
             str(v["n_synthetic"])] for c, v in fr["per_class"].items()]


def gan_markdown(result: dict) -> str:
    """The evaluation as Markdown: discriminator-as-classifier table and Fréchet distances."""
    lines = [f"# ACGAN evaluation ({result['size']} px, epoch {result['epoch']})", "",
             "## Discriminator class head as a three-class classifier", "",
             "95 % CIs: patient bootstrap. Last checkpoint; nothing selected on val or test.", "",
             "| " + " | ".join(DISC_HEADER) + " |", "|" + "---|" * len(DISC_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _disc_rows(result)]
    lines += ["", "## Fréchet distance per class", ""]
    if result.get("frechet"):
        fr = result["frechet"]
        lines += [f"Feature space: penultimate layer of `{fr['classifier_model']}` ({fr['classifier']}). {fr['note']}", "",
                  "| " + " | ".join(FD_HEADER) + " |", "|" + "---|" * len(FD_HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in _fd_rows(result)]
    else:
        lines.append("Not computed (pass `--classifier RUN`).")
    lines += ["", f"Samples: `{result['samples_png']}` (fixed noise, one row per class)."]
    return "\n".join(lines) + "\n"


def gan_html(result: dict, out_dir: Path) -> str:
    """A self-contained HTML page (sample grid inlined) with the same tables as :func:`gan_markdown`."""
    from pneumoscope.report.html import CSS, _img, _table

    parts = [f"<h1>ACGAN evaluation</h1><p class='sub'>{result['size']} px, epoch {result['epoch']}, "
             f"{html.escape(result['gan_dir'])}</p>",
             "<h2>Samples</h2>", _img(out_dir / result["samples_png"], "fixed-noise samples, one row per class"),
             "<h2>Discriminator class head as a three-class classifier</h2>",
             "<p class='note'>95 % CIs by patient bootstrap; last checkpoint, nothing selected on val or test.</p>",
             _table(_disc_rows(result), DISC_HEADER), "<h2>Fréchet distance per class</h2>"]
    if result.get("frechet"):
        parts += [f"<p class='note'>{html.escape(result['frechet']['note'])}</p>", _table(_fd_rows(result), FD_HEADER)]
    else:
        parts.append("<p class='note'>Not computed (pass <code>--classifier RUN</code>).</p>")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>ACGAN evaluation</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
