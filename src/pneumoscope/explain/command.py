"""``pneumoscope explain RUN IMAGES... --out DIR``: a three-panel Grad-CAM figure per image plus a JSON summary.

For each file: decode (JPEG/PNG/DICOM), preprocess with the model's own preprocessing, predict
(calibrated probabilities, stored threshold), compute the CAM of the decided class (or of
``--target``), measure how much of the CAM lies in the lung fields and in the outer frame, and
write ``<out>/<stem>_cam.png`` (image | heatmap | overlay with the lung-field contour). All results
go to ``<out>/explanations.json``. An unreadable file is reported as one line ``path: reason`` and
skipped; the exit code is then 1.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pneumoscope.errors import ConfigError, ImageDecodeError

logger = logging.getLogger(__name__)

__all__ = ["explain_command", "explain_files", "output_names"]

EXPLANATIONS_JSON = "explanations.json"


def output_names(files: Sequence[str]) -> dict[str, str]:
    """``file -> <stem>_cam.png``; a stem that occurs more than once gets a short hash of its path."""
    stems = [Path(f).stem or "image" for f in files]
    dup = {s for s in stems if stems.count(s) > 1}
    return {
        f: (f"{s}-{hashlib.sha1(str(f).encode()).hexdigest()[:8]}" if s in dup else s) + "_cam.png"
        for f, s in zip(files, stems)
    }


def _target_index(class_names: Sequence[str], target: str | None) -> int | None:
    if target is None:
        return None
    if target in class_names:
        return list(class_names).index(target)
    lowered = [c.lower() for c in class_names]
    if target.lower() in lowered:
        return lowered.index(target.lower())
    raise ConfigError(f"--target {target!r} is not a class of this model; classes: {', '.join(class_names)}")


def explain_files(
    predictor,  # noqa: ANN001 - pneumoscope.inference.Predictor (PyTorch)
    images: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    method: str = "gradcam",
    target: str | None = None,
) -> dict[str, Any]:
    """Explain ``images`` with a loaded predictor; writes the PNGs and JSON, returns the JSON content."""
    from pneumoscope.data.imageio import decode_image
    from pneumoscope.explain.cam import CAM_METHODS
    from pneumoscope.explain.lungs import border_attention, lung_attention, lung_mask
    from pneumoscope.explain.overlay import save_explanation_png
    from pneumoscope.utils.io import atomic_write_json

    if method not in CAM_METHODS:
        raise ConfigError(f"--method {method!r} is not one of {', '.join(CAM_METHODS)}")
    if getattr(predictor, "model", None) is None:
        raise ConfigError("explain needs a PyTorch model (Grad-CAM takes gradients); this predictor has none")
    out = Path(out)
    names = list(predictor.class_names)
    target_idx = _target_index(names, target)
    files = [str(f) for f in images]
    pngs = output_names(files)
    results: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for f in files:
        try:
            gray_full = decode_image(f)
        except ImageDecodeError as err:
            logger.error("%s", err)
            failed.append({"path": f, "reason": err.reason})
            continue
        u8 = predictor.prepare([gray_full])
        probs = predictor.predict_u8(u8).probs
        decision = int(predictor.decide(probs)[0])
        cam_class = decision if target_idx is None else target_idx
        cam = predictor.cams(u8, [cam_class], method)[0]  # an ensemble: the mean of its members' CAMs
        gray = u8[0].numpy()
        mask, how = lung_mask(gray)
        prob_map = {c: float(p) for c, p in zip(names, probs[0])}
        rec = {
            "path": f,
            "output": pngs[f],
            "probs": prob_map,
            "decision": names[decision],
            "cam_class": names[cam_class],
            "lung_attention": lung_attention(cam, mask),
            "border_attention": border_attention(cam),
            "mask_method": how,
        }
        thr = f" (threshold {predictor.threshold:.2f})" if predictor.threshold is not None and len(names) == 2 else ""
        title = (f"{Path(f).name}: decision {names[decision]}{thr}; {method} for {names[cam_class]}; "
                 f"lung attention {rec['lung_attention']:.2f} ({how} mask)")
        save_explanation_png(out / pngs[f], gray, cam, title, prob_map, mask)
        logger.info("%s: %s (%s), lung attention %.2f -> %s", f, names[decision],
                    ", ".join(f"{c} {p:.3f}" for c, p in prob_map.items()), rec["lung_attention"], out / pngs[f])
        results.append(rec)
    report = {
        "model": getattr(predictor, "model_id", None),
        "method": method,
        "target": names[target_idx] if target_idx is not None else None,
        "preprocess": predictor.spec.to_dict(),
        "images": results,
        "failed": failed,
    }
    atomic_write_json(out / EXPLANATIONS_JSON, report)
    return report


def explain_command(
    model: str | Path,
    images: list[str],
    out: str | Path,
    method: str = "gradcam",
    target: str | None = None,
) -> int:
    """CLI entry: load ``model`` (run, checkpoint or model directory) and explain ``images``.

    Returns 0, or 1 when any file could not be read (or none was given).
    """
    from pneumoscope.inference import Predictor

    predictor = Predictor.load(model)
    report = explain_files(predictor, images, out, method=method, target=target)
    n_ok, n_bad = len(report["images"]), len(report["failed"])
    logger.info("explained %d image(s) into %s%s", n_ok, out, f"; {n_bad} failed" if n_bad else "")
    if not images:
        logger.error("no images given")
        return 1
    return 1 if n_bad else 0
