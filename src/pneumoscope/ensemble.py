"""Ensembles: several finished runs → one model directory that is used exactly like a single model.

``pneumoscope ensemble RUN RUN ... --out ENS`` (:func:`build_ensemble`) writes::

    model.json          format ``pneumoscope-ensemble/1``: class names, task, preprocessing, the
                        ensemble's own validation-chosen threshold and validation metrics, and an
                        ``ensemble`` section: the rule, each member's weight, source run, source
                        checkpoint with the SHA-256 of its files, and its full model.json (model
                        spec, temperature, threshold, preprocessing)
    model.safetensors   every member's weights under the prefix ``members.<i>.`` (a copy: the
                        ensemble keeps working when the member runs are deleted; safetensors, so
                        nothing is ever unpickled)
    split.csv           the validation split the members share (evaluation fits its referral
                        cut-off on it, as for a run)

Because ``model.json`` is there, every command that takes a run or model directory takes an
ensemble: :meth:`pneumoscope.inference.Predictor.load` returns an :class:`EnsemblePredictor`
(evaluate, predict, serve, report), ``explain`` / ``predict --cam`` draw the mean of the members'
Grad-CAMs, and ``export`` writes one ONNX graph holding every member (:class:`EnsembleModule`).

Probabilities. Member ``m`` gives its own temperature-calibrated probabilities ``p_m`` (each member's
temperature was fitted on the shared validation split when it was trained); the ensemble's
probability is ``p = sum_m w_m p_m`` with ``sum_m w_m = 1``:

* ``mean``: ``w_m = 1/M``.
* ``val_weighted``: ``w_m`` proportional to ``max(AUROC_m - 0.5, 0)``, the member's validation
  AUROC (macro AUROC for multiclass tasks) above chance, as recorded in its checkpoint: a member
  no better than chance gets no vote, and two members of similar skill get similar votes. When no
  member is above chance the rule falls back to the plain mean.

No ensemble temperature: a mean of calibrated probabilities stays a probability, and fitting a
second temperature on the log of the mean would re-use the same validation images for a third
time for a correction of a few per cent. The ensemble's ``logits`` are ``log p`` (what the ONNX graph
outputs), so ``softmax(logits) = p`` everywhere a logit-based code path runs.

The operating threshold is fitted on the ensemble's probabilities of the shared validation split,
by the members' threshold rule. Members must therefore share that split: their ``split.csv``
validation images (content hashes) and patients must be identical, otherwise some member would
have trained on images the threshold is chosen on. Members must also share the task, the class
names and the resize mode (``squash`` or ``pad``). They may differ in architecture,
normalisation (mean/std), channel count, output type (sigmoid or softmax) and the rest of the
preprocessing (input size, CLAHE, blur). Anything else is refused with an error naming the run.

Input. One uint8 image feeds every member (one cache, one decode per file in ``predict`` and
``serve``): with identical member preprocessing it is exactly theirs; otherwise it is the
ensemble's own ``preprocess`` (:func:`input_spec`: the largest member size, the common resize
mode, no CLAHE, no blur), and :func:`member_input` makes each member's image from it: a resize to
the member's size, then the member's CLAHE and blur, in the order of
:func:`pneumoscope.data.preprocess.preprocess`. For a member at the ensemble's size this is that
member's own preprocessing, bit for bit. A smaller member's image is resized twice (original →
largest size → its size), which differs from its own single resize by interpolation: on the
full-resolution sample films, 224 → 150 px against a direct 150 px resize differs by 0.67 grey
levels on average (99th percentile 4). Images already at the largest size (the shared Kermany
copy is 224 px) are resized once, exactly as the member's own preprocessing does.
Such an ensemble cannot be one ONNX graph (CLAHE is no ONNX operator): ``export`` refuses it with
one line and the members can be exported one by one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

import pneumoscope
from pneumoscope.data.preprocess import PreprocessSpec
from pneumoscope.errors import ConfigError, DatasetError, ModelError
from pneumoscope.inference import Prediction, Predictor, resolve_model_dir
from pneumoscope.utils.io import atomic_path, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

ENSEMBLE_FORMAT = "pneumoscope-ensemble/1"
RULES = ("mean", "val_weighted")
_PROB_FLOOR = 1e-12  # log(p) of the ensemble output is taken at max(p, floor)


# --------------------------------------------------------------------------------------------
# weights


def member_weights(val_metric: Sequence[float], rule: str) -> np.ndarray:
    """Normalised member weights for ``rule`` (module docstring) from each member's validation AUROC."""
    if rule not in RULES:
        raise ConfigError(f"ensemble rule {rule!r}: expected one of {', '.join(RULES)}")
    m = len(val_metric)
    if rule == "mean":
        return np.full(m, 1.0 / m)
    skill = np.array([max(float(v) - 0.5, 0.0) if v is not None and np.isfinite(v) else 0.0 for v in val_metric])
    if skill.sum() <= 0:
        log.warning("val_weighted ensemble: no member is above chance on validation; using the plain mean")
        return np.full(m, 1.0 / m)
    return skill / skill.sum()


