"""Load a trained model (run directory, checkpoint directory or exported model) and predict.

:class:`Predictor` is the one object evaluation, ``predict``, ``explain`` and the server use. It
takes its preprocessing from the checkpoint (``model.json``: size, resize mode, CLAHE, blur) and
its normalisation from the model card, through the same :class:`~pneumoscope.data.presets.EvalPreset`
the trainer used, so train-time and serve-time inputs cannot drift apart. Probabilities are
temperature-calibrated with the temperature fitted on validation; decisions use the stored
validation-chosen threshold.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pneumoscope.data.preprocess import PreprocessSpec, preprocess
from pneumoscope.data.presets import AugmentSpec, EvalPreset, TrainPreset
from pneumoscope.errors import ModelError

log = logging.getLogger(__name__)


def resolve_model_dir(path: str | Path) -> Path:
    """A run directory → its best checkpoint; a checkpoint/exported-model directory → itself."""
    from pneumoscope.train.checkpoint import resolve_checkpoint

    p = Path(path)
    if p.is_file() and p.name == "model.json":
        p = p.parent
    if not p.exists():
        raise ModelError(f"{p}: no such model, run or checkpoint directory")
    if (p / "model.json").exists():
        return p
    for root in (p / "checkpoints", p):
        d = resolve_checkpoint(root, "best") if (root / "best.json").exists() else None
        if d is not None:
            return d
    raise ModelError(f"{p}: not a run directory or model directory (no checkpoints/best.json or model.json)")


@dataclass
class Prediction:
    probs: np.ndarray  # (N, C) calibrated
    logits: np.ndarray  # (N, C) or (N, 1) raw


class Predictor:
    """A model plus everything needed to use it on raw files. Build with :meth:`load`."""

    def __init__(self, model: torch.nn.Module, meta: dict, device: torch.device | str = "cpu") -> None:
        self.model = model.eval()
        self.meta = meta
        self.device = torch.device(device)
        self.class_names: list[str] = list(meta["class_names"])
        pp = dict(meta["preprocess"])
        self.spec = PreprocessSpec(**pp)
        self.temperature = float(meta.get("temperature") or 1.0)
        thr = meta.get("threshold")
        self.threshold: float | None = float(thr["threshold"]) if thr else None
        self.threshold_info: dict | None = thr
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.preset = EvalPreset.from_card(model.card, channels_last=self.channels_last)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Predictor":
        from pneumoscope.models.checkpoint_io import build_from_spec, load_weights

        d = resolve_model_dir(path)
        try:
            meta = json.loads((d / "model.json").read_text())
        except (OSError, ValueError) as err:
            raise ModelError(f"{d / 'model.json'}: unreadable model description ({err})") from None
        if isinstance(meta, dict) and "ensemble" in meta:  # an ensemble directory is a model too
            from pneumoscope.ensemble import EnsemblePredictor

            return EnsemblePredictor.load(d, device)
        model = build_from_spec(meta["model"])
        load_weights(model, d / "model.safetensors")
        model.float()
        log.info("loaded %s (%s, classes %s) from %s", meta["model"].get("name"), meta.get("task"),
                 meta["class_names"], d)
        p = cls(model.to(device), meta, device=device)
        p.source_dir = d
        return p

    @property
    def model_id(self) -> str:
        return f"{self.meta['model'].get('name')}:{self.meta.get('run_name', 'model')}"

    # ------------------------------------------------------------------ inference
    def prepare(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Decoded grayscale images (any size) → uint8 tensor (N, S, S) with the model's preprocessing."""
        return torch.from_numpy(np.stack([preprocess(im, self.spec) for im in images]))

    @torch.no_grad()
    def logits_u8(self, u8: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Raw logits for preprocessed uint8 images (N, S, S)."""
        out = []
        for i in range(0, len(u8), batch_size):
            x = self.preset(u8[i : i + batch_size].unsqueeze(1)).to(self.device)
            out.append(self.model(x).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.class_names)), np.float32)

    def probs_from_logits(self, logits: np.ndarray) -> np.ndarray:
        from pneumoscope.train.losses import logits_to_probs

        return logits_to_probs(torch.from_numpy(np.asarray(logits)) / self.temperature).numpy()

    def predict_u8(self, u8: torch.Tensor, batch_size: int = 64) -> Prediction:
        logits = self.logits_u8(u8, batch_size)
        return Prediction(probs=self.probs_from_logits(logits), logits=logits)

    def tta_probs(self, u8: torch.Tensor, n: int, seed: int = 0, batch_size: int = 64) -> np.ndarray:
        """(n, N, C) calibrated probabilities under ``n`` mild random augmentations (test-time augmentation)."""
        aug = TrainPreset(AugmentSpec(hflip=0.0, rotate=5.0, translate=0.03, scale_min=0.95, scale_max=1.05,
                                      brightness=0.1, contrast=0.1))
        # Each image's augmentations are seeded by (seed, sample, the image's own pixels), so an
        # image gets the same TTA result whatever batch, order or dataset it comes in.
        keys = [zlib.crc32(np.ascontiguousarray(im.numpy()).tobytes()) for im in u8]
        out = []
        for s in range(n):
            gens = [torch.Generator().manual_seed((seed * 1_000_003 + s * 7_919 + key) % (2**63)) for key in keys]
            out.append(self.predict_u8(aug.batch(u8, generators=gens), batch_size).probs)
        return np.stack(out)

    def cams(self, u8: torch.Tensor, target, method: str = "gradcam") -> np.ndarray:  # noqa: ANN001
        """Class activation maps (N, S, S) in [0, 1] for preprocessed uint8 images; ``target`` as in
        :func:`~pneumoscope.explain.cam.compute_cams`. One method so that an ensemble can answer
        with the mean of its members' maps wherever a single model's map is drawn."""
        from pneumoscope.explain.cam import compute_cams

        x = self.preset(u8.unsqueeze(1)).to(self.device)
        return compute_cams(self.model, x, target, method)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class index per row: the stored threshold on P(class 1) for binary models, argmax otherwise."""
        if probs.shape[1] == 2 and self.threshold is not None:
            return (probs[:, 1] >= self.threshold).astype(np.int64)
        return probs.argmax(1)


# ---------------------------------------------------------------------------------------------
# Exported (ONNX) models and backend-agnostic loading.
#
# An exported model directory (``pneumoscope.export.export_onnx``) holds ``model.onnx``,
# ``model.json`` (the checkpoint's description plus an ``onnx`` section: file, opset, sha256) and,
# optionally, the matching ``model.safetensors`` (needed for Grad-CAM, which needs gradients).
# Only JSON, safetensors and ONNX protobufs are ever read: nothing is unpickled.

#: File name of the exported network inside an exported model directory.
ONNX_FILE = "model.onnx"


def _read_model_json(d: Path) -> dict:
    try:
        meta = json.loads((d / "model.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{d / 'model.json'}: unreadable model description ({err})") from None
    if not isinstance(meta, dict) or "class_names" not in meta or "preprocess" not in meta or "model" not in meta:
        raise ModelError(f"{d / 'model.json'}: not a pneumoscope model description (no model/class_names/preprocess)")
    return meta


def onnx_session(model_bytes: bytes, *, threads: int | None = None, providers: Sequence[str] | None = None):  # noqa: ANN201
    """An ONNX Runtime ``InferenceSession`` from the model's bytes (full graph optimisation).

    ``threads`` caps intra-op threads (default: ONNX Runtime's choice, one per core). Built from
    bytes, not a path, so the bytes whose SHA-256 was checked are the bytes that run, and an
    ONNX file can never pull "external data" from elsewhere on the disk.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    if threads:
        opts.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(model_bytes, sess_options=opts,
                                    providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as err:  # noqa: BLE001 - ORT raises its own types for invalid graphs
        raise ModelError(f"not a loadable ONNX model ({type(err).__name__}: {err})") from None


class OnnxPredictor(Predictor):
    """:class:`Predictor` with the network run by ONNX Runtime instead of PyTorch.

    Same preprocessing (``prepare`` and the card's :class:`EvalPreset`), same temperature,
    threshold and decision rule, same ``tta_probs``; only :meth:`logits_u8` differs. ``model`` is
    None: code that needs the PyTorch module (Grad-CAM) asks :meth:`pytorch` for it.
    Build with :meth:`load` (or :func:`load_predictor`).
    """

    backend = "onnx"

    def __init__(self, session, meta: dict, source_dir: Path | None = None) -> None:  # noqa: ANN001
        from pneumoscope.models.card import ModelCard

        self.session = session
        self.model = None
        self.meta = meta
        self.device = torch.device("cpu")
        self.class_names = list(meta["class_names"])
        self.spec = PreprocessSpec(**dict(meta["preprocess"]))
        self.temperature = float(meta.get("temperature") or 1.0)
        thr = meta.get("threshold")
        self.threshold = float(thr["threshold"]) if thr else None
        self.threshold_info = thr
        self.channels_last = False
        spec = meta["model"]
        if "card" in spec:
            card = ModelCard.from_dict(spec["card"])
        else:
            from pneumoscope.models import get_card

            card = get_card(spec["name"])
        self.preset = EvalPreset.from_card(card, in_chans=int(spec.get("in_chans") or card.in_chans))
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        self.source_dir = source_dir
        self._pytorch: Predictor | None = None

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", *, threads: int | None = None) -> "OnnxPredictor":
        d = resolve_model_dir(path)
        meta = _read_model_json(d)
        info = meta.get("onnx")
        if not isinstance(info, dict):
            raise ModelError(f"{d / 'model.json'}: no 'onnx' section (not an exported model; use Predictor.load)")
        name = str(info.get("file") or ONNX_FILE)
        if Path(name).name != name:
            raise ModelError(f"{d / 'model.json'}: onnx.file must be a plain file name, got {name!r}")
        try:
            data = (d / name).read_bytes()
        except OSError as err:
            raise ModelError(f"{d / name}: cannot read ({err.strerror or err})") from None
        import hashlib

        digest = hashlib.sha256(data).hexdigest()
        if info.get("sha256") and digest != info["sha256"]:
            raise ModelError(f"{d / name}: SHA-256 {digest[:12]}... does not match model.json "
                             f"({str(info['sha256'])[:12]}...): damaged or replaced file")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if str(device).startswith("cuda") else None
        try:
            session = onnx_session(data, threads=threads, providers=providers)
        except ModelError as err:
            raise ModelError(f"{d / name}: {err}") from None
        log.info("loaded ONNX %s (%s, classes %s) from %s", meta["model"].get("name"), meta.get("task"),
                 meta["class_names"], d)
        return cls(session, meta, source_dir=d)

    def logits_u8(self, u8: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(u8), batch_size):
            x = self.preset(u8[i : i + batch_size].unsqueeze(1)).contiguous().numpy()
            out.append(np.asarray(self.session.run([self.output_name], {self.input_name: x})[0], np.float32))
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

    def pytorch(self) -> Predictor:
        """The PyTorch twin from ``model.safetensors`` beside ``model.onnx`` (for Grad-CAM).

        Raises :class:`ModelError` when the export has no weights or they are not the ones the
        ONNX file was exported from (SHA-256 recorded at export time).
        """
        if self._pytorch is not None:
            return self._pytorch
        weights = self.source_dir / "model.safetensors" if self.source_dir else None
        if weights is None or not weights.exists():
            raise ModelError(
                f"{self.source_dir}: exported without its PyTorch weights (model.safetensors); Grad-CAM needs "
                "them - re-export with weights or use the checkpoint directory"
            )
        expected = (self.meta.get("onnx") or {}).get("weights_sha256")
        if expected:
            from pneumoscope.utils.io import sha256_file

            if sha256_file(weights) != expected:
                raise ModelError(f"{weights}: not the weights {ONNX_FILE} was exported from (SHA-256 differs)")
        self._pytorch = Predictor.load(self.source_dir)
        return self._pytorch


def load_predictor(path: str | Path, *, backend: str = "auto", device: str = "cpu",
                   threads: int | None = None) -> Predictor:
    """The right predictor for a run, checkpoint or exported-model directory.

    ``backend='auto'`` picks ONNX Runtime when the directory has ``model.onnx`` and PyTorch
    otherwise; ``'onnx'`` / ``'pytorch'`` force one.
    """
    if backend not in ("auto", "onnx", "pytorch"):
        raise ModelError(f"backend must be 'auto', 'onnx' or 'pytorch', got {backend!r}")
    d = resolve_model_dir(path)
    if backend == "onnx" or (backend == "auto" and (d / ONNX_FILE).exists()):
        return OnnxPredictor.load(d, device, threads=threads)
    return Predictor.load(d, device)


def backend_of(predictor: Predictor) -> str:
    """``'onnx'`` or ``'pytorch'``."""
    return getattr(predictor, "backend", "pytorch")


def pytorch_predictor(predictor: Predictor) -> Predictor:
    """A predictor with a PyTorch ``model`` (for gradients): itself, or an ONNX model's twin."""
    return predictor.pytorch() if isinstance(predictor, OnnxPredictor) else predictor


def model_version(predictor: Predictor) -> str:
    """A short content hash of the network file (first 12 hex digits of its SHA-256).

    Two predictors with the same version run the same weights; the server reports it with every
    answer and ``predict`` refuses to resume a table written by another version.
    """
    cached = getattr(predictor, "_version", None)
    if cached:
        return cached
    if isinstance(predictor, OnnxPredictor):
        version = str((predictor.meta.get("onnx") or {}).get("sha256") or "")[:12]
    else:
        src = getattr(predictor, "source_dir", None)
        version = ""
        if src is not None and (Path(src) / "model.safetensors").exists():
            from pneumoscope.utils.io import sha256_file

            version = sha256_file(Path(src) / "model.safetensors")[:12]
    predictor._version = version or "unknown"
    return predictor._version
