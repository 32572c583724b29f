"""Export a trained model to ONNX, and prove on real radiographs that the export computes the same thing.

``export_onnx(run_or_checkpoint, out_dir)`` writes a self-describing directory::

    model.onnx          the network: input ``image`` (N, C, S, S) float32, normalised exactly as
                        :class:`~pneumoscope.data.presets.EvalPreset` does; output ``logits``;
                        dynamic batch axis; eval mode, fp32, NCHW
    model.json          the checkpoint's model.json plus an ``onnx`` section (file, opset, sha256,
                        input/output names, parity result)
    model.safetensors   (``include_weights=True``, the default) the PyTorch weights, so Grad-CAM,
                        which needs gradients, still works on an exported model

Then an automatic parity check: the same images go through the PyTorch model and through ONNX
Runtime via the one shared preprocessing (decode → :meth:`Predictor.prepare` → preset), and the
temperature-calibrated probabilities must agree within ``tolerance`` (1e-4). If they do not, the
export is deleted and :class:`~pneumoscope.errors.ModelError` is raised: a model that silently
computes something else after deployment is worse than no export. The check uses 16 real images
from the dataset (``$PNEUMOSCOPE_DATA`` or ``../shared/data/chest_xray``) unless the caller passes
images; without any it falls back to synthetic images and says so in the report.

Exporter: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer). The dynamo exporter
(the default since torch 2.9) needs ``onnxscript``, which is not a dependency of this project;
the tracer handles every registered backbone (plain conv nets with static control flow) and
supports ``dynamic_axes`` for the batch dimension directly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pneumoscope.errors import ImageDecodeError, ModelError
from pneumoscope.inference import ONNX_FILE, OnnxPredictor, Predictor, onnx_session, resolve_model_dir
from pneumoscope.utils.io import atomic_path, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

#: Largest |probability difference| PyTorch vs ONNX Runtime accepted by the parity check.
PARITY_TOLERANCE = 1e-4
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
_OUR_FILES = (ONNX_FILE, "model.json", "model.safetensors")
_REPO_SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "chest_xray"


# --------------------------------------------------------------------------------------------
# images for the parity check


def default_check_images(n: int = 16, *, environ: dict[str, str] | None = None) -> list[Path]:
    """``n`` real images from the dataset, half NORMAL and half PNEUMONIA from the test split when
    the Kermany layout is there, else evenly spaced over all images; [] when no dataset is found.

    Looked up in ``$PNEUMOSCOPE_DATA``, then ``../shared/data/chest_xray`` beside the working
    directory and beside the repository.
    """
    from pneumoscope.predict import iter_image_files

    env = os.environ if environ is None else environ
    candidates = [Path(env["PNEUMOSCOPE_DATA"])] if env.get("PNEUMOSCOPE_DATA") else []
    candidates += [Path("..") / "shared" / "data" / "chest_xray", _REPO_SHARED]
    for root in candidates:
        if not root.is_dir():
            continue
        split = root / "test" if (root / "test").is_dir() else root
        classes = [d for d in sorted(split.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        if classes:
            per = -(-n // len(classes))
            files = [Path(p) for d in classes for p in sorted(iter_image_files(d))[:per]][:n]
        else:
            every = sorted(Path(p) for p in iter_image_files(root))
            files = [every[i] for i in np.linspace(0, len(every) - 1, min(n, len(every))).astype(int)] if every else []
        if files:
            return files
    return []


def _synthetic_images(n: int, size: int) -> list[np.ndarray]:
    """Smooth random gray images (sums of Gaussian blobs): used only when no real image exists."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        img = np.zeros((size, size))
        for _ in range(6):
            cy, cx, s, a = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3), rng.uniform(-1, 1)
            img += a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        img = (img - img.min()) / (np.ptp(img) + 1e-9)
        out.append((img * 255).astype(np.uint8))
    return out


def _load_check_images(paths: Sequence[str | Path]) -> tuple[list[np.ndarray], list[str]]:
    from pneumoscope.data.imageio import decode_image

    images, names = [], []
    for p in paths:
        try:
            images.append(decode_image(p))
            names.append(str(p))
        except ImageDecodeError as err:
            log.warning("parity check: %s (skipped)", err)
    return images, names


# --------------------------------------------------------------------------------------------
# export


def _check_out_dir(out_dir: Path, src_dir: Path) -> None:
    """Refuse to overwrite anything but a previous export (never a checkpoint directory)."""
    if out_dir.resolve() == src_dir.resolve():
        raise ModelError(f"{out_dir}: cannot export into the source model directory; choose another --out")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ModelError(f"{out_dir}: exists and is not a directory")
    entries = [p.name for p in out_dir.iterdir()]
    if not entries:
        return
    try:
        previous = json.loads((out_dir / "model.json").read_text())
    except (OSError, ValueError):
        previous = None
    foreign = [e for e in entries if e not in _OUR_FILES]
    if not isinstance(previous, dict) or "onnx" not in previous or foreign:
        raise ModelError(f"{out_dir}: not empty and not a previous ONNX export ({', '.join(sorted(entries)[:5])}); "
                         "choose an empty or new directory")