def _val_metric(meta: dict) -> float | None:
    vm = meta.get("val_metrics") or {}
    v = vm.get("auroc", vm.get("macro_auroc"))
    return None if v is None else float(v)


# --------------------------------------------------------------------------------------------
# the shared input


def input_spec(specs: Sequence[PreprocessSpec]) -> PreprocessSpec:
    """The preprocessing of the one image every member is fed from (module docstring)."""
    if all(sp == specs[0] for sp in specs):
        return specs[0]
    modes = {sp.resize for sp in specs}
    if len(modes) > 1:
        raise ModelError(f"ensemble members use different resize modes {sorted(modes)}; one input image cannot "
                         "serve both (squash stretches the film, pad keeps its aspect ratio)")
    return PreprocessSpec(size=max(sp.size for sp in specs), resize=modes.pop())


def member_input(u8: torch.Tensor, base: PreprocessSpec, spec: PreprocessSpec) -> torch.Tensor:
    """A member's uint8 images (N, s, s) from the ensemble's (N, S, S): resize, then its CLAHE and blur."""
    from pneumoscope.data.preprocess import enhance, resize_gray

    if spec == base:
        return u8
    images = u8.cpu().numpy()
    out = [enhance(resize_gray(im, spec.size, "squash") if spec.size != base.size else im, spec) for im in images]
    return torch.from_numpy(np.stack(out)) if out else torch.zeros((0, spec.size, spec.size), dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# the network (for ONNX export)


class EnsembleModule(nn.Module):
    """Every member in one ``nn.Module``: input as for member 0, output ``log`` of the weighted mean
    of the members' temperature-calibrated probabilities.

    The input is member 0's normalised image (what its :class:`EvalPreset` makes of the uint8
    image). Members with another normalisation get theirs inside the graph: the gray value on
    [0, 1] is recovered from channel 0 and normalised with the member's mean/std (replicated to
    its channel count), which equals that member's own preset up to float rounding. Used for
    ONNX export; the PyTorch predictor runs the members directly (exactly).
    """

    def __init__(self, members: Sequence[nn.Module], presets: Sequence, temperatures: Sequence[float],
                 weights: Sequence[float]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        ref = presets[0]
        self.register_buffer("ref_mean", ref.mean[:, :1].clone(), persistent=False)
        self.register_buffer("ref_std", ref.std[:, :1].clone(), persistent=False)
        for i, p in enumerate(presets):
            self.register_buffer(f"mean{i}", p.mean.clone(), persistent=False)
            self.register_buffer(f"std{i}", p.std.clone(), persistent=False)
        self.same_input = [bool(torch.equal(p.mean, ref.mean) and torch.equal(p.std, ref.std)) for p in presets]
        self.single_logit = [int(getattr(m, "num_classes", 0)) == 1 for m in members]  # sigmoid members
        self.temperatures = [float(t) for t in temperatures]
        self.weights = [float(w) for w in weights]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gray = x[:, :1] * self.ref_std + self.ref_mean  # the image on [0, 1]
        total = None
        for i, member in enumerate(self.members):
            xi = x if self.same_input[i] else (gray - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
            z = member(xi) / self.temperatures[i]
            if self.single_logit[i]:
                p1 = torch.sigmoid(z[:, 0])
                p = torch.stack([1 - p1, p1], dim=1)
            else:
                p = torch.softmax(z, dim=1)
            total = self.weights[i] * p if total is None else total + self.weights[i] * p
        return torch.log(total.clamp_min(_PROB_FLOOR))


# --------------------------------------------------------------------------------------------
# the predictor


class EnsemblePredictor(Predictor):
    """:class:`~pneumoscope.inference.Predictor` of an ensemble directory. Build with :meth:`load`.

    ``probs`` are the weighted mean of the members' calibrated probabilities (computed exactly as
    each member's own Predictor computes them), ``logits`` their log; ``temperature`` is 1 and the
    threshold is the ensemble's own. :meth:`cams` is the mean of the members' CAMs.
    """

    backend = "pytorch"

    def __init__(self, members: Sequence[Predictor], weights: Sequence[float], meta: dict,
                 device: torch.device | str = "cpu") -> None:
        self.members = list(members)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.meta = meta
        self.device = torch.device(device)
        self.class_names = list(meta["class_names"])
        self.spec = PreprocessSpec(**dict(meta["preprocess"]))
        self.temperature = 1.0
        thr = meta.get("threshold")
        self.threshold = float(thr["threshold"]) if thr else None
        self.threshold_info = thr
        self.channels_last = self.members[0].channels_last
        self.preset = self.members[0].preset
        self.model = EnsembleModule([m.model for m in self.members], [m.preset for m in self.members],
                                    [m.temperature for m in self.members], self.weights).eval()
        self.source_dir: Path | None = None

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "EnsemblePredictor":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from pneumoscope.models.checkpoint_io import build_from_spec

        d = resolve_model_dir(path)
        meta = json.loads((d / "model.json").read_text())
        ens = meta.get("ensemble")
        if not isinstance(ens, dict) or ens.get("format") != ENSEMBLE_FORMAT or not ens.get("members"):
            raise ModelError(f"{d / 'model.json'}: not a pneumoscope ensemble ({ENSEMBLE_FORMAT})")
        weights_file = d / "model.safetensors"
        expected = ens.get("weights_sha256")
        if expected and sha256_file(weights_file) != expected:
            raise ModelError(f"{weights_file}: SHA-256 differs from model.json (damaged or replaced file)")
        try:
            state = load_file(str(weights_file), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ModelError(f"{weights_file}: cannot read the ensemble weights ({err})") from None
        members = []
        for i, mem in enumerate(ens["members"]):
            prefix = f"members.{i}."
            model = build_from_spec(mem["meta"]["model"])
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                model.load_state_dict(sub, strict=True)
            except RuntimeError as err:
                raise ModelError(f"{weights_file}: member {i} ({mem.get('name')}) weights do not fit: {err}") from None
            members.append(Predictor(model.float().to(device), mem["meta"], device=device))
        p = cls(members, [m["weight"] for m in ens["members"]], meta, device=device)
        p.source_dir = d
        log.info("loaded ensemble of %d (%s) from %s", len(members), ens.get("rule"), d)
        return p

    @property
    def model_id(self) -> str:
        return f"{self.meta['model'].get('name')}:{self.meta.get('run_name', 'ensemble')}"

    def member_probs(self, u8: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """(M, N, C) calibrated probabilities of each member, each on its own preprocessing of ``u8``."""
        return np.stack([m.predict_u8(member_input(u8, self.spec, m.spec), batch_size).probs for m in self.members])

    def predict_u8(self, u8: torch.Tensor, batch_size: int = 64) -> Prediction:
        probs = np.tensordot(self.weights, self.member_probs(u8, batch_size).astype(np.float64), axes=1)
        probs = probs.astype(np.float32)
        return Prediction(probs=probs, logits=np.log(np.maximum(probs, _PROB_FLOOR)))

    def logits_u8(self, u8: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        return self.predict_u8(u8, batch_size).logits

    def cams(self, u8: torch.Tensor, target, method: str = "gradcam") -> np.ndarray:  # noqa: ANN001
        """Mean of the members' CAMs (each on its own input, resized to the image): (N, S, S) in [0, 1]."""
        from pneumoscope.explain.cam import ensemble_cam

        xs = [m.preset(member_input(u8, self.spec, m.spec).unsqueeze(1)).to(m.device) for m in self.members]
        return ensemble_cam([m.model for m in self.members], xs, target, method, out_size=tuple(u8.shape[-2:]))

    def export_module(self) -> EnsembleModule:
        """A contiguous-format copy of :class:`EnsembleModule` for tracing (the predictor's members stay as they are)."""
        import copy

        own = [m.meta.get("run_name") or str(i) for i, m in enumerate(self.members) if m.spec != self.spec]
        if own:
            raise ModelError(f"{self.source_dir}: members {', '.join(own)} preprocess their input themselves (another "
                             "size, CLAHE or blur), which one ONNX graph cannot do; export the members one by one")

        module = copy.deepcopy(self.model).float().eval()
        return module.to(memory_format=torch.contiguous_format)


def is_ensemble_dir(path: str | Path) -> bool:
    """True when ``path`` (or its model.json) describes an ensemble."""
    p = Path(path)
    try:
        meta = json.loads((p / "model.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("ensemble"), dict)


# --------------------------------------------------------------------------------------------
# building


def _member_info(run: Path) -> dict:
    if not Path(run).exists():
        raise ModelError(f"{run}: no such run directory")
    ckpt = resolve_model_dir(run)
    meta = json.loads((ckpt / "model.json").read_text())
    if "ensemble" in meta:
        raise ModelError(f"{run}: is itself an ensemble; list its member runs instead")
    if meta.get("temperature") is None or "val_metrics" not in meta:
        raise ModelError(f"{run}: its best checkpoint has no fitted temperature/validation metrics "
                         "(an unfinished run); finish it first (`pneumoscope train --resume`)")
    split_csv = Path(run) / "split.csv"
    if not split_csv.exists():
        raise DatasetError(f"{run}: no split.csv, so its validation split is unknown; an ensemble needs runs "
                           "trained by `pneumoscope train`")
    split = pd.read_csv(split_csv)
    val = split[split["split"] == "val"]
    if val.empty:
        raise DatasetError(f"{split_csv}: no validation rows")
    return {"run": Path(run), "ckpt": ckpt, "meta": meta, "val": val, "split": split}


def _check_compatible(members: list[dict]) -> None:
    ref = members[0]
    rm, rv = ref["meta"], ref["val"]
    ref_hashes, ref_patients = set(rv["content_hash"]), set(rv["patient_id"].astype(str))
    for m in members[1:]:
        mm, name = m["meta"], m["run"]
        if mm.get("task") != rm.get("task"):
            raise ModelError(f"{name}: task {mm.get('task')!r} differs from {ref['run']}'s {rm.get('task')!r}")
        if list(mm["class_names"]) != list(rm["class_names"]):
            raise ModelError(f"{name}: classes {mm['class_names']} differ from {ref['run']}'s {rm['class_names']}")
        if mm["preprocess"].get("resize", "squash") != rm["preprocess"].get("resize", "squash"):
            raise ModelError(f"{name}: resize mode {mm['preprocess'].get('resize')!r} differs from {ref['run']}'s "
                             f"{rm['preprocess'].get('resize')!r}; ensemble members are fed from one image, which "
                             "cannot be both squashed and padded")
        hashes, patients = set(m["val"]["content_hash"]), set(m["val"]["patient_id"].astype(str))
        if hashes != ref_hashes or patients != ref_patients:
            raise DatasetError(
                f"{name}: its validation split differs from {ref['run']}'s ({len(hashes ^ ref_hashes)} images, "
                f"{len(patients ^ ref_patients)} patients not in both); the ensemble's threshold would be fitted on "
                "images some member trained on. Use runs trained with the same seed, val_fraction and data limits")
    seen: dict[str, Path] = {}
    for m in members:
        key = str(m["ckpt"].resolve())
        if key in seen:
            raise ModelError(f"{m['run']}: the same checkpoint as {seen[key]} (listed twice)")
        seen[key] = m["run"]


def _val_images(rows: pd.DataFrame, spec: PreprocessSpec, cache_root: Path, progress: bool) -> tuple[torch.Tensor, np.ndarray]:
    from pneumoscope.data.cache import ImageCache

    cache = ImageCache(cache_root, spec)
    report = cache.update(list(rows["path"]), list(rows["content_hash"]), progress=progress)
    if report.failed:
        for path, reason in report.failed.items():
            log.error("%s: %s", path, reason)
        raise DatasetError(f"{len(report.failed)} validation image(s) of the members cannot be read "
                           f"(first: {next(iter(report.failed))}); the threshold needs all of them")
    return torch.from_numpy(cache.get(list(rows["content_hash"]))), rows["y"].to_numpy(np.int64)


def build_ensemble(runs: Sequence[str | Path], out: str | Path, *, rule: str = "mean",
                   cache_root: str | Path | None = None, progress: bool = False) -> dict:
    """Build the ensemble of ``runs`` into ``out`` (module docstring); returns a summary dict.

    ``out`` must be new, empty or a previous ensemble (which is replaced as a whole). The cached
    validation images are read from ``cache_root`` (default: the members' ``data.cache_dir`` or
    the user cache), decoding any that are missing.
    """
    from pneumoscope.data.cache import default_cache_root
    from pneumoscope.evaluate.metrics import binary_metrics, multiclass_metrics
    from pneumoscope.evaluate.threshold import ThresholdSelector

    if rule not in RULES:
        raise ConfigError(f"--rule {rule!r}: expected one of {', '.join(RULES)}")
    if len(runs) < 2:
        raise ConfigError(f"an ensemble needs at least two runs, got {len(runs)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not is_ensemble_dir(out):
        raise ModelError(f"{out}: exists, is not empty and is not an ensemble; choose a new --out")
    infos = [_member_info(Path(r)) for r in runs]
    _check_compatible(infos)
    ref = infos[0]["meta"]
    class_names = list(ref["class_names"])
    if cache_root is None:
        cache_root = _cache_dir_of(infos[0]["run"]) or default_cache_root()
    metrics = [_val_metric(i["meta"]) for i in infos]
    weights = member_weights(metrics, rule)

    # one combined weights file, every member's tensors under members.<i>.
    from safetensors.torch import load_file, save_file

    tensors: dict[str, torch.Tensor] = {}
    members_json = []
    for i, (info, w, vm) in enumerate(zip(infos, weights, metrics)):
        files = {f: sha256_file(info["ckpt"] / f) for f in ("model.safetensors", "model.json")}
        for k, v in load_file(str(info["ckpt"] / "model.safetensors")).items():
            tensors[f"members.{i}.{k}"] = v.contiguous()
        members_json.append({
            "name": info["run"].name, "source_run": str(info["run"]), "checkpoint": str(info["ckpt"]),
            "sha256": files, "prefix": f"members.{i}.", "weight": float(w), "val_auroc": vm,
            "meta": info["meta"],
        })

    val_rows = infos[0]["val"].reset_index(drop=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.ensemble-", dir=out.parent))
    try:
        with atomic_path(staging / "model.safetensors") as tmp:
            save_file(tensors, str(tmp))
        model_names = [i["meta"]["model"].get("name") for i in infos]
        meta = {
            "format": ENSEMBLE_FORMAT, "pneumoscope_version": pneumoscope.__version__,
            "model": {"name": f"ensemble({'+'.join(model_names)})", "card": ref["model"].get("card"),
                      "in_chans": ref["model"].get("in_chans"), "num_classes": len(class_names)},
            "task": ref.get("task"), "class_names": class_names, "output": "softmax",
            "preprocess": input_spec([PreprocessSpec(**dict(i["meta"]["preprocess"])) for i in infos]).to_dict(),
            "run_name": out.name, "seed": ref.get("seed", 0),
            "temperature": 1.0, "threshold": None,
            "ensemble": {"format": ENSEMBLE_FORMAT, "rule": rule,
                         "weight_metric": "validation AUROC - 0.5 (clipped at 0)" if rule == "val_weighted" else None,
                         "weights_sha256": sha256_file(staging / "model.safetensors"), "members": members_json},
        }
        atomic_write_json(staging / "model.json", meta)
        predictor = EnsemblePredictor.load(staging)
        u8, y = _val_images(val_rows, predictor.spec, Path(cache_root), progress)
        member_p = predictor.member_probs(u8)
        probs = predictor.predict_u8(u8).probs
        if len(class_names) == 2:
            thr_ref = ref.get("threshold") or {}
            sel = ThresholdSelector(rule=thr_ref.get("rule", "youden"), target=thr_ref.get("target")).fit(y, probs[:, 1])
            meta["threshold"] = sel.to_dict()
            val_metrics = binary_metrics(y, probs[:, 1], threshold=float(sel.threshold_))
            member_auroc = [binary_metrics(y, p[:, 1])["auroc"] for p in member_p]
        else:
            val_metrics = multiclass_metrics(y, probs, class_names)
            member_auroc = [multiclass_metrics(y, p, class_names)["macro_auroc"] for p in member_p]
        meta["val_metrics"] = val_metrics
        meta["val_counts"] = np.bincount(y, minlength=len(class_names)).tolist()
        for mj, a in zip(members_json, member_auroc):
            mj["val_auroc_recomputed"] = float(a)
        atomic_write_json(staging / "model.json", meta)
        with atomic_path(staging / "split.csv") as tmp:
            val_rows.to_csv(tmp, index=False)
        _install(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    key = "auroc" if "auroc" in val_metrics else "macro_auroc"
    log.info("ensemble of %d runs (%s, weights %s) -> %s: val %s %.4f (members %s)", len(infos), rule,
             np.round(weights, 3).tolist(), out, key, val_metrics[key], np.round(member_auroc, 4).tolist())
    return {"out": str(out), "rule": rule, "weights": weights.tolist(), "members": [str(i["run"]) for i in infos],
            "val_metrics": val_metrics, "member_val_auroc": [float(a) for a in member_auroc],
            "threshold": meta["threshold"]}


def _cache_dir_of(run: Path) -> Path | None:
    import yaml

    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    d = (cfg.get("data") or {}).get("cache_dir")
    return Path(d) if d else None


def _install(staging: Path, out: Path) -> None:
    """Put the finished ensemble at ``out``: a rename when new, else swap out the previous one."""
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def ensemble_command(runs: list[str], out: str | Path, *, rule: str = "mean", cache_dir: str | None = None,
                     progress: bool = False) -> int:
    """CLI glue for ``pneumoscope ensemble``: build and print the validation summary."""
    import sys

    res = build_ensemble(runs, out, rule=rule, cache_root=cache_dir, progress=progress)
    vm = res["val_metrics"]
    key = "auroc" if "auroc" in vm else "macro_auroc"
    lines = [f"ensemble ({res['rule']}) of {len(res['members'])} runs -> {res['out']}"]
    for run, w, a in zip(res["members"], res["weights"], res["member_val_auroc"]):
        lines.append(f"  weight {w:.3f}  val {key} {a:.4f}  {run}")
    thr = res["threshold"]
    lines.append(f"ensemble val {key} {vm[key]:.4f}" + (f"; threshold {thr['threshold']:.4f} ({thr['rule_description']})"
                                                      if thr else ""))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
