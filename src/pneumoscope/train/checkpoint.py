"""Checkpoints as safetensors + JSON, written atomically, with a checksummed pointer.

A checkpoint is a directory::

    model.safetensors      the weights
    model.json             everything needed to rebuild and use the model without code pickles:
                           model spec + card, class names, preprocessing, threshold, temperature, metrics
    optim.safetensors      (resumable checkpoints) optimiser tensors
    state.json             (resumable checkpoints) optimiser/scheduler scalars, epoch, step, history

Why a directory + pointer: several files must change together. Each save writes a *new* directory
``<name>-<serial>``, fsyncs it, and only then atomically replaces the pointer ``<name>.json``
(which stores the directory and each file's SHA-256). A kill at any moment leaves the previous
pointer, and therefore the previous complete checkpoint, in force; a damaged file is detected by
its checksum and refused. Old directories beyond ``keep`` are deleted afterwards.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pneumoscope.errors import ModelError
from pneumoscope.utils.faults import fault_point
from pneumoscope.utils.io import atomic_path, atomic_write_json, sha256_file

log = logging.getLogger(__name__)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, d in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def save_checkpoint(root: str | Path, name: str, *, model: torch.nn.Module, meta: dict,
                    optimizer: torch.optim.Optimizer | None = None, state: dict | None = None,
                    keep: int = 2, weights_dtype: torch.dtype | None = None) -> Path:
    """Write checkpoint ``name`` (e.g. ``best`` or ``last``) under ``root``; returns its directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pointer = root / f"{name}.json"
    serial = 0
    if pointer.exists():
        try:
            serial = int(json.loads(pointer.read_text())["serial"]) + 1
        except (ValueError, KeyError, OSError):
            serial = 0
    d = root / f"{name}-{serial:06d}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    weights = {k: (v.to(weights_dtype) if weights_dtype and v.is_floating_point() else v).detach().cpu()
               for k, v in model.state_dict().items()}
    _write_tensors(d / "model.safetensors", weights)
    atomic_write_json(d / "model.json", meta)
    if optimizer is not None:
        tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        _write_tensors(d / "optim.safetensors", tensors)
        atomic_write_json(d / "state.json", {**(state or {}), "optimizer": opt_meta})
    files = {p.name: sha256_file(p) for p in sorted(d.iterdir())}
    fault_point("checkpoint_write")  # tests: killed here, the previous pointer must stay in force
    atomic_write_json(pointer, {"serial": serial, "dir": d.name, "files": files})
    _prune(root, name, keep)
    log.debug("saved checkpoint %s", d)
    return d


def _prune(root: Path, name: str, keep: int) -> None:
    dirs = sorted(p for p in root.glob(f"{name}-*") if p.is_dir())
    current = json.loads((root / f"{name}.json").read_text())["dir"]
    for p in dirs[:-keep] if keep > 0 else dirs:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(root: str | Path, name: str, verify: bool = True) -> Path | None:
    """The directory the pointer ``<root>/<name>.json`` names, checksums verified; None if absent."""
    root = Path(root)
    pointer = root / f"{name}.json"
    if not pointer.exists():
        return None
    try:
        info = json.loads(pointer.read_text())
        d = root / info["dir"]
        if verify:
            for fname, digest in info["files"].items():
                if sha256_file(d / fname) != digest:
                    raise ModelError(f"{d / fname}: checksum mismatch (damaged checkpoint)")
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"{pointer}: unreadable checkpoint pointer ({err})") from None
    return d


def load_meta(ckpt_dir: str | Path) -> dict:
    return json.loads((Path(ckpt_dir) / "model.json").read_text())


def load_model_state(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint directory (safetensors only: never unpickles)."""
    path = Path(ckpt_dir) / "model.safetensors"
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for non-safetensors files
        raise ModelError(f"{path}: not a valid safetensors file ({err})") from None


def load_training_state(ckpt_dir: str | Path, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore the optimiser from ``optim.safetensors`` and return ``state.json``'s content."""
    d = Path(ckpt_dir)
    state = json.loads((d / "state.json").read_text())
    if optimizer is not None:
        tensors = load_file(str(d / "optim.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state.pop("optimizer")))
    else:
        state.pop("optimizer", None)
    return state
