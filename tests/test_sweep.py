"""The sweep runner on real images: a 3-point grid killed with SIGKILL mid-run and restarted
continues without retraining finished runs; one table row per point; winners on validation;
test metrics only for the chosen runs and the ensemble."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pneumoscope.errors import ConfigError
from pneumoscope.sweep import load_sweep, point_status, run_sweep

REPO = Path(__file__).resolve().parents[1]


def _tiny(tmp_path: Path, **extra) -> Path:
    doc = {
        "name": "tiny",
        "base": "smoke",
        "set": {"data.limit_per_class": 8, "preprocess.size": 32, "train.batch_size": 8,
                "data.cache_dir": str(tmp_path / "cache"),
                "train.phases": [{"name": "train", "epochs": 2, "lr": 0.001}]},
        "test": {"bootstrap": 20, "tta": 0},
        "experiments": {
            "lr": {"grid": {"train.phases.0.lr": [0.001, 0.003]}},
            "loss": {"points": {"focal": {"train.loss.name": "focal"}}},
        },
        "ensemble": {"top": 2, "rule": "mean"},
        **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path, small_kermany):
    sweep_file, out = _tiny(tmp_path), tmp_path / "sweep"
    env = {**os.environ, "PNEUMOSCOPE_FAULT": "train_step:7", "OMP_NUM_THREADS": "1"}
    # 16 train images, batch 8, 2 epochs: 4 optimiser steps per run, so step 7 is in the second
    # run's second epoch, after its first-epoch checkpoint: the process is SIGKILLed there.
    proc = subprocess.run([sys.executable, "-m", "pneumoscope", "-q", "sweep", str(sweep_file), "--data",
                           str(small_kermany), "--out", str(out)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    first, second, third = out / "lr" / "lr=0.001", out / "lr" / "lr=0.003", out / "loss" / "focal"
    assert (first / "summary.json").exists()
    assert (second / "checkpoints" / "last.json").exists() and not (second / "summary.json").exists()
    assert not third.exists()
    finished_at = (first / "summary.json").stat().st_mtime_ns
    best_at = (first / "checkpoints" / "best.json").stat().st_mtime_ns
    epoch1 = pd.read_csv(second / "metrics.csv")
    assert len(epoch1) == 1  # the killed run's first epoch

    res = run_sweep(sweep_file, small_kermany, out)
    assert [p["status"] for p in res["points"]] == ["skipped (done)", "resumed", "trained"]
    assert (first / "summary.json").stat().st_mtime_ns == finished_at  # not retrained
    assert (first / "checkpoints" / "best.json").stat().st_mtime_ns == best_at
    history = pd.read_csv(second / "metrics.csv")
    assert len(history) == 2  # resumed: epoch 1 kept exactly as written before the kill, then epoch 2
    pd.testing.assert_frame_equal(history.iloc[:1], epoch1)
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 3 and table["val_auroc"].notna().all()
    assert list(table["point"]) == ["lr=0.001", "lr=0.003", "focal"]
    winners = table[table["winner"]]
    assert sorted(winners["experiment"]) == ["loss", "lr"]
    lr = table[table["experiment"] == "lr"]
    assert winners[winners["experiment"] == "lr"]["val_auroc"].iloc[0] == lr["val_auroc"].max()
    # test metrics: the two winners and the ensemble, nothing else
    assert [t["chosen"] for t in res["test"]] == [f"{w.experiment}/{w.point}" for w in winners.itertuples()] + ["ensemble"]
    losers = table[~table["winner"]]
    assert all(not (Path(d) / "eval").exists() for d in losers["run_dir"])
    assert (out / "ensemble" / "model.json").exists()
    md = (out / "results.md").read_text()
    assert "Test metrics of the chosen models (reported once, never used for choosing)" in md
    assert (out / "val_auroc.png").stat().st_size > 0

    # a third start does nothing but rebuild the table
    eval_at = (out / "ensemble" / "eval" / "test" / "metrics.json").stat().st_mtime_ns
    again = run_sweep(sweep_file, small_kermany, out)
    assert {p["status"] for p in again["points"]} == {"skipped (done)"}
    assert (out / "ensemble" / "eval" / "test" / "metrics.json").stat().st_mtime_ns == eval_at

    # the sweep file changed under an existing output folder: refused, never overwritten
    changed = _tiny(tmp_path, description="batch size changed")
    doc = yaml.safe_load(changed.read_text())
    doc["set"]["train.batch_size"] = 4
    changed.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="holds a run of another config.*batch_size"):
        run_sweep(changed, small_kermany, out)


def test_sweep_file_points_names_and_reduced(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({
        "base": "smoke",
        "reduced": {"set": {"preprocess.size": 32}, "max_epochs": 1},
        "experiments": {
            "grid2": {"grid": {"train.loss.name": ["bce", "focal"], "model.name": ["cnn3", "cnn5"]}},
            "aug": {"points": {"none": {"augment.rotate": 0.0}, "rot/20": {"augment.rotate": 20.0}},
                    "set": {"train.phases": [{"epochs": 5}, {"epochs": 3, "lr": 1e-4}]}},
        },
    }, sort_keys=False))
    full = load_sweep(f, tmp_path / "o")
    names = [(p.experiment, p.name) for p in full.points]
    # grid names: key=value of the last key component, the full key where two would read the same
    assert names == [("grid2", "train.loss.name=bce,model.name=cnn3"), ("grid2", "train.loss.name=bce,model.name=cnn5"),
                     ("grid2", "train.loss.name=focal,model.name=cnn3"),
                     ("grid2", "train.loss.name=focal,model.name=cnn5"), ("aug", "none"), ("aug", "rot_20")]
    assert [p.name for p in load_sweep(f, tmp_path / "o").points] == [n for _, n in names]  # stable
    assert full.points[-1].cfg.augment.rotate == 20.0 and full.points[0].cfg.preprocess.size == 64
    red = load_sweep(f, tmp_path / "o", reduced=True)
    assert all(p.cfg.preprocess.size == 32 for p in red.points)
    assert [ph.epochs for ph in red.points[-1].cfg.train.phases] == [1, 1]
    assert point_status(red.points[0]) == "new"
    assert red.points[0].run_dir == tmp_path / "o" / "grid2" / "train.loss.name=bce,model.name=cnn3"

    f.write_text(yaml.safe_dump({"base": "smoke", "experiments": {"x": {"grid": {"train.lr_typo": [1]}}}}))
    with pytest.raises(ConfigError, match="x: point lr_typo=1: train.lr_typo: unknown key"):
        load_sweep(f, tmp_path / "o")
    f.write_text(yaml.safe_dump({"base": "smoke", "experimants": {}}))
    with pytest.raises(ConfigError, match="unknown key.*experimants"):
        load_sweep(f, tmp_path / "o")


def test_shipped_roadmap_is_valid(tmp_path):
    roadmap = REPO / "experiments" / "roadmap.yaml"
    full = load_sweep(roadmap, tmp_path)
    red = load_sweep(roadmap, tmp_path, reduced=True)
    exps = {p.experiment for p in full.points}
    assert {"loss", "augmentation", "lr", "batch_size", "dropout", "architecture", "finetune"} <= exps
    assert len(full.points) == len(red.points) and full.ensemble
    assert {p.cfg.preprocess.size for p in red.points} == {red.points[0].cfg.preprocess.size}  # one input: ensemble-able
    assert all(p.cfg.data.limit_per_class for p in red.points)


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    from pneumoscope.cli import main

    sweep_file = _tiny(tmp_path)
    assert main(["-q", "sweep", str(sweep_file), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "3 points in 2 experiments" in out and out.count("| new ") == 3
    assert "lr=0.003" in out and "estimated training time" in out
    assert "ensemble (mean) of the best 2" in out
    assert not (tmp_path / "o").exists()
