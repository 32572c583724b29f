"""The benchmark helpers write complete, atomic results files, and the loader benchmark runs end to end.

No timing is asserted: speed targets live in ``benchmarks/``, not in tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"


def _load(name: str):
    """A benchmarks/ script as a module (the scripts import each other as top-level ``common``)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"pneumoscope_benchmarks_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def common():
    return _load("common")


TABLE = "| pipeline | images/s |\n|---|---|\n| demo | 1.0 |"
COMMAND = "PYTHONPATH=src python benchmarks/bench_demo.py --images 8"


def test_write_results_writes_json_and_markdown(tmp_path: Path, common) -> None:
    json_path, md_path = common.write_results("demo", {"images_per_s": 1.0, "missing": float("nan")}, TABLE,
                                              COMMAND, results_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "demo.md"]  # no temp files left
    doc = json.loads(json_path.read_text())
    assert doc["name"] == "demo" and doc["command"] == COMMAND and doc["table_md"] == TABLE
    assert doc["results"] == {"images_per_s": 1.0, "missing": None}
    machine = doc["machine"]
    for key in ("cpu_model", "cpu_count", "ram_gb", "python", "torch", "torch_threads", "load_avg"):
        assert key in machine, key
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] >= 1
    md = md_path.read_text()
    assert COMMAND in md and TABLE in md and machine["cpu_model"] in md and machine["torch"] in md


def test_write_results_is_atomic(tmp_path: Path, common, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails before the rename leaves the previous files whole and no temp files."""
    import pneumoscope.utils.io as io

    common.write_results("demo", {"v": 1}, TABLE, COMMAND, results_dir=tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        common.write_results("demo", {"v": 2}, "| other |", "python other.py", results_dir=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_write_results_refuses_paths_as_names(tmp_path: Path, common) -> None:
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            common.write_results(bad, {}, TABLE, COMMAND, results_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_helpers(common) -> None:
    assert common.peak_rss_mb() > 1
    with common.Timer() as t:
        pass
    assert isinstance(t.seconds, float)  # the Timer records a duration; speed is never asserted in tests
    assert common.percentile([1.0, 2.0, 3.0], 50) == 2.0
    assert common.fmt(float("nan")) == "–" and common.fmt(1234.56) == "1,234.6"
    cmd = common.command_line(["benchmarks/bench_loader.py", "--data", "a b"])
    assert cmd.endswith("python benchmarks/bench_loader.py --data 'a b'")


def test_summarize_rewrites_only_the_results_section(tmp_path: Path, common) -> None:
    summarize = _load("summarize")
    common.write_results("demo", {"v": 1}, TABLE, COMMAND, results_dir=tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text(f"# B\n\nintro\n\n{summarize.BEGIN}\nold\n{summarize.END}\n\nfooter\n")
    assert summarize.main(["--results-dir", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "intro" in text and text.endswith("footer\n")
    assert "### demo" in text and COMMAND in text and TABLE in text


def test_bench_loader_end_to_end(tmp_path: Path, data_root: Path) -> None:
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    argv = [str(BENCH / "bench_loader.py"), "--data", str(data_root), "--images", "64", "--epochs", "1",
            "--model-batches", "1", "--model-warmup", "0", "--results-dir", str(results), "--out-name", "smoke"]
    proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in results.iterdir()) == ["smoke.json", "smoke.md"]
    doc = json.loads((results / "smoke.json").read_text())
    assert "--images 64" in doc["command"] and "bench_loader.py" in doc["command"]
    assert doc["machine"]["torch_threads"] == 1
    res = doc["results"]
    assert res["images"] == 64
    assert set(res["pipelines"]) == {"plain_nw0", "plain_nw2", "cached_training_path", "cached_dataset_loader"}
    for name, r in res["pipelines"].items():
        assert r["images"] == 64, name
        # the notebooks replicate gray to RGB; pneumoscope feeds the default model's one channel
        channels = 3 if name.startswith("plain") else 1
        assert list(r["batch_shape"][1:]) == [channels, 224, 224], name
        assert r["images_per_s"] > 0, name
    assert res["pipelines"]["cached_training_path"]["channels_last"] is True
    assert res["model_compute"]["images_per_s"] > 0
    assert 0 < res["one_off"]["cache_build_added"] <= 64  # byte-identical files share a slot
    md = (results / "smoke.md").read_text()
    assert "Target: (b) ≥ 5× (a)" in md and "(c) efficientnet_lite0" in md


def test_summarize_points_figure_links_into_results(tmp_path: Path, common) -> None:
    summarize = _load("summarize")
    common.write_results("fig", {"v": 1}, "![plot](fig.png)\n\n![abs](https://x/y.png)", COMMAND,
                         results_dir=tmp_path / "results")
    body = summarize.render(summarize.load_results(tmp_path / "results"))
    assert "![plot](results/fig.png)" in body and "![abs](https://x/y.png)" in body
