"""Texture shortcut: how far image sharpness alone separates the classes, and how much a model leans on it.

Part 1 (the data; choices use train only). For every cached 224-px image, its high-frequency
energy ``mean |x - GaussianBlur(x, σ=0.7)|`` (grey levels). The table gives it per official
split and class, the AUROC of that one number for normal vs pneumonia on the patient-grouped
train/val splits, and the validation AUROC of a logistic regression on eight low-level statistics
(intensity mean/std, log Laplacian variance, high-frequency energy, dark fraction, three border
means) fitted on the train portion. The test rows are descriptive only: nothing is chosen on them.

Part 2 (each ``--runs`` model, validation split only). The model's validation AUROC and its
sensitivity/specificity at its own validation threshold, on the clean images and on a
"texture-swapped" copy: normal films smoothed (``adjust_sharpness`` factor 0.3: ×0.73 of their
high-frequency energy, the pneumonia films' level) and pneumonia films sharpened (factor 1.7:
×1.30, the normals' level). A model that reads texture as a class cue loses specificity on the
swapped copy; one that reads the lungs does not. This is a validation-only stress test, usable
for choosing between recipes when plain validation AUROC is saturated (0.999+).

    PYTHONPATH=src python benchmarks/shortcut_texture.py --runs out/run/runs/default out/exp_sharp
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, fmt, machine_info, md_table, publish  # noqa: E402

#: sharpness factors that move each class's high-frequency energy to the other class's level
SMOOTH_NORMAL, SHARPEN_PNEUMONIA = 0.3, 1.7


def high_frequency(img: np.ndarray) -> float:
    import cv2

    x = img.astype(np.float32)
    return float(np.abs(x - cv2.GaussianBlur(x, (0, 0), 0.7)).mean())


def low_level_features(img: np.ndarray) -> list[float]:
    import cv2

    g = img.astype(np.float32)
    return [g.mean(), g.std(), float(np.log1p(cv2.Laplacian(g, cv2.CV_32F).var())), high_frequency(img),
            float((g < 20).mean()), g[:, :20].mean(), g[:, -20:].mean(), g[:20].mean()]


def texture_swapped(u8: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Class 0 (normal) smoothed, every other class sharpened, image by image (uint8 (N, H, W))."""
    from pneumoscope.data.presets import adjust_sharpness

    return np.stack([adjust_sharpness(im, SMOOTH_NORMAL if c == 0 else SHARPEN_PNEUMONIA) for im, c in zip(u8, y)])


def data_part(data: str) -> tuple[dict, str]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from pneumoscope.data.cache import ImageCache, default_cache_root
    from pneumoscope.data.preprocess import PreprocessSpec
    from pneumoscope.train.fit import load_manifest

    m = load_manifest(data, val_fraction=0.15, seed=0, progress=False)
    df = m.df[m.df["status"] == "ok"].reset_index(drop=True)
    cache = ImageCache(default_cache_root(), PreprocessSpec())
    cache.update(list(df["path"]), list(df["content_hash"]), progress=False)
    imgs = cache.get(list(df["content_hash"]))
    feats = np.array([low_level_features(im) for im in imgs])
    hf = feats[:, 3]
    y = (df["label"].str.upper() != "NORMAL").to_numpy().astype(int)
    groups = {}
    for split in ("train", "val", "test"):
        for lab, name in ((0, "normal"), (1, "pneumonia")):
            sel = (df["split"] == split).to_numpy() & (y == lab)
            groups[f"{split}/{name}"] = {"n": int(sel.sum()), "hf_mean": float(hf[sel].mean()),
                                         "hf_sd": float(hf[sel].std())}
    tr, va = (df["split"] == "train").to_numpy(), (df["split"] == "val").to_numpy()
    mu, sd = feats[tr].mean(0), feats[tr].std(0) + 1e-9
    lr = LogisticRegression(max_iter=5000).fit((feats[tr] - mu) / sd, y[tr])
    res = {
        "groups": groups,
        "hf_auroc_train": float(roc_auc_score(y[tr], -hf[tr])),
        "hf_auroc_val": float(roc_auc_score(y[va], -hf[va])),
        "low_level_lr_val_auroc": float(roc_auc_score(y[va], lr.predict_proba((feats[va] - mu) / sd)[:, 1])),
        "pneumonia_to_normal_hf_ratio_train": groups["train/pneumonia"]["hf_mean"] / groups["train/normal"]["hf_mean"],
    }
    rows = [[k, v["n"], fmt(v["hf_mean"], 3), fmt(v["hf_sd"], 3)] for k, v in groups.items()]
    md = ("## Part 1: high-frequency energy of the 224-px images (grey levels)\n\n"
          + md_table(["split / class", "images", "mean", "sd"], rows)
          + f"\n\n- High-frequency energy alone, normal vs pneumonia: AUROC {res['hf_auroc_train']:.3f} on the "
          f"train portion, {res['hf_auroc_val']:.3f} on the patient-grouped validation split (a lower energy = "
          f"pneumonia).\n- A logistic regression on 8 low-level statistics (no network), fitted on train: "
          f"validation AUROC {res['low_level_lr_val_auroc']:.3f}.\n- Train pneumonia ÷ normal energy: "
          f"×{res['pneumonia_to_normal_hf_ratio_train']:.2f}. The test rows are descriptive; nothing is chosen "
          f"on them.\n")
    return res, md


