"""``pneumoscope predict``: inputs (files, folders, CSV), bad files, formats, resume, outputs."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pneumoscope.errors import DatasetError, ModelError
from pneumoscope.predict import collect_inputs, output_columns, predict_command, predict_files
from serve.helpers import make_checkpoint, make_dicom

CLASSES = ["NORMAL", "PNEUMONIA"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("predict-model") / "ckpt")


@pytest.fixture()
def folder(tmp_path: Path, data_root: Path) -> Path:
    """4 real X-rays in nested folders (symlinks), a truncated JPEG, a text file, junk and a symlink loop."""
    root = tmp_path / "in"
    for cls in ("NORMAL", "PNEUMONIA"):
        for j, src in enumerate(sorted((data_root / "test" / cls).glob("*.jpeg"))[:2]):
            dst = root / cls / ("deeper" if j else "") / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    good = sorted((data_root / "test" / "NORMAL").glob("*.jpeg"))[0].read_bytes()
    (root / "bad").mkdir()
    (root / "bad" / "cut.jpeg").write_bytes(good[: len(good) // 3])
    (root / "notes.txt").write_text("not an image and not an image name: ignored")
    (root / ".hidden.jpeg").write_bytes(b"hidden files are ignored")
    (root / "NORMAL" / "loop").symlink_to(root, target_is_directory=True)  # a symlink loop must not hang
    return root


def test_folder_with_a_bad_file(model: Path, folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="pneumoscope.predict"):
        code = predict_command(model, [str(folder)], out=out, batch_size=2, progress=False)
    assert code == 1
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert list(table.columns) == output_columns(CLASSES)
    assert len(table) == 5 and table["file"].is_unique
    bad = table[table["error"] != ""]
    assert list(bad["file"]) == [str(folder / "bad" / "cut.jpeg")]
    assert "truncated" in bad["error"].iloc[0]
    assert any(r.getMessage() == f"{folder / 'bad' / 'cut.jpeg'}: {bad['error'].iloc[0]}" for r in caplog.records)
    good = table[table["error"] == ""]
    assert len(good) == 4 and not any("loop" in f for f in good["file"])
    probs = good[["prob_NORMAL", "prob_PNEUMONIA"]].astype(float).to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-6)
    assert set(good["decision"]) <= set(CLASSES) and (good["threshold"].astype(float) == 0.5).all()
    ent = -(probs * np.log(probs)).sum(1)
    assert np.allclose(good["uncertainty"].astype(float), ent, atol=1e-6)
    assert not good["refer"].astype(str).eq("True").any()
    js = json.loads((out / "predictions.json").read_text())
    assert js["model_id"] == "cnn3:test" and len(js["predictions"]) == 5 and js["class_names"] == CLASSES
    printed = capsys.readouterr().out
    assert "ERROR: truncated" in printed and "5 files" in printed


def test_all_good_exit_code_0_and_same_as_library(model: Path, data_root: Path, tmp_path: Path) -> None:
    from pneumoscope.data.imageio import decode_image
    from pneumoscope.inference import Predictor

    files = [str(p) for p in sorted((data_root / "test" / "PNEUMONIA").glob("*.jpeg"))[:3]]
    assert predict_command(model, files, out=tmp_path / "p.csv", progress=False) == 0
    table = pd.read_csv(tmp_path / "p.csv")
    assert (tmp_path / "p.json").exists() and list(table["file"]) == files
    p = Predictor.load(model)
    expected = p.predict_u8(p.prepare([decode_image(f) for f in files])).probs
    assert np.allclose(table[["prob_NORMAL", "prob_PNEUMONIA"]].to_numpy(), expected, atol=1e-6)


def test_resume_skips_finished_files(model: Path, folder: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import pneumoscope.predict as predict_mod

    out = tmp_path / "out"
    first, errors = predict_files(model, [str(folder)], out=out, batch_size=2, progress=False)
    assert len(errors) == 1
    decoded: list[str] = []
    real = predict_mod.decode_image
    monkeypatch.setattr(predict_mod, "decode_image", lambda f, **kw: decoded.append(f) or real(f, **kw))
    second, errors = predict_files(model, [str(folder)], out=out, batch_size=2, progress=False)
    assert decoded == [str(folder / "bad" / "cut.jpeg")]  # only the failed file is tried again
    assert len(errors) == 1
    pd.testing.assert_frame_equal(first, second)
    assert pd.read_csv(out / "predictions.csv")["file"].is_unique


def test_resume_after_interruption(model: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed after its first batch keeps that batch; the next run does only the rest."""
    import pneumoscope.predict as predict_mod

    out = tmp_path / "out.csv"
    real = predict_mod.decode_image
    calls: list[str] = []

    def dies_on_third(f, **kw):  # noqa: ANN001, ANN202
        calls.append(f)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(f, **kw)

    monkeypatch.setattr(predict_mod, "decode_image", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        predict_files(model, [str(folder)], out=out, batch_size=2, progress=False)
    partial = pd.read_csv(out, keep_default_na=False)
    assert len(partial) == 2 and (partial["error"] == "").all()
    calls.clear()
    monkeypatch.setattr(predict_mod, "decode_image", lambda f, **kw: calls.append(f) or real(f, **kw))
    table, _ = predict_files(model, [str(folder)], out=out, batch_size=2, progress=False)
    assert len(calls) == 3 and not set(calls) & set(partial["file"])
    assert len(table) == 5 and table["file"].is_unique
    fresh, _ = predict_files(model, [str(folder)], out=None, batch_size=2, progress=False)
    pd.testing.assert_frame_equal(table, fresh)


def test_resume_refuses_other_model(model: Path, data_root: Path, tmp_path: Path) -> None:
    files = [str(sorted((data_root / "test" / "NORMAL").glob("*.jpeg"))[0])]
    predict_files(model, files, out=tmp_path / "o", progress=False)
    other = make_checkpoint(tmp_path / "other", seed=1, threshold=0.3)
    with pytest.raises(ModelError, match="another --out"):
        predict_files(other, files, out=tmp_path / "o", progress=False)


def test_csv_input_relative_paths(model: Path, data_root: Path, tmp_path: Path) -> None:
    src = sorted((data_root / "test" / "NORMAL").glob("*.jpeg"))[:2]
    (tmp_path / "imgs").mkdir()
    for s in src:
        (tmp_path / "imgs" / s.name).symlink_to(s)
    listing = tmp_path / "list.csv"
    rows = [f"imgs/{s.name}" for s in src] + ["", "imgs/missing.jpeg"]
    pd.DataFrame({"path": rows, "x": 1}).to_csv(listing, index=False)
    files, problems = collect_inputs([str(listing)])
    assert files == [str(tmp_path / "imgs" / s.name) for s in src] + [str(tmp_path / "imgs" / "missing.jpeg")]
    assert problems == [(f"{listing}:4", "empty path")]
    table, errors = predict_files(model, [str(listing)], out=None, progress=False)
    assert len(table) == 4 and sorted(r for _, r in errors) == ["empty path", "file not found"]
    bad_csv = tmp_path / "nopath.csv"
    bad_csv.write_text("file\na.jpeg\n")
    with pytest.raises(DatasetError, match="no 'path' column"):
        collect_inputs([str(bad_csv)])


def _png(arr: np.ndarray, mode: str | None = None, palette: bool = False) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    if palette:
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_png_variants_and_dicom(model: Path, data_root: Path, fullres_root: Path, tmp_path: Path) -> None:
    src = sorted((data_root / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    gray = np.asarray(Image.open(src).convert("L"))
    rgb = np.stack([gray] * 3, -1)
    variants = {
        "gray8.png": _png(gray),
        # 16-bit images are min-max scaled to 8 bits, so they compare with a stretched 8-bit copy
        "gray16.png": _png(gray.astype(np.uint16) * 257),
        "gray8-stretched.png": _png(np.rint((gray - gray.min()) * (255.0 / np.ptp(gray))).astype(np.uint8)),
        "rgb.png": _png(rgb),
        "rgba.png": _png(np.dstack([rgb, np.full_like(gray, 255)])),
        "palette.png": _png(rgb, palette=True),
    }
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
    make_dicom(src, tmp_path / "m2.dcm")
    make_dicom(src, tmp_path / "m1.dcm", photometric="MONOCHROME1")
    make_dicom(src, tmp_path / "m1-16", photometric="MONOCHROME1", bits=16, slope=4.0, intercept=100)  # no extension
    big = sorted(fullres_root.rglob("*.jpeg"))[-1]
    os.symlink(big, tmp_path / "fullres.jpeg")
    table, errors = predict_files(model, [str(tmp_path)], out=None, progress=False)
    assert errors == []
    p = dict(zip((Path(f).name for f in table["file"]), table["prob_PNEUMONIA"]))
    assert set(p) == {*variants, "m2.dcm", "m1.dcm", "m1-16", "fullres.jpeg"}
    for name in ("rgb.png", "rgba.png"):
        assert p[name] == pytest.approx(p["gray8.png"], abs=1e-5), name
    assert p["gray16.png"] == pytest.approx(p["gray8-stretched.png"], abs=1e-5)
    assert p["palette.png"] == pytest.approx(p["gray8.png"], abs=0.05)  # 64-colour quantisation
    assert p["m1.dcm"] == pytest.approx(p["m2.dcm"], abs=1e-5)
    assert p["m1-16"] == pytest.approx(p["m2.dcm"], abs=1e-5)


def test_tta_and_refer(tmp_path: Path, data_root: Path) -> None:
    model = make_checkpoint(tmp_path / "m", refer_threshold=0.0)  # refers everything uncertain at all
    files = [str(p) for p in sorted((data_root / "test" / "NORMAL").glob("*.jpeg"))[:3]]
    plain, _ = predict_files(model, files, out=None, progress=False)
    tta, _ = predict_files(model, files, out=None, tta=3, progress=False)
    assert plain["refer"].all() and tta["refer"].all()
    assert np.allclose(tta[["prob_NORMAL", "prob_PNEUMONIA"]].sum(axis=1), 1.0, atol=1e-6)
    assert not np.allclose(tta["prob_PNEUMONIA"], plain["prob_PNEUMONIA"], atol=1e-7)
    assert np.allclose(tta["prob_PNEUMONIA"], plain["prob_PNEUMONIA"], atol=0.1)


def test_output_path_forms(model: Path, data_root: Path, tmp_path: Path) -> None:
    f = [str(sorted((data_root / "test" / "NORMAL").glob("*.jpeg"))[0])]
    predict_files(model, f, out=tmp_path / "a.json", progress=False)
    assert (tmp_path / "a.csv").exists() and (tmp_path / "a.json").exists()
    predict_files(model, f, out=tmp_path / "dir", progress=False)
    assert {p.name for p in (tmp_path / "dir").iterdir()} == {"predictions.csv", "predictions.json"}


def test_cam_images(model: Path, data_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("pneumoscope.explain.overlay", reason="Grad-CAM overlay module not there yet")
    files = [str(p) for p in sorted((data_root / "test" / "PNEUMONIA").glob("*.jpeg"))[:2]]
    table, errors = predict_files(model, files, out=tmp_path / "out", cam=True, progress=False)
    assert errors == []
    for f in files:
        png = tmp_path / "out" / "cam" / f"{Path(f).stem}.png"
        im = Image.open(png)
        assert im.mode == "RGB" and im.size == Image.open(f).size


@pytest.mark.parametrize("resize", ["squash", "pad"])
def test_cam_geometry_maps_back_to_original(resize: str, tmp_path: Path, fullres_root: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With a stand-in CAM equal to the model input itself, the map drawn on the original image
    must reproduce the original: the squash/letterbox geometry is undone correctly."""
    import sys
    import types

    import pneumoscope.explain.cam as cam_mod
    from pneumoscope.data.imageio import decode_image
    from pneumoscope.inference import Predictor
    from pneumoscope.predict import cam_overlays

    def fake_cams(model, x, target_class, method="gradcam"):  # noqa: ANN001, ANN202
        v = x[:, 0].detach().numpy()
        return (v - v.min(axis=(1, 2), keepdims=True)) / np.ptp(v, axis=(1, 2), keepdims=True)

    fake_overlay = types.ModuleType("pneumoscope.explain.overlay")
    fake_overlay.overlay = lambda gray, cam: np.repeat(np.uint8(np.rint(cam * 255))[..., None], 3, -1)
    monkeypatch.setattr(cam_mod, "compute_cams", fake_cams)
    monkeypatch.setitem(sys.modules, "pneumoscope.explain.overlay", fake_overlay)
    p = Predictor.load(make_checkpoint(tmp_path / "m", resize=resize))
    src = next(f for f in sorted(fullres_root.rglob("*.jpeg")) if Image.open(f).size[0] != Image.open(f).size[1])
    img = decode_image(src)
    img = img - img.min()  # the stand-in CAM is min-max scaled; so is this reference
    img = np.uint8(np.rint(img * (255.0 / img.max())))
    ((gray, rgb),) = cam_overlays(p, p.prepare([img]), [img], [1], max_side=512)
    assert rgb.shape == (*gray.shape, 3) and max(gray.shape) == 512
    assert gray.shape[0] / gray.shape[1] == pytest.approx(img.shape[0] / img.shape[1], abs=0.01)
    diff = np.abs(rgb[..., 0].astype(float) - gray.astype(float))
    assert diff.mean() < 6, diff.mean()  # misaligned by a few pixels would be >> 10


def test_tta_mean_runs_in_batches_and_does_not_depend_on_them(tmp_path: Path, data_root: Path) -> None:
    """``evaluate --tta`` hands a whole split to tta_mean_probs; it must still run 64 at a time
    (one 900-image pass held ~13 GB), and the batch size must not change the result."""
    import torch

    from pneumoscope.inference import Predictor
    from pneumoscope.predict import tta_mean_probs

    predictor = Predictor.load(make_checkpoint(tmp_path / "m"))
    files = sorted((data_root / "train" / "NORMAL").glob("*.jpeg"))[:70]
    size = int(predictor.meta["preprocess"]["size"])
    u8 = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("L").resize((size, size))) for f in files]))
    seen: list[int] = []
    hook = predictor.model.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[0])))
    try:
        a = tta_mean_probs(predictor, u8, 2, seed=3, batch_size=32)
    finally:
        hook.remove()
    assert max(seen) == 32 and sum(seen) == 3 * len(files)  # plain pass + 2 augmented, 32 at a time
    b = tta_mean_probs(predictor, u8, 2, seed=3, batch_size=len(files))
    assert np.allclose(a, b, atol=1e-6)
