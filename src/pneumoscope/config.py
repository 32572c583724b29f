"""The run configuration: YAML file → validated typed object → components.

One pydantic model per section; unknown keys, wrong types and out-of-range values are rejected
with the key's dotted name before any work starts. Components receive the sections they need as
explicit arguments, never the whole config or an argparse namespace.

``--set a.b=value`` overrides are applied to the raw mapping before validation, with the value
parsed as YAML (so ``--set train.lr=3e-4`` is a float and ``--set model.pretrained=false`` a bool).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pneumoscope.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    root: str | None = None
    val_fraction: float = Field(0.15, gt=0.0, lt=0.9)
    split: Literal["random", "ordered"] = Field(
        "random", description="validation split: 'random' patient-grouped stratified folds (seeded), or 'ordered': "
                              "the lowest patient numbers of each class and naming series, the way the Kermany "
                              "test split was cut (pneumoscope.data.split)")
    val_source: str | None = Field(
        None, description="a labelled folder or CSV from elsewhere (another hospital, scanner or period) to validate "
                          "on instead of a split cut from train: the whole train pool trains, and epochs, temperature "
                          "and threshold are chosen on these images; its test split is never used, and train images "
                          "sharing a patient or pixels with it are dropped (external validation; data.split and "
                          "data.val_fraction then play no part)")
    cache_dir: str | None = None
    workers: int = Field(2, ge=1, le=64)
    limit_per_class: int | None = Field(None, ge=1, description="use at most N train images per class (smoke runs)")
    synthetic: str | None = Field(None, description="CSV or folder of synthetic images (`pneumoscope gan sample`) "
                                                    "added to the TRAIN split only, never to val/test")
    synthetic_per_class: int | None = Field(None, ge=1, description="use at most N synthetic images per class")


class PreprocessConfig(_Strict):
    size: int = Field(224, ge=16, le=1024)
    resize: Literal["squash", "pad"] = "squash"
    clahe: bool = False
    clahe_clip: float = Field(2.0, gt=0)
    clahe_grid: int = Field(8, ge=1, le=64)
    blur_sigma: float = Field(0.0, ge=0.0, le=10.0)


class AugmentConfig(_Strict):
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    rotate: float = Field(10.0, ge=0.0, le=180.0)
    translate: float = Field(0.06, ge=0.0, le=0.5)
    scale_min: float = Field(0.9, gt=0.0, le=1.0)
    scale_max: float = Field(1.1, ge=1.0, le=3.0)
    brightness: float = Field(0.2, ge=0.0, le=1.0)
    contrast: float = Field(0.2, ge=0.0, le=1.0)
    sharpness: float = Field(0.0, ge=0.0, le=1.0, description="per-image sharpness factor in [1-s, 1+s] "
                                                              "(torchvision adjust_sharpness semantics)")


class ModelConfig(_Strict):
    name: str = "efficientnet_lite0"
    pretrained: bool | Literal["pypi", "torchvision", "timm"] = True
    head: Literal["linear", "mlp", "bn512"] = "linear"
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    in_chans: int | None = Field(None, ge=1, le=3)
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra builder arguments, e.g. {image_size: 384} for ViT")


class LossConfig(_Strict):
    name: Literal["ce", "bce", "focal"] = "ce"
    class_weights: Literal["none", "auto"] | list[float] = "none"
    focal_gamma: float = Field(2.0, ge=0.0, le=10.0)
    focal_alpha: float | None = Field(None, gt=0.0, lt=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)


class ScheduleConfig(_Strict):
    name: Literal["none", "cosine", "onecycle", "plateau"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)
    plateau_factor: float = Field(0.2, gt=0.0, lt=1.0)
    plateau_patience: int = Field(2, ge=0)


class PhaseConfig(_Strict):
    """One phase of training (e.g. phase 1: head only at 1e-3; phase 2: last stages at 5e-5)."""

    name: str = "train"
    epochs: int = Field(10, ge=0, le=1000)
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    freeze: Literal["none", "backbone", "last_n"] = "none"
    trainable_stages: int = Field(0, ge=0)
    size: int | None = Field(None, ge=16, le=1024, description="input resolution for this phase (progressive resizing)")
    feature_cache: bool = Field(True, description="compute the frozen prefix once and train the rest on cached features")
    feature_views: int = Field(4, ge=1, le=64, description="augmented views of each train image in the feature cache")


class EarlyStoppingConfig(_Strict):
    metric: Literal["val_auroc", "val_loss", "val_accuracy", "val_macro_auroc"] = "val_auroc"
    patience: int = Field(5, ge=1)
    min_delta: float = Field(0.0, ge=0.0)


class TrainConfig(_Strict):
    batch_size: int = Field(32, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=1024)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    loss: LossConfig = LossConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    phases: list[PhaseConfig] = Field(default_factory=lambda: [PhaseConfig()])
    balanced_sampler: bool = False
    early_stopping: EarlyStoppingConfig | None = EarlyStoppingConfig()
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False
    deterministic: bool = True
    num_workers: int | Literal["auto"] = "auto"
    threads: int | None = Field(None, ge=1, le=512)
    sync_bn: bool = False
    save_every_steps: int | None = Field(None, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    dummy_class: bool = Field(False, description="extra output trained on mixed-class (ambiguous) images; "
                                                  "dropped at evaluation (pneumoscope.train.dummy)")
    dummy_fraction: float = Field(0.2, gt=0.0, le=1.0, description="dummy examples per real train image")

    @model_validator(mode="after")
    def _phases_nonempty(self) -> "TrainConfig":
        if not self.phases:
            raise ValueError("train.phases must list at least one phase")
        return self


class EvalConfig(_Strict):
    threshold_rule: Literal["youden", "sensitivity", "specificity", "fixed"] = "youden"
    threshold_target: float | None = Field(None, gt=0.0, lt=1.0)
    bootstrap: int = Field(1000, ge=0, le=100000)
    tta: int = Field(0, ge=0, le=64, description="test-time augmentation samples for uncertainty")
    mc_dropout: int = Field(0, ge=0, le=256)
    refer_fraction: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _target(self) -> "EvalConfig":
        if self.threshold_rule in ("sensitivity", "specificity", "fixed") and self.threshold_target is None:
            raise ValueError(f"eval.threshold_target is required for threshold_rule={self.threshold_rule!r}")
        return self


class RunConfig(_Strict):
    name: str = "run"
    seed: int = 0
    task: Literal["binary", "bacterial_vs_viral", "three_class"] = "binary"
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    notes: str = ""


# --------------------------------------------------------------------------- loading
def builtin_configs() -> list[str]:
    """Names of the configs shipped in ``pneumoscope/configs/`` (``default``, ``seed-resnet18``, ...)."""
    files = resources.files("pneumoscope").joinpath("configs")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str | Path) -> dict:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        text = p.read_text()
    else:
        res = resources.files("pneumoscope").joinpath("configs", f"{name_or_path}.yaml")
        if not res.is_file():
            raise ConfigError(f"{name_or_path}: no such config file or built-in config "
                              f"(built-in: {', '.join(builtin_configs())})")
        text = res.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{name_or_path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{name_or_path}: a config must be a mapping at the top level")
    base = raw.pop("base", None)
    if base:
        near = p.parent / str(base) if p.exists() else None  # a relative base is read beside this file first
        merged = _read_yaml(near if near is not None and near.is_file() else base)
        _deep_merge(merged, raw)
        return merged
    return raw


def _deep_merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (value parsed as YAML) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if part.isdigit() and isinstance(node, list):
                node = node[int(part)]
                continue
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {key}: {part} is not a section")
        last = parts[-1]
        parsed = yaml.safe_load(value) if value != "" else None
        if last.isdigit() and isinstance(node, list):
            node[int(last)] = parsed
        else:
            node[last] = parsed
    return raw


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a raw mapping; errors name the offending key (``train.lr: Input should be ...``)."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        raise ConfigError(f"{source}: {loc}: {msg}{more}") from None


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a built-in config by name or a YAML path, apply ``--set`` overrides, validate."""
    raw = _read_yaml(name_or_path)
    apply_overrides(raw, overrides or [])
    return validate_config(raw, source=str(name_or_path))


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