def val_rows(run: str, meta: dict, data: str):
    """The run's validation rows from its ``split.csv``; for a bare model directory (the bundled
    model) the same patient split re-cut from the dataset with the model's seed."""
    from pneumoscope.data.tasks import task_labels
    from pneumoscope.evaluate.run import _val_rows
    from pneumoscope.train.fit import load_manifest

    got = _val_rows(Path(run), None, meta["task"])
    if got is not None:
        return got
    from pneumoscope.evaluate.run import split_of

    m = load_manifest(data, progress=False, **split_of(meta))
    df = m.df[m.df["status"] == "ok"].reset_index(drop=True)
    mask, y, _ = task_labels(df, meta["task"])
    rows = df[mask].assign(y=y)
    rows = rows[rows["split"] == "val"].reset_index(drop=True)
    return rows, rows["y"].to_numpy(np.int64)


def variant_probs(run: str, data: str):
    """(predictor, validation labels, {"clean": probs, "texture_swapped": probs}) for a model."""
    import torch

    from pneumoscope.data.cache import ImageCache, default_cache_root
    from pneumoscope.inference import Predictor

    pred = Predictor.load(run)
    rows, y = val_rows(run, pred.meta, data)
    cache = ImageCache(default_cache_root(), pred.spec)
    cache.update(list(rows["path"]), list(rows["content_hash"]), progress=False)
    u8 = cache.get(list(rows["content_hash"]))
    return pred, y, {name: pred.predict_u8(torch.from_numpy(np.ascontiguousarray(imgs))).probs
                     for name, imgs in (("clean", u8), ("texture_swapped", texture_swapped(u8, y)))}


def model_part(run: str, data: str) -> dict:
    from sklearn.metrics import roc_auc_score

    pred, y, variants = variant_probs(run, data)
    out = {"run": run, "n_val": int(len(y)), "threshold": pred.threshold}
    for name, probs in variants.items():
        if probs.shape[1] == 2 and pred.threshold is not None:
            p = probs[:, 1]
            dec = (p >= pred.threshold).astype(int)
            out[name] = {"auroc": float(roc_auc_score(y, p)), "sensitivity": float(dec[y == 1].mean()),
                         "specificity": float(1 - dec[y == 0].mean()), "accuracy": float((dec == y).mean()),
                         "brier": float(np.mean((p - y) ** 2))}
        else:
            dec = probs.argmax(1)
            out[name] = {"macro_auroc": float(roc_auc_score(y, probs, multi_class="ovr", average="macro")),
                         "accuracy": float((dec == y).mean()), "normal_recall": float((dec[y == 0] == 0).mean())}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, "shortcut_texture")
    ap.add_argument("--runs", nargs="*", default=[], help="run directories to stress-test on their validation split")
    args = ap.parse_args()
    machine = machine_info()
    data_res, md = data_part(args.data)
    runs = [model_part(r, args.data) for r in args.runs]
    if runs:
        rows = []
        for r in runs:
            for name in ("clean", "texture_swapped"):
                m = r[name]
                if "auroc" in m:
                    rows.append([f"`{r['run']}`", name, fmt(m["auroc"], 4), fmt(100 * m["sensitivity"]),
                                 fmt(100 * m["specificity"]), fmt(100 * m["accuracy"])])
                else:
                    rows.append([f"`{r['run']}`", name, fmt(m["macro_auroc"], 4), "–",
                                 fmt(100 * m["normal_recall"]), fmt(100 * m["accuracy"])])
        md += ("\n## Part 2: each model on its validation split, clean vs texture-swapped\n\n"
               f"Normal films smoothed (sharpness factor {SMOOTH_NORMAL}), pneumonia films sharpened "
               f"({SHARPEN_PNEUMONIA}); decisions at the run's own validation threshold (binary) or argmax "
               "(multi-class: the specificity column is normal recall).\n\n"
               + md_table(["run", "validation images as", "AUROC", "sensitivity %", "specificity %", "accuracy %"], rows)
               + "\n")
    publish(args, {"data": data_res, "runs": runs}, md, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
