"""The hostile corpus through every entry point: data check, predict, the REST API, evaluate.

Each bad file must give one line that names it and says what is wrong; nothing may crash with a
traceback; every good file (including the odd-but-valid ones: PNG named .jpeg, 16-bit, CMYK,
palette, RGBA, 1x1, MONOCHROME1 DICOM, non-UTF-8 and 250-byte names) must still be processed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from pneumoscope.cli import main
from pneumoscope.data.imageio import display_path
from reliability.corpus import Corpus


def _error_lines(text: str, path: Path) -> list[str]:
    """Lines of ``text`` that name ``path`` (a non-UTF-8 name appears with \\xNN escapes)."""
    return [line for line in text.splitlines() if display_path(path) in line]


def _assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text[-2000:]


# ------------------------------------------------------------------------------ data check
def test_data_check_names_every_bad_file_and_keeps_the_good_ones(corpus: Corpus, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "check"
    with caplog.at_level(logging.INFO):
        rc = main(["data", "check", str(corpus.root), "--out", str(out)])
    assert rc == 1  # problems found, but the report is complete
    report = json.loads((out / "data_check.json").read_text()) if (out / "data_check.json").exists() else None
    manifest = pd.read_parquet(out / "manifest.parquet")
    status = dict(zip(manifest["path"], manifest["status"]))
    reason = dict(zip(manifest["path"], manifest["error"]))
    for p in corpus.good + corpus.train_good:
        assert status.get(str(p)) == "ok", (p, reason.get(str(p)))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for p, words in corpus.bad.items():
        key = display_path(p)
        assert status.get(key) == "error" and words in reason[key], (p, reason.get(key))
        lines = _error_lines(logged, p)
        assert lines and all("\n" not in line for line in lines), p
        assert any(words in line for line in lines), (p, lines)
    assert len(manifest) == len(corpus.good) + len(corpus.train_good) + len(corpus.bad)  # loop visited once
    _assert_no_traceback(logged)
    if report is not None:
        assert {c["path"] for c in report["corrupt"]} == {display_path(p) for p in corpus.bad}


# ------------------------------------------------------------------------------ predict
def test_predict_reports_bad_files_in_the_table_and_predicts_the_good_ones(
        corpus: Corpus, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "pred"
    with caplog.at_level(logging.INFO):
        rc = main(["predict", str(corpus.split_dir), "--model", str(tiny_model), "--out", str(out), "--no-progress"])
    assert rc == 1  # some files failed: exit code 1, the table is complete
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert table["file"].is_unique
    by_file = table.set_index("file")
    for p in corpus.good:
        row = by_file.loc[str(p)]
        assert row["error"] == "" and row["decision"] in ("NORMAL", "PNEUMONIA"), (p, row["error"])
        assert 0.0 <= float(row["prob_PNEUMONIA"]) <= 1.0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for p, words in corpus.bad.items():
        row = by_file.loc[display_path(p)]
        assert words in row["error"] and row["decision"] == "", (p, row["error"])
        assert any(words in line for line in _error_lines(logged, p)), p
    assert len(table) == len(corpus.good) + len(corpus.bad)
    _assert_no_traceback(logged + capsys.readouterr().err)
    # the JSON twin holds the same rows
    doc = json.loads((out / "predictions.json").read_text())
    assert len(doc["predictions"]) == len(table)


# ------------------------------------------------------------------------------ REST API
@pytest.fixture(scope="module")
def client(tiny_model: Path):  # noqa: ANN201
    from pneumoscope.serve.app import create_app

    with TestClient(create_app(tiny_model, max_upload_bytes=2_000_000), raise_server_exceptions=False) as c:
        yield c


def test_api_answers_each_bad_upload_with_a_one_line_4xx_naming_it(corpus: Corpus, client: TestClient) -> None:
    for p, words in corpus.bad.items():
        if "UTF-8" in words or "permission" in words:
            continue  # properties of the file system, not of the bytes: nothing a client can send
        name = p.name
        r = client.post("/v1/predict", files={"files": (name, p.read_bytes(), "image/jpeg")})
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        body = r.json()
        assert body["file"] == name and words in body["error"] and "\n" not in body["error"], (name, body)
        _assert_no_traceback(r.text)


def test_api_predicts_every_good_upload(corpus: Corpus, client: TestClient) -> None:
    for p in corpus.good:
        name = display_path(p.name)
        r = client.post("/v1/predict", files={"files": (name, p.read_bytes(), "application/octet-stream")})
        assert r.status_code == 200, (name, r.text)
        assert r.json()["predictions"][0]["decision"] in ("NORMAL", "PNEUMONIA")


def test_api_one_bad_file_in_a_batch_is_named(corpus: Corpus, client: TestClient) -> None:
    good = corpus.good[0]
    bad = next(p for p, w in corpus.bad.items() if "truncated JPEG" in w)
    r = client.post("/v1/predict", files=[("files", (good.name, good.read_bytes(), "image/jpeg")),
                                          ("files", ("broken.jpeg", bad.read_bytes(), "image/jpeg"))])
    assert r.status_code == 422 and r.json()["file"] == "broken.jpeg"


def test_api_limits_and_hostile_requests_are_4xx(client: TestClient, corpus: Corpus) -> None:
    jpeg = corpus.good[0].read_bytes()
    cases = {
        "oversize body": dict(files={"files": ("big.jpeg", b"\xff\xd8" + b"\0" * 2_100_000, "image/jpeg")}),
        "no files": dict(data={"x": "1"}),
        "json instead of multipart": dict(json={"files": ["a.jpeg"]}),
        "client path as file name": dict(files={"files": ("../../../../etc/passwd", b"root:x:0:0", "text/plain")}),
        "absolute path name": dict(files={"files": ("/etc/passwd", jpeg, "image/jpeg")}),
    }
    for what, kwargs in cases.items():
        r = client.post("/v1/predict", **kwargs)
        if what == "absolute path name":  # the name is echoed, never opened: the JPEG bytes are predicted
            assert r.status_code == 200 and r.json()["predictions"][0]["filename"] == "/etc/passwd", r.text
            continue
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        assert "\n" not in r.json()["error"], what
        _assert_no_traceback(r.text)
    r = client.post("/v1/predict", content=b"x" * 10, headers={"content-type": "multipart/form-data; boundary=zz"})
    assert 400 <= r.status_code < 500, r.text
    r = client.post("/v1/predict", content=b"abc", headers={"content-length": "nonsense",
                                                            "content-type": "multipart/form-data; boundary=zz"})
    assert 400 <= r.status_code < 500


# ------------------------------------------------------------------------------ evaluate
def test_evaluate_uses_the_good_files_and_lists_the_bad_ones(corpus: Corpus, tiny_model: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from pneumoscope.evaluate.run import evaluate_model

    with caplog.at_level(logging.INFO):
        res = evaluate_model(tiny_model, corpus.root, split="test", out=tmp_path / "eval", bootstrap=0, tta=0,
                             cache_root=tmp_path / "cache", progress=False)
    assert res["n_images"] == len(corpus.good)
    listed = {u["path"]: u["reason"] for u in res["unreadable"]}
    assert listed.keys() == {display_path(p) for p in corpus.bad}
    for p, words in corpus.bad.items():
        assert words in listed[display_path(p)]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for p, words in corpus.bad.items():
        assert any(words in line for line in _error_lines(logged, p)), p
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert len(saved["unreadable"]) == len(corpus.bad)
    _assert_no_traceback(logged)


# ------------------------------------------------------------------------------ dataset shapes
def _one_line(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pneumoscope: error: "), lines
    return lines[0]


def test_one_class_dataset_scans_but_training_refuses_in_one_line(tmp_path: Path, data_root: Path, monkeypatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "only_normal" / "NORMAL"
    root.mkdir(parents=True)
    for src in sorted((data_root / "train" / "NORMAL").glob("*.jpeg"))[:6]:
        (root / src.name).symlink_to(src)
    assert main(["data", "check", str(root.parent), "--out", str(tmp_path / "check")]) in (0, 1)
    manifest = pd.read_parquet(tmp_path / "check" / "manifest.parquet")
    assert len(manifest) == 6 and (manifest["status"] == "ok").all()
    capsys.readouterr()
    monkeypatch.setenv("PNEUMOSCOPE_CACHE", str(tmp_path / "cache"))
    rc = main(["train", "--config", "smoke", "--data", str(root.parent), "--out", str(tmp_path / "run"),
               "--no-progress"])
    line = _one_line(capsys)
    assert rc == 2 and str(root.parent) in line and "PNEUMONIA" in line, line


def test_csv_with_missing_columns_is_one_line_naming_file_and_column(tmp_path: Path, corpus: Corpus, tiny_model: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    csv = tmp_path / "list.csv"
    csv.write_text("file,diagnosis\n" + "".join(f"{p},NORMAL\n" for p in corpus.good[:3]))
    assert main(["data", "check", str(csv), "--out", str(tmp_path / "check")]) == 2
    line = _one_line(capsys)
    assert str(csv) in line and "path" in line and "label" in line, line
    assert main(["predict", str(csv), "--model", str(tiny_model), "--out", str(tmp_path / "pred")]) == 2
    line = _one_line(capsys)
    assert str(csv) in line and "'path'" in line, line
    assert not (tmp_path / "pred").exists()


def test_csv_paths_outside_its_folder_are_refused_rows_and_the_rest_is_scanned(tmp_path: Path, corpus: Corpus,
                                                                               data_root: Path) -> None:
    from pneumoscope.data.scan import OUTSIDE_ROOT

    folder = tmp_path / "csvset"
    (folder / "img").mkdir(parents=True)
    inside = []
    for i, src in enumerate(corpus.good[:4]):
        dst = folder / "img" / f"{i}{src.suffix}"
        dst.write_bytes(src.read_bytes())
        inside.append(dst)
    outside = [str(data_root / "train" / "NORMAL" / "IM-0115-0001.jpeg"), "../../etc/passwd", "/etc/shadow"]
    lines = ["path,label"] + [f"img/{p.name},{'NORMAL' if i % 2 else 'PNEUMONIA'}" for i, p in enumerate(inside)]
    lines += [f"{p},NORMAL" for p in outside]
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    assert main(["data", "check", str(folder / "labels.csv"), "--out", str(tmp_path / "check")]) == 1
    m = pd.read_parquet(tmp_path / "check" / "manifest.parquet")
    assert (m[m["path"].str.contains("/img/")]["status"] == "ok").sum() == 4
    refused = m[m["error"] == OUTSIDE_ROOT]
    assert len(refused) == 3 and (refused["content_hash"] == "").all()  # never even opened
