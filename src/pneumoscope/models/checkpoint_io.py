"""Model weights as safetensors + a JSON spec: a checkpoint that never unpickles anything.

A pickle (``torch.save``'s ``.pt``/``.pth``) runs code when loaded; a model file shared with a
hospital or downloaded from a release must not be able to do that. So a pneumoscope model is
``model.safetensors`` (tensors only) plus ``model.json`` (:func:`model_spec`: how to rebuild the
architecture, and the card with the preprocessing it was trained with). :func:`load_weights`
checks the *format* of the file (the safetensors header), not its suffix, and refuses anything
else with a :class:`~pneumoscope.errors.ModelError`.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import torch

from pneumoscope.errors import ModelError
from pneumoscope.models.card import ModelCard
from pneumoscope.models.net import PneumoNet
from pneumoscope.models.registry import create_model
from pneumoscope.utils.io import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

SPEC_FORMAT = "pneumoscope-model"
SPEC_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
SPEC_NAME = "model.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
# Card fields that describe the architecture; a spec whose card disagrees on these was made by
# different code and its weights would not fit.
_STRUCTURAL = ("name", "family", "in_chans", "num_features", "cam_layer", "first_conv")


def save_weights(model: torch.nn.Module, path: Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model.state_dict()`` as safetensors, atomically.

    ``dtype`` (e.g. ``torch.float16`` to halve the file) casts floating-point tensors only;
    integer buffers such as BatchNorm's ``num_batches_tracked`` keep their type.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if dtype is not None and not dtype.is_floating_point:
        raise ModelError(f"{path}: dtype must be a floating-point dtype, got {dtype}")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    metadata = {"format": "pt", "producer": "pneumoscope"}
    name = getattr(model, "name", None)
    if isinstance(name, str):
        metadata["model"] = name
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    logger.info("saved %d tensors to %s", len(tensors), path)
    return path


def check_safetensors(path: Path) -> dict[str, Any]:
    """Validate that ``path`` *is* a safetensors file by its header and return the header.

    A safetensors file starts with a little-endian u64 ``n`` followed by ``n`` bytes of JSON object
    (tensor names → dtype/shape/offsets). A pickle starts with ``0x80``, a ``torch.save`` zip with
    ``PK``; neither passes. Nothing in the file is executed or unpickled here.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise ModelError(
                    f"{path}: not a safetensors file (starts with {head[:4]!r}; pickled .pt/.pth checkpoints "
                    "are refused because loading them can run arbitrary code - convert them with a trusted "
                    "script to safetensors)"
                )
            raw = fh.read(n)
    except OSError as err:
        raise ModelError(f"{path}: cannot read weights file ({err})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header


def load_weights(model: torch.nn.Module, path: Path, strict: bool = True) -> Any:
    """Load safetensors weights into ``model`` (tensors are cast to the model's dtypes).

    With ``strict`` any missing, unexpected or mis-shaped tensor is a ModelError naming them.
    Returns ``load_state_dict``'s result (missing/unexpected keys) for ``strict=False``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    check_safetensors(path)
    try:
        state = load_file(str(path), device="cpu")
    except SafetensorError as err:
        raise ModelError(f"{path}: corrupt safetensors file ({err})") from None
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise ModelError(f"{path}: weights do not fit the model: {err}") from None
    logger.info("loaded %d tensors from %s", len(state), path)
    return result


def model_spec(model: PneumoNet) -> dict[str, Any]:
    """A JSON-able description that rebuilds the architecture with :func:`build_from_spec`."""
    if not isinstance(model, PneumoNet):
        raise ModelError(f"model_spec needs a PneumoNet, got {type(model).__name__}")
    return {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "name": model.name,
        "num_classes": model.num_classes,
        "in_chans": model.card.in_chans,
        "head": model.head_kind,
        "dropout": model.dropout,
        "kwargs": dict(model.build_kwargs),
        "pretrained_source": model.pretrained_source,
        "card": model.card.to_dict(),
    }


def build_from_spec(spec: dict[str, Any]) -> PneumoNet:
    """Rebuild the architecture of :func:`model_spec` with random init (no download); load the
    weights afterwards with :func:`load_weights`.

    The spec's card becomes ``model.card``: the preprocessing recorded at training time wins over
    today's registry card, so a checkpoint is always evaluated the way it was trained.
    ``spec['pretrained_source']`` (how the trained weights were initialised) is kept in the spec only.
    """
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        fmt = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ModelError(f"not a pneumoscope model spec (format {fmt!r}, expected {SPEC_FORMAT!r})")
    if spec.get("version") != SPEC_VERSION:
        raise ModelError(f"model spec version {spec.get('version')!r} is not supported (expected {SPEC_VERSION})")
    try:
        model = create_model(
            spec["name"],
            num_classes=spec["num_classes"],
            pretrained=False,
            in_chans=spec["in_chans"],
            head=spec["head"],
            dropout=spec["dropout"],
            **spec.get("kwargs", {}),
        )
    except KeyError as err:
        raise ModelError(f"model spec is missing {err}") from None
    if "card" in spec:
        saved = ModelCard.from_dict(spec["card"])
        for field_name in _STRUCTURAL:
            if getattr(saved, field_name) != getattr(model.card, field_name):
                raise ModelError(
                    f"model spec card {field_name}={getattr(saved, field_name)!r} does not match the "
                    f"architecture built by this version ({getattr(model.card, field_name)!r})"
                )
        if saved != model.card:
            logger.info("%s: using the card recorded in the spec (differs from the registry card)", model.name)
        model.card = saved
    return model


def save_model(model: PneumoNet, directory: Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``directory/model.safetensors`` and ``directory/model.json``; returns ``directory``."""
    directory = Path(directory)
    save_weights(model, directory / WEIGHTS_NAME, dtype=dtype)
    atomic_write_json(directory / SPEC_NAME, model_spec(model))
    return directory


def load_model(directory: Path, strict: bool = True) -> PneumoNet:
    """Inverse of :func:`save_model`: build from ``model.json``, load ``model.safetensors``; eval mode."""
    directory = Path(directory)
    spec_path = directory / SPEC_NAME
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{spec_path}: cannot read model spec ({err})") from None
    model = build_from_spec(spec)
    load_weights(model, directory / WEIGHTS_NAME, strict=strict)
    return model.eval()
