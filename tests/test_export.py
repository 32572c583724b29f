"""ONNX export: parity with PyTorch on real X-rays, self-describing output, safe loading."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscope.errors import ModelError
from pneumoscope.export import default_check_images, export_onnx
from pneumoscope.inference import OnnxPredictor, Predictor, load_predictor
from pneumoscope.predict import predict_files
from pneumoscope.utils.io import sha256_file
from serve.helpers import make_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("export-model") / "ckpt")


@pytest.fixture(scope="module")
def exported(model: Path, tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "onnx"
    return out, export_onnx(model, out)  # default check images: 16 from the dataset


def test_export_parity_on_real_images(exported: tuple[Path, dict], model: Path) -> None:
    out, report = exported
    par = report["parity"]
    assert par["source"] == "dataset" and par["images"] == 16 and par["passed"]
    assert par["max_abs_diff_prob"] < 1e-4 and par["decisions_agree"]
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.json", "model.safetensors"}
    meta = json.loads((out / "model.json").read_text())
    info = meta["onnx"]
    assert info["file"] == "model.onnx" and info["opset"] == 17 and info["sha256"] == sha256_file(out / "model.onnx")
    assert info["input"] == "image" and info["output"] == "logits" and info["input_shape"] == ["batch", 1, 150, 150]
    assert info["parity"]["max_abs_diff_prob"] == par["max_abs_diff_prob"]
    assert meta["class_names"] == ["NORMAL", "PNEUMONIA"] and meta["temperature"] == 1.3


def test_onnx_graph_has_dynamic_batch(exported: tuple[Path, dict]) -> None:
    import onnx

    g = onnx.load(str(exported[0] / "model.onnx")).graph
    assert [i.name for i in g.input] == ["image"] and [o.name for o in g.output] == ["logits"]
    dims = g.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 150, 150]


def test_predict_via_onnx_equals_pytorch(exported: tuple[Path, dict], model: Path, data_root: Path) -> None:
    files = [str(p) for c in ("NORMAL", "PNEUMONIA") for p in sorted((data_root / "test" / c).glob("*.jpeg"))[20:25]]
    onnx_p = load_predictor(exported[0])
    assert isinstance(onnx_p, OnnxPredictor) and type(load_predictor(model)) is Predictor
    t_onnx, e1 = predict_files(onnx_p, files, out=None, progress=False)
    t_torch, e2 = predict_files(model, files, out=None, progress=False)
    assert e1 == e2 == []
    for col in ("prob_NORMAL", "prob_PNEUMONIA", "uncertainty"):
        assert np.abs(t_onnx[col].to_numpy() - t_torch[col].to_numpy()).max() < 1e-4
    assert (t_onnx["decision"] == t_torch["decision"]).all()
    u8 = onnx_p.prepare([np.full((300, 200), 128, np.uint8)])
    assert onnx_p.tta_probs(u8, 2).shape == (2, 1, 2)  # the same interface as Predictor


def test_onnx_pytorch_twin(exported: tuple[Path, dict]) -> None:
    onnx_p = load_predictor(exported[0])
    twin = onnx_p.pytorch()
    assert isinstance(twin, Predictor) and twin.model is not None
    assert load_predictor(exported[0], backend="pytorch").model is not None


def test_parity_failure_deletes_export(model: Path, tmp_path: Path, data_root: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = OnnxPredictor.logits_u8
    monkeypatch.setattr(OnnxPredictor, "logits_u8",  # a small error in one logit: probabilities move ~1e-3
                        lambda self, u8, batch_size=64: real(self, u8, batch_size) + np.array([0.0, 0.01], np.float32))
    images = default_check_images(4)
    with pytest.raises(ModelError, match="parity check failed"):
        export_onnx(model, tmp_path / "bad", check_images=images)
    assert not (tmp_path / "bad").exists()
    assert list(tmp_path.iterdir()) == []  # the staging directory is gone too


def test_export_refuses_foreign_directory(model: Path, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="not empty"):
        export_onnx(model, tmp_path / "busy")
    ckpt_dir = next(model.glob("best-*"))
    with pytest.raises(ModelError):
        export_onnx(model, ckpt_dir)


def test_reexport_replaces_previous_export(exported: tuple[Path, dict], model: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    shutil.copytree(exported[0], out)
    report = export_onnx(model, out, include_weights=False, check_images=default_check_images(2))
    assert report["parity"]["images"] == 2
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.json"}  # stale weights removed
    with pytest.raises(ModelError, match="PyTorch weights"):
        load_predictor(out).pytorch()


def test_pickle_named_safetensors_is_refused(model: Path, tmp_path: Path) -> None:
    src = next(model.glob("best-*"))
    for kind in ("torch.save", "pickle"):
        d = tmp_path / kind
        d.mkdir()
        shutil.copy(src / "model.json", d / "model.json")
        if kind == "torch.save":
            torch.save({"w": torch.zeros(2)}, d / "model.safetensors")
        else:
            (d / "model.safetensors").write_bytes(pickle.dumps({"w": [0.0, 1.0]}))
        with pytest.raises(ModelError, match="not a safetensors file"):
            load_predictor(d)


def test_tampered_onnx_is_refused(exported: tuple[Path, dict], tmp_path: Path) -> None:
    out = tmp_path / "tampered"
    shutil.copytree(exported[0], out)
    data = bytearray((out / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (out / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        load_predictor(out)
    meta = json.loads((out / "model.json").read_text())
    meta["onnx"]["file"] = "../../etc/passwd"
    (out / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="plain file name"):
        load_predictor(out)


def test_efficientnet_lite0_parity(tmp_path: Path, data_root: Path) -> None:
    """A real backbone (depthwise convs, BatchNorm, ReLU6) at 224 px exports within tolerance."""
    model = make_checkpoint(tmp_path / "eff", name="efficientnet_lite0")
    report = export_onnx(model, tmp_path / "eff-onnx", check_images=default_check_images(4), include_weights=False)
    assert report["parity"]["max_abs_diff_prob"] < 1e-4 and report["parity"]["images"] == 4
