"""Configs: an unknown key, a wrong type or an out-of-range value is refused with the key's name,
as one line with exit code 2, before any work starts (no run directory, no cache, no scan)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumoscope.cli import main

CASES = [  # (--set or YAML text, the dotted key the message must name)
    (["--set", "train.bogus=1"], "train.bogus"),
    (["--set", "trian.batch_size=8"], "trian"),
    (["--set", "train.batch_size=abc"], "train.batch_size"),
    (["--set", "train.batch_size=0"], "train.batch_size"),
    (["--set", "preprocess.size=5"], "preprocess.size"),
    (["--set", "data.val_fraction=1.5"], "data.val_fraction"),
    (["--set", "train.phases.0.lr=-1"], "train.phases.0.lr"),
    (["--set", "model.pretrained=maybe"], "model.pretrained"),
    (["--set", "augment.rotate=[1, 2]"], "augment.rotate"),
    ("name: x\nbase: smoke\ntrain: {batch_size: 16, shuffle: true}\n", "train.shuffle"),
    ("base: smoke\npreprocess: {size: 99999}\n", "preprocess.size"),
    ("base: smoke\ntrain: {phases: [{name: a, epochs: two, lr: 0.1}]}\n", "train.phases.0.epochs"),
]


@pytest.mark.parametrize("case,key", CASES, ids=[k + ("-yaml" if isinstance(c, str) else "") for c, k in CASES])
def test_bad_config_is_refused_naming_the_key_before_any_work(case, key: str, tmp_path: Path, monkeypatch,
                                                              data_root: Path, capsys: pytest.CaptureFixture) -> None:
    cache, run = tmp_path / "cache", tmp_path / "run"
    monkeypatch.setenv("PNEUMOSCOPE_CACHE", str(cache))
    if isinstance(case, str):
        (tmp_path / "bad.yaml").write_text(case)
        args = ["--config", str(tmp_path / "bad.yaml")]
    else:
        args = ["--config", "smoke", *case]
    # the real dataset: had the config not been checked first, a scan and a cache build would start
    rc = main(["train", *args, "--data", str(data_root), "--out", str(run), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("pneumoscope: error: ") and key in lines[0], lines[0]
    assert not run.exists() and not cache.exists()


def test_a_tampered_config_of_a_run_is_refused_on_resume(tmp_path: Path, data_root: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: smoke\ntrain: {batch_size: -3}\n")
    rc = main(["train", "--resume", str(run), "--data", str(data_root), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "train.batch_size" in lines[0], lines
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # no lock, no log, nothing


@pytest.mark.parametrize("option,value,name", [("--batch-size", "0", "batch_size"), ("--tta", "-1", "tta")])
def test_predict_options_out_of_range_are_refused_before_writing(option: str, value: str, name: str,
                                                                  tmp_path: Path, tiny_model: Path,
                                                                  corpus, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pred"
    rc = main(["predict", str(corpus.good[0]), "--model", str(tiny_model), "--out", str(out), option, value])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and name in lines[0], lines
    assert not out.exists()
