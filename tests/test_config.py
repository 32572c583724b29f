"""Config: built-in presets validate; unknown keys, wrong types and out-of-range values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumoscope.config import builtin_configs, load_config
from pneumoscope.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_every_builtin_config_validates():
    names = builtin_configs()
    assert {"default", "smoke", "seed-cnn3", "seed-resnet18", "seed-cnn5-focal", "seed-resnet50",
            "seed-efficientnet"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.train.phases, name


@pytest.mark.parametrize("override, key", [
    ("train.lr=0.1", "train.lr: unknown key"),
    ("train.batch_size=abc", "train.batch_size"),
    ("train.phases.0.lr=-1", "train.phases.0.lr"),
    ("model.head=transformer", "model.head"),
    ("eval.threshold_rule=sensitivity", "eval.threshold_target"),
    ("nonsense=1", "nonsense: unknown key"),
])
def test_bad_values_are_rejected_with_the_key_name(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    assert key in str(err.value)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config("default", ["train.phases.0.epochs=3", "model.pretrained=false", "train.weight_decay=3e-4"])
    assert cfg.train.phases[0].epochs == 3
    assert cfg.model.pretrained is False
    assert cfg.train.weight_decay == pytest.approx(3e-4)


def test_yaml_file_with_base(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: default\nname: mine\ntrain:\n  batch_size: 8\n")
    cfg = load_config(p)
    assert cfg.name == "mine" and cfg.train.batch_size == 8
    assert cfg.model.name == "efficientnet_lite0"  # inherited


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="built-in"):
        load_config("no-such-preset")


def test_a_relative_base_is_read_beside_the_including_file(tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "parent.yaml").write_text("base: default\nname: parent\ntrain:\n  batch_size: 8\n")
    (tmp_path / "cfgs" / "child.yaml").write_text("base: parent.yaml\nname: child\naugment:\n  sharpness: 0.5\n")
    monkeypatch.chdir(tmp_path)  # not the files' folder
    cfg = load_config(tmp_path / "cfgs" / "child.yaml")
    assert (cfg.name, cfg.train.batch_size, cfg.augment.sharpness) == ("child", 8, 0.5)
    for shipped in sorted((REPO / "experiments" / "candidates").glob("*.yaml")):
        assert load_config(shipped).model.name == "efficientnet_lite0", shipped
