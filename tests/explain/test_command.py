"""``explain_command``: real images plus a broken file → PNGs, JSON, exit code 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pneumoscope.errors import ConfigError
from pneumoscope.explain.command import explain_command, output_names
from pneumoscope.models import create_model, model_spec, save_weights
from pneumoscope.utils.io import atomic_write_json


@pytest.fixture()
def model_dir(tmp_path: Path, predictor_meta) -> Path:
    """A model directory (model.json + model.safetensors) as a trained run would leave it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("cnn3", num_classes=2, pretrained=False)
    d = tmp_path / "model"
    save_weights(model, d / "model.safetensors")
    meta = predictor_meta("cnn3", size=96)
    meta["model"] = model_spec(model)
    atomic_write_json(d / "model.json", meta)
    return d


def test_explain_command_writes_pngs_and_json(tmp_path: Path, model_dir: Path, xray_files: list[Path],
                                             caplog: pytest.LogCaptureFixture) -> None:
    images = [str(xray_files[0]), str(xray_files[4]), str(xray_files[-1])]
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    with caplog.at_level("ERROR"):
        rc = explain_command(str(model_dir), images + [str(broken)], out, method="gradcam")
    assert rc == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"{broken}: ") and "\n" not in errors[0]

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"{Path(f).stem}_cam.png" for f in images)
    for p in out.glob("*.png"):
        with Image.open(p) as im:
            assert im.format == "PNG"
    report = json.loads((out / "explanations.json").read_text())
    assert [r["path"] for r in report["images"]] == images
    assert report["failed"] == [{"path": str(broken), "reason": report["failed"][0]["reason"]}]
    for rec in report["images"]:
        assert set(rec["probs"]) == {"NORMAL", "PNEUMONIA"}
        assert sum(rec["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert rec["decision"] in ("NORMAL", "PNEUMONIA") and rec["cam_class"] == rec["decision"]
        assert 0.0 <= rec["lung_attention"] <= 1.0 and 0.0 <= rec["border_attention"] <= 1.0
        assert rec["mask_method"] in ("threshold", "prior")


def test_explain_command_target_and_success(tmp_path: Path, model_dir: Path, xray_files: list[Path]) -> None:
    out = tmp_path / "out"
    rc = explain_command(str(model_dir), [str(xray_files[1])], out, method="gradcam++", target="pneumonia")
    assert rc == 0
    report = json.loads((out / "explanations.json").read_text())
    assert report["target"] == "PNEUMONIA" and report["images"][0]["cam_class"] == "PNEUMONIA"
    with pytest.raises(ConfigError, match="classes: NORMAL, PNEUMONIA"):
        explain_command(str(model_dir), [str(xray_files[1])], out, target="COVID")
    with pytest.raises(ConfigError, match="method"):
        explain_command(str(model_dir), [str(xray_files[1])], out, method="magic")


def test_output_names_disambiguate_equal_stems(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "x.jpeg", tmp_path / "b" / "x.jpeg"
    names = output_names([str(a), str(b), str(tmp_path / "y.png")])
    assert names[str(tmp_path / "y.png")] == "y_cam.png"
    assert len({names[str(a)], names[str(b)]}) == 2 and all(n.endswith("_cam.png") for n in names.values())