def _install(staging: Path, out_dir: Path) -> None:
    """Move the finished export into ``out_dir`` (atomic rename when ``out_dir`` is new)."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    for name in _OUR_FILES:  # a previous export: drop all of its files first, so none is stale
        (out_dir / name).unlink(missing_ok=True)
    for name in (ONNX_FILE, "model.safetensors", "model.json"):  # model.json last: it names the others
        if (staging / name).exists():
            os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging, ignore_errors=True)


class _AdaptiveAvgPoolAsMatmul(torch.nn.Module):
    """``AdaptiveAvgPool2d`` for one fixed input size as two constant averaging matrices.

    The TorchScript exporter only supports adaptive pooling when the output size divides the
    input size (cnn3 pools its 18x18 map at 150 px to 4x4). The bins are PyTorch's own:
    output ``i`` averages inputs ``floor(i*n/m)`` to ``ceil((i+1)*n/m) - 1``, so the result is the
    same up to float summation order (the parity check verifies it).
    """

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", self._matrix(in_hw[0], out_hw[0]))
        self.register_buffer("cols", self._matrix(in_hw[1], out_hw[1]).t().contiguous())

    @staticmethod
    def _matrix(n_in: int, n_out: int) -> torch.Tensor:
        m = torch.zeros(n_out, n_in)
        for i in range(n_out):
            start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            m[i, start:end] = 1.0 / (end - start)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.rows, x), self.cols)


def _exportable(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """A copy of ``model`` whose adaptive average pools the exporter cannot express are replaced
    by :class:`_AdaptiveAvgPoolAsMatmul` for the feature-map size ``example`` produces."""
    import copy

    shapes: dict[str, tuple[int, int]] = {}
    def record(name: str):  # noqa: ANN202
        return lambda mod, inp, out: shapes.__setitem__(name, tuple(inp[0].shape[-2:]))

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, torch.nn.AdaptiveAvgPool2d)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    clone = None
    for name, (h, w) in shapes.items():
        pool = model.get_submodule(name)
        size = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size, pool.output_size)
        oh, ow = (h if size[0] is None else size[0]), (w if size[1] is None else size[1])
        if h % oh == 0 and w % ow == 0:
            continue
        clone = clone or copy.deepcopy(model)
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        setattr(parent, child, _AdaptiveAvgPoolAsMatmul((h, w), (oh, ow)))
        log.info("export: %s AdaptiveAvgPool2d %dx%d -> %dx%d written as two matrix products", name, h, w, oh, ow)
    return clone or model


def _trace_to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation on every call; nothing to act on here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            _exportable(model, example), (example,), str(tmp), dynamo=False, export_params=True,
            do_constant_folding=True, opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def _timed_probs(predictor: Predictor, u8: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    predictor.predict_u8(u8[:1])  # warm-up (first ORT run allocates, first torch run picks kernels)
    start = time.perf_counter()
    pred = predictor.predict_u8(u8, batch_size=len(u8))
    return pred.probs, pred.logits, (time.perf_counter() - start) * 1000 / max(1, len(u8))


def export_onnx(model_path: str | Path, out_dir: str | Path, *, opset: int = 17,
                check_images: list[Path] | None = None, include_weights: bool = True,
                tolerance: float = PARITY_TOLERANCE, n_check: int = 16) -> dict:
    """Export a run/checkpoint directory to ``out_dir/model.onnx`` and verify it (module docstring).

    Returns a report: paths, opset, sha256, the parity result (images used, their source, max
    absolute difference of calibrated probabilities and of logits, decisions agreeing) and the
    per-image time of PyTorch and ONNX Runtime on the check batch. Raises :class:`ModelError`
    (after deleting the export) when the probabilities differ by more than ``tolerance``.
    """
    from pneumoscope.models.checkpoint_io import build_from_spec, load_weights

    src_dir = resolve_model_dir(model_path)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, src_dir)
    meta = json.loads((src_dir / "model.json").read_text())
    meta.pop("onnx", None)
    weights = src_dir / "model.safetensors"
    ensemble = None
    if "ensemble" in meta:  # one graph holding every member, averaging their calibrated probabilities
        from pneumoscope.ensemble import EnsemblePredictor

        ensemble = EnsemblePredictor.load(src_dir)
        model = ensemble.export_module()
    else:
        model = build_from_spec(meta["model"])
        load_weights(model, weights)
        model = model.float().eval().to(memory_format=torch.contiguous_format)
        meta["model"] = {**meta["model"], "card": model.card.to_dict()}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        torch_pred = ensemble or Predictor(model, meta)  # the real eval path (channels_last on CPU, same preset)
        size = torch_pred.spec.size
        example = torch_pred.preset(torch.zeros(2, size, size, dtype=torch.uint8)).contiguous()
        t0 = time.perf_counter()
        _trace_to_onnx(model, example, staging / ONNX_FILE, opset)
        export_s = time.perf_counter() - t0
        import onnx

        onnx.checker.check_model(str(staging / ONNX_FILE))
        onnx_bytes = (staging / ONNX_FILE).read_bytes()
        import hashlib

        info = {
            "file": ONNX_FILE, "opset": opset, "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "input": INPUT_NAME, "input_shape": ["batch", torch_pred.preset.in_chans, size, size],
            "input_dtype": "float32", "output": OUTPUT_NAME,
            "exporter": f"torch.onnx.export(dynamo=False), torch {torch.__version__}",
            "weights_sha256": sha256_file(weights),
        }
        if include_weights:
            shutil.copyfile(weights, staging / "model.safetensors")
        meta_out = {**meta, "onnx": info}
        onnx_pred = OnnxPredictor(onnx_session(onnx_bytes), meta_out, source_dir=staging)

        source = "given"
        paths = list(check_images) if check_images is not None else default_check_images(n_check)
        if check_images is None and paths:
            source = "dataset"
        images, names = _load_check_images(paths)
        if not images:
            if check_images:
                raise ModelError("parity check: none of the given check images could be decoded")
            log.warning("parity check: no dataset found (set PNEUMOSCOPE_DATA); using %d synthetic images", n_check)
            images, names, source = _synthetic_images(n_check, max(size, 64)), [], "synthetic"
        u8 = torch_pred.prepare(images)
        p_t, l_t, torch_ms = _timed_probs(torch_pred, u8)
        p_o, l_o, onnx_ms = _timed_probs(onnx_pred, u8)
        diff = float(np.max(np.abs(p_t - p_o))) if np.isfinite(p_o).all() else float("inf")
        parity = {
            "images": len(images), "source": source, "files": [Path(n).name for n in names],
            "max_abs_diff_prob": diff, "max_abs_diff_logit": float(np.max(np.abs(l_t - l_o))),
            "decisions_agree": bool((torch_pred.decide(p_t) == onnx_pred.decide(p_o)).all()),
            "tolerance": tolerance, "passed": diff <= tolerance,
        }
        if not parity["passed"]:
            raise ModelError(
                f"ONNX parity check failed: max |p_torch - p_onnx| = {diff:.2e} > {tolerance:.0e} on "
                f"{len(images)} {source} images; the export was deleted"
            )
        info["parity"] = {k: v for k, v in parity.items() if k != "files"}
        atomic_write_json(staging / "model.json", meta_out)
        _install(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report = {
        "out_dir": str(out_dir), "onnx": str(out_dir / ONNX_FILE), "opset": opset, "sha256": info["sha256"],
        "bytes": len(onnx_bytes), "include_weights": include_weights, "export_seconds": round(export_s, 2),
        "parity": parity, "torch_ms_per_image": round(torch_ms, 3), "onnx_ms_per_image": round(onnx_ms, 3),
    }
    log.info("exported %s -> %s (opset %d, %.1f MB); parity on %d %s images: max |dp| = %.1e; "
             "%.1f ms/image PyTorch, %.1f ms/image ONNX Runtime", src_dir, out_dir / ONNX_FILE, opset,
             len(onnx_bytes) / 1e6, parity["images"], source, diff, torch_ms, onnx_ms)
    return report


def export_command(model: str | Path, out: str | Path, *, opset: int = 17, check: Sequence[str] | None = None,
                   include_weights: bool = True) -> int:
    """CLI glue for ``pneumoscope export``: ``check`` may name image files or folders."""
    images = None
    if check:
        from pneumoscope.predict import collect_inputs

        files, problems = collect_inputs(list(check))
        for path, reason in problems:
            log.error("%s: %s", path, reason)
        images = [Path(f) for f in files]
    report = export_onnx(model, out, opset=opset, check_images=images, include_weights=include_weights)
    par = report["parity"]
    sys.stdout.write(
        f"exported {report['onnx']} (opset {opset}, sha256 {report['sha256'][:12]})\n"
        f"parity on {par['images']} {par['source']} images: max |p_torch - p_onnx| = {par['max_abs_diff_prob']:.2e} "
        f"(tolerance {par['tolerance']:.0e}); {report['torch_ms_per_image']:.1f} ms/image PyTorch, "
        f"{report['onnx_ms_per_image']:.1f} ms/image ONNX Runtime\n"
    )
    return 0
