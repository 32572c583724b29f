"""The model shipped inside the package, so ``pneumoscope predict`` and ``serve`` work right after install.

``pneumoscope bundle RUN`` turns a trained and test-evaluated run (the ``default`` config) into
``src/pneumoscope/weights/default/``: fp16 ``model.safetensors`` plus ``model.json`` holding the
model card, the validation-chosen threshold and temperature, the validation metrics and the
official-test metrics with their CIs. Only safetensors and JSON: nothing is unpickled at load time.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

from safetensors.torch import load_file, save_file

from pneumoscope.errors import ModelError
from pneumoscope.utils.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

MAX_BUNDLE_BYTES = 10 * 1024 * 1024


def bundled_model_dir() -> Path:
    """Where the packaged default model lives (it may be absent in a development checkout)."""
    return Path(str(resources.files("pneumoscope").joinpath("weights", "default")))


def resolve_model(model: str | Path | None) -> Path:
    """``model`` if given, else the bundled model; a clear error if neither exists."""
    if model:
        return Path(model)
    d = bundled_model_dir()
    if not (d / "model.json").exists():
        raise ModelError(f"{d}: no bundled model in this installation; pass --model RUN_OR_MODEL_DIR "
                         "(train one with `pneumoscope train --config default`)")
    return d


def card_test_metrics(ev: dict, split: str = "test") -> dict:
    """The ``test_metrics`` block of a model card from an evaluation's ``metrics.json``."""
    keep = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "auroc", "pr_auc", "brier",
            "tp", "fp", "tn", "fn", "n", "macro_auroc", "macro_f1")
    return {"split": split, "data": "Kermany et al. 2018 official test split (624 images)",
            "threshold": ev["threshold"], **{k: ev["metrics"][k] for k in keep if k in ev["metrics"]},
            "ci": {k: v for k, v in (ev.get("ci") or {}).items() if not k.startswith("per_class")},
            # evaluations before single-pass metrics scored the TTA mean when tta_samples > 0
            "predictions": "single pass" if ("single_pass_threshold" in (ev.get("referral") or {})
                                             or not ev.get("tta_samples")) else f"mean of {ev['tta_samples']} TTA samples"}


def package_model(run: str | Path, out: str | Path | None = None, *, split: str = "test") -> Path:
    """Write the fp16 bundle of ``run``'s best checkpoint with its card and metrics into ``out``."""
    from pneumoscope.inference import resolve_model_dir

    run = Path(run)
    src = resolve_model_dir(run)
    out = Path(out) if out else bundled_model_dir()
    meta = json.loads((src / "model.json").read_text())
    ev_path = run / "eval" / split / "metrics.json"
    if not ev_path.exists():
        raise ModelError(f"{run}: evaluate it first (`pneumoscope evaluate {run} --split {split}`): "
                         "the bundle's card carries its test metrics")
    ev = json.loads(ev_path.read_text())
    weights = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(src / "model.safetensors")).items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(weights, str(tmp))
    size = (out / "model.safetensors").stat().st_size
    if size > MAX_BUNDLE_BYTES:
        raise ModelError(f"{out / 'model.safetensors'}: {size / 1e6:.1f} MB is over the 10 MB bundle limit")
    meta["weights_dtype"] = "float16"
    meta["test_metrics"] = card_test_metrics(ev, split)
    ref = ev.get("referral") or {}
    if ref.get("single_pass_threshold") is not None:  # the uncertainty predict and serve compute
        meta["refer_threshold"] = ref["single_pass_threshold"]
        meta["refer_rule"] = (f"single-pass predictive entropy > {ref['single_pass_threshold']:.4g}, fitted to refer "
                              f"the same share of the validation split as: {ref.get('rule')}")
    elif ref.get("uncertainty_threshold") is not None and ref.get("uncertainty") == "entropy of the prediction":
        meta["refer_threshold"] = ref["uncertainty_threshold"]  # an older evaluation without TTA
        meta["refer_rule"] = f"{ref.get('rule')}; uncertainty = {ref.get('uncertainty')}"
    elif ref.get("uncertainty_threshold") is not None:
        raise ModelError(f"{run}: its evaluation predates single-pass referral cut-offs; run "
                         f"`pneumoscope evaluate {run} --split {split}` again before bundling")
    meta["intended_use"] = "research and education only; not a medical device, not for clinical diagnosis"
    meta["training_data"] = "Kermany et al., Cell 2018 (Mendeley doi:10.17632/rscbjbr9sj.2, CC BY 4.0), official train split"
    meta["source_run"] = {"config": meta.get("run_name"), "produced_by": f"pneumoscope bundle {run}"}
    atomic_write_json(out / "model.json", meta)
    log.info("bundled %s (%.1f MB fp16) into %s", meta["model"].get("name"), size / 1e6, out)
    return out
