"""Faults: SIGKILL at the worst moments, a full disk, a second process, an interrupted batch predict.

The kills use the fault-injection hook (:mod:`pneumoscope.utils.faults`, ``PNEUMOSCOPE_FAULT``)
to land exactly between "data written" and "pointer/index replaced", plus one kill at a random
moment from outside. Every interrupted run is continued with ``pneumoscope train --resume``, and
the final weights must be bit-identical to an uninterrupted run's.

The killed commands run in forked children of the test process (:class:`_Child`) armed exactly as
``PNEUMOSCOPE_FAULT`` arms a fresh process; ``tests/test_sweep.py`` uses the variable itself in a
fresh interpreter, and :func:`test_fault_hook_parses_its_variable_and_is_inert_when_unset` checks it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pneumoscope.config import load_config
from pneumoscope.train.checkpoint import resolve_checkpoint
from pneumoscope.train.fit import fit

#: ~120 real train images (60 per class) at 48 px, 3 epochs of the notebook CNN: seconds per run.
SETTINGS = ["preprocess.size=48", "train.batch_size=16", "train.phases.0.epochs=3", "train.phases.0.lr=0.003",
            "train.keep_checkpoints=1"]
_CLI = "import sys; from pneumoscope.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def train_root(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A Kermany tree of 120 real train images (symlinks) and 8 test images."""
    root = tmp_path_factory.mktemp("faults") / "chest_xray"
    for split, n in (("train", 60), ("test", 4)):
        for cls in ("NORMAL", "PNEUMONIA"):
            d = root / split / cls
            d.mkdir(parents=True)
            for src in sorted((data_root / split / cls).glob("*.jpeg"))[:n]:
                (d / src.name).symlink_to(src)
    return root


class _Child:
    """``fn()`` in a forked copy of this test process, with fault points armed: a real process
    that really dies of SIGKILL, without paying for a fresh interpreter's imports (torch, timm,
    sklearn: seconds on an idle machine, minutes on a busy 2-core one). ``Popen``-like API.
    Forking is safe here: the tests run torch with one thread, so no thread pool is copied."""

    def __init__(self, fn, *, env: dict[str, str], fault: str | None, err_path: Path) -> None:  # noqa: ANN001
        self.returncode: int | None = None
        self.err_path = err_path
        sys.stderr.flush()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 70
            try:
                from pneumoscope.utils import faults

                fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 2)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115
                os.environ.update(env)
                faults._ARMED.clear()
                faults._ARMED.update(faults._parse(fault or ""))
                faults._HITS.clear()
                code = int(fn() or 0)
            except BaseException:  # noqa: BLE001
                import traceback

                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        self.pid = pid

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def communicate(self, timeout: float) -> tuple[None, bytes]:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.send_signal(signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise TimeoutError(f"child {self.pid} still running after {timeout} s")
            time.sleep(0.02)
        return None, self.err_path.read_bytes() if self.err_path.exists() else b""


def _cli(args: list[str], *, cache: Path, fault: str | None = None) -> _Child:
    """``pneumoscope <args>`` in a forked child (see :class:`_Child`)."""
    from pneumoscope.cli import main

    err = Path(tempfile.mkstemp(prefix="child-", suffix=".err", dir=cache.parent)[1])
    return _Child(lambda: main(list(args)), env={"PNEUMOSCOPE_CACHE": str(cache)}, fault=fault, err_path=err)


def _train_args(run: Path, data: Path, resume: bool) -> list[str]:
    if resume:
        return ["train", "--resume", str(run), "--data", str(data), "--no-progress"]
    return ["train", "--config", "smoke", "--data", str(data), "--out", str(run), "--no-progress",
            *sum((["--set", s] for s in SETTINGS), [])]


def _state_is_consistent(run: Path, cache: Path) -> None:
    """What a reader sees after a kill: a verified checkpoint (or none), a loadable cache index."""
    for name in ("last", "best"):
        resolve_checkpoint(run / "checkpoints", name)  # raises on a half-written checkpoint
    for idx in cache.glob("*/index.json"):
        info = json.loads(idx.read_text())
        assert len(info["crc"]) == info["n"]


def _weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(resolve_checkpoint(run / "checkpoints", name) / "model.safetensors"))


def test_killed_again_and_again_resumes_to_the_uninterrupted_weights(tmp_path: Path, train_root: Path) -> None:
    ref = tmp_path / "ref"
    fit(load_config("smoke", SETTINGS), ref, data_root=train_root, cache_root=tmp_path / "ref-cache", progress=False)

    run, cache = tmp_path / "killed", tmp_path / "cache"  # a cold cache: the first kill lands in its build
    kills = ["cache_build:1",       # images appended to the cache, index not yet written
             "train_step:5",        # in the middle of epoch 1, before any checkpoint exists
             "checkpoint_write:2",  # epoch 1's 'last' written, its pointer not yet moved
             "atomic_write:12",     # a temp file fsynced, not yet renamed (epoch 2's checkpoint files)
             "random"]              # SIGKILL from outside at a random moment during epoch 2 or 3
    rng = random.Random(9)
    for i, fault in enumerate(kills):
        resume = (run / "config.yaml").exists()
        if fault == "random":
            pointer = run / "checkpoints" / "last.json"
            start_serial = json.loads(pointer.read_text())["serial"] if pointer.exists() else -1
            t0 = time.monotonic()
            proc = _cli(_train_args(run, train_root, resume), cache=cache)
            deadline = t0 + 300
            while proc.poll() is None and time.monotonic() < deadline:  # wait for one more epoch
                if pointer.exists() and json.loads(pointer.read_text())["serial"] > start_serial:
                    break
                time.sleep(0.01)
            # somewhere in the next epoch: up to half the time the last one took (start-up included)
            time.sleep(rng.uniform(0.0, 0.5 * (time.monotonic() - t0)))
            proc.send_signal(signal.SIGKILL)
        else:
            proc = _cli(_train_args(run, train_root, resume), cache=cache, fault=fault)
        _, err = proc.communicate(timeout=600)
        # the fault points must fire; the outside kill may (rarely) come after the run finished
        allowed = (-signal.SIGKILL, 0) if fault == "random" else (-signal.SIGKILL,)
        assert proc.returncode in allowed, (fault, proc.returncode, err.decode()[-2000:])
        _state_is_consistent(run, cache)

    proc = _cli(_train_args(run, train_root, True), cache=cache)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]

    for name in ("last", "best"):
        a, b = _weights(ref, name), _weights(run, name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k, (a[k].float() - b[k].float()).abs().max())
    ha, hb = pd.read_csv(ref / "metrics.csv"), pd.read_csv(run / "metrics.csv")
    assert list(hb["epoch"]) == [1, 2, 3]
    assert ha["val_auroc"].tolist() == hb["val_auroc"].tolist()
    assert ha["train_loss"].tolist() == hb["train_loss"].tolist()
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (ref, run))
    assert sa["threshold"] == sb["threshold"] and sa["temperature"] == sb["temperature"]
    # what a killed write leaves behind is a hidden temp file, never a name a reader opens
    visible = {p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")}
    assert visible == {"best.json", "last.json", _pointed(run, "best"), _pointed(run, "last")}


def _pointed(run: Path, name: str) -> str:
    return json.loads((run / "checkpoints" / f"{name}.json").read_text())["dir"]


# ------------------------------------------------------------------------------ image cache


def test_cache_killed_mid_build_is_completed_with_every_image_in_its_own_slot(tmp_path: Path, data_root: Path) -> None:
    from pneumoscope.data.cache import ImageCache
    from pneumoscope.data.imageio import decode_image
    from pneumoscope.data.preprocess import PreprocessSpec, preprocess

    files = [str(p) for c in ("NORMAL", "PNEUMONIA") for p in sorted((data_root / "train" / c).glob("*.jpeg"))[:6]]

    def build() -> int:
        ImageCache(tmp_path / "c", PreprocessSpec(size=32)).update(files[:8], [p.rsplit("/", 1)[-1] for p in files[:8]],
                                                                  progress=False)
        return 0

    child = _Child(build, env={}, fault="cache_build:1", err_path=tmp_path / "child.err")
    _, err = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
    (d,) = (tmp_path / "c").iterdir()
    assert (d / "images.u8").stat().st_size == 8 * 32 * 32 and not (d / "index.json").exists()  # data, no index

    # the next run asks for the images in another order: each must land in its own slot
    spec = PreprocessSpec(size=32)
    order = files[::-1]
    hashes = [p.rsplit("/", 1)[-1] for p in order]
    cache = ImageCache(tmp_path / "c", spec)
    report = cache.update(order, hashes, progress=False)
    assert report.added == len(files) and not report.failed
    got = cache.get(hashes)
    for img, path in zip(got, order):
        np.testing.assert_array_equal(img, preprocess(decode_image(path), spec))
    assert cache.verify() == [] and (d / "images.u8").stat().st_size == len(files) * 32 * 32


# ------------------------------------------------------------------------------ disk full
def _model_and_opt():  # noqa: ANN202
    from pneumoscope.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn3", num_classes=2, pretrained=False)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _assert_one_line_naming(err: BaseException, where: Path) -> None:
    text = str(err)
    assert "\n" not in text and str(where) in text and "No space left on device" in text, text


def test_disk_full_during_checkpoint_save_leaves_the_previous_one_loadable(tmp_path: Path, monkeypatch) -> None:
    """ENOSPC injected into the safetensors writer (what a full disk makes ``write`` raise)."""
    from pneumoscope.errors import StorageError
    from pneumoscope.train import checkpoint as ckpt

    model, opt = _model_and_opt()
    first = ckpt.save_checkpoint(tmp_path, "last", model=model, optimizer=opt, meta={"epoch": 1}, state={"e": 1})
    before = {k: v.clone() for k, v in ckpt.load_model_state(first).items()}
    real_save = ckpt.save_file

    def full_disk(tensors, filename, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        Path(filename).write_bytes(b"\0" * 100)  # some bytes made it, then the disk was full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(StorageError) as info:
        ckpt.save_checkpoint(tmp_path, "last", model=model, optimizer=opt, meta={"epoch": 2}, state={"e": 2})
    _assert_one_line_naming(info.value, tmp_path / "last-000001" / "model.safetensors")
    assert ckpt.resolve_checkpoint(tmp_path, "last") == first  # the pointer never moved
    after = ckpt.load_model_state(ckpt.resolve_checkpoint(tmp_path, "last"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.setattr(ckpt, "save_file", real_save)  # space freed: the next save works
    d = ckpt.save_checkpoint(tmp_path, "last", model=model, optimizer=opt, meta={"epoch": 2}, state={"e": 2})
    assert ckpt.resolve_checkpoint(tmp_path, "last") == d != first


def test_disk_full_during_training_is_one_line_exit_2_and_resumable(tmp_path: Path, train_root: Path, monkeypatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from pneumoscope.cli import main
    from pneumoscope.train import checkpoint as ckpt

    real_save, calls = ckpt.save_file, [0]

    def fills_up(tensors, filename, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls[0] += 1
        if calls[0] > 3:  # epoch 1's best (1 file) and last (2 files) fit, epoch 2's do not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, *a, **kw)

    monkeypatch.setattr(ckpt, "save_file", fills_up)
    monkeypatch.setenv("PNEUMOSCOPE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = ["train", "--config", "smoke", "--data", str(train_root), "--out", str(run), "--no-progress",
            *sum((["--set", s] for s in SETTINGS + ["data.limit_per_class=24"]), [])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pneumoscope: error: ") and "No space left on device" in err[0], err
    assert "checkpoints" in err[0] and "previous version" in err[0]
    last = ckpt.resolve_checkpoint(run / "checkpoints", "last")
    assert json.loads((last / "state.json").read_text())["fit"]["global_epoch"] == 1
    monkeypatch.setattr(ckpt, "save_file", real_save)
    assert main(["train", "--resume", str(run), "--data", str(train_root), "--no-progress"]) == 0
    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == [1, 2, 3]


@pytest.fixture()
def small_tmpfs(tmp_path: Path):  # noqa: ANN201
    """A real 4 MiB tmpfs (needs root and mount permission; skipped where the container forbids it)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True,
                           timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err}); the injected-ENOSPC tests cover this")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); the injected-ENOSPC tests cover this")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _fill(folder: Path) -> None:
    """Write until the file system says ENOSPC."""
    with open(folder / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_really_full_tmpfs_checkpoint_and_cache(small_tmpfs: Path, data_root: Path) -> None:
    from pneumoscope.data.cache import ImageCache
    from pneumoscope.data.preprocess import PreprocessSpec
    from pneumoscope.errors import StorageError
    from pneumoscope.train import checkpoint as ckpt

    model, opt = _model_and_opt()
    first = ckpt.save_checkpoint(small_tmpfs / "ck", "last", model=model, optimizer=opt, meta={}, state={})
    spec = PreprocessSpec(size=64)
    files = [str(p) for p in sorted((data_root / "train" / "NORMAL").glob("*.jpeg"))[:4]]
    cache = ImageCache(small_tmpfs / "cache", spec)
    cache.update(files[:2], ["a", "b"], progress=False)
    _fill(small_tmpfs)
    with pytest.raises(StorageError) as info:
        ckpt.save_checkpoint(small_tmpfs / "ck", "last", model=model, optimizer=opt, meta={}, state={})
    assert "\n" not in str(info.value) and "No space left" in str(info.value)
    assert ckpt.resolve_checkpoint(small_tmpfs / "ck", "last") == first
    ckpt.load_model_state(first)
    with pytest.raises(StorageError):
        ImageCache(small_tmpfs / "cache", spec).update(files, ["a", "b", "c", "d"], progress=False)
    reopened = ImageCache(small_tmpfs / "cache", spec)
    assert len(reopened) == 2 and reopened.verify() == []
    (small_tmpfs / "filler").unlink()
    assert ImageCache(small_tmpfs / "cache", spec).update(files, ["a", "b", "c", "d"], progress=False).added == 2


# ------------------------------------------------------------------------------ run-directory lock
_HOLD = """
import sys, time
from pneumoscope.utils.io import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_process_on_a_run_directory_refuses_before_writing(tmp_path: Path, train_root: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """Another process holds the run directory (as a running ``train`` does); ``train``,
    ``train --resume`` into it are refused with one line and exit code 2, and write nothing."""
    from pneumoscope.cli import main

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == b"locked"
        (run / "config.yaml").write_text("name: smoke\n")  # what the holder wrote: must stay untouched
        for args in (_train_args(run, train_root, False), _train_args(run, train_root, True)):
            assert main(args) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert lines == [f"pneumoscope: error: {run}: another pneumoscope process is using this run directory"]
        assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml"]
        assert (run / "config.yaml").read_text() == "name: smoke\n"
    finally:
        holder.kill()
        holder.wait()
    # the holder was SIGKILLed: the kernel dropped its lock, no stale lock file blocks the next run
    from pneumoscope.utils.io import RunLock

    with RunLock(run):
        pass


# ------------------------------------------------------------------------------ batch predict
def test_batch_predict_killed_twice_and_restarted_predicts_every_file_exactly_once(
        tmp_path: Path, data_root: Path, tiny_model: Path) -> None:
    """Killed after predicting a batch but before the CSV rewrite, then (resumed) inside a rewrite
    itself; the third start finishes. Every file ends up in the table once, with the same
    probabilities an uninterrupted run gives."""
    from pneumoscope.cli import main
    from pneumoscope.predict import predict_files

    folder = tmp_path / "in"
    folder.mkdir()
    for c in ("NORMAL", "PNEUMONIA"):
        for src in sorted((data_root / "test" / c).glob("*.jpeg"))[:9]:
            (folder / src.name).symlink_to(src)
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "pred.csv"
    args = ["predict", str(folder), "--model", str(tiny_model), "--out", str(out), "--batch-size", "4",
            "--no-progress"]
    kept: dict[str, float] = {}
    for fault in ("predict_batch:2", "atomic_write:3"):
        killed = _cli(args, cache=tmp_path / "cache", fault=fault)
        _, err = killed.communicate(timeout=300)
        assert killed.returncode == -signal.SIGKILL, (fault, err.decode()[-2000:])
        partial = pd.read_csv(out, keep_default_na=False) if out.exists() else pd.DataFrame(columns=["file", "error"])
        assert len(partial) < 19 and partial["file"].is_unique, fault  # never a half-written or doubled table
        for row in partial[partial["error"] == ""].to_dict("records"):
            assert kept.setdefault(row["file"], float(row["prob_PNEUMONIA"])) == float(row["prob_PNEUMONIA"])

    assert main(args) == 1  # 1: one file (broken.jpeg) failed
    table = pd.read_csv(out, keep_default_na=False)
    assert sorted(table["file"]) == sorted(str(p) for p in folder.iterdir())  # every file exactly once
    by_file = table.set_index("file")
    assert kept and all(float(by_file.loc[f, "prob_PNEUMONIA"]) == p for f, p in kept.items())
    assert "broken.jpeg" in by_file.index[by_file["error"] != ""][0]

    ref, _ = predict_files(str(tiny_model), [str(folder)], out=None, batch_size=4, progress=False)
    merged = by_file.join(ref.set_index("file"), rsuffix="_ref")
    ok = merged["error"] == ""
    assert ok.sum() == 18
    np.testing.assert_allclose(merged.loc[ok, "prob_PNEUMONIA"].astype(float),
                               merged.loc[ok, "prob_PNEUMONIA_ref"].astype(float), rtol=0, atol=1e-6)


def test_fault_hook_parses_its_variable_and_is_inert_when_unset() -> None:
    from pneumoscope.utils import faults

    assert faults._parse("checkpoint_write:2, train_step:7,cache_build") == {
        "checkpoint_write": 2, "train_step": 7, "cache_build": 1}
    assert faults._parse("") == {} and faults._parse("x:oops") == {}
    assert os.environ.get(faults.ENV) is None and faults._ARMED == {}
    for _ in range(1000):  # unarmed: never kills, never counts
        faults.fault_point("checkpoint_write")
    assert faults._HITS == {}
    code = "from pneumoscope.utils.faults import fault_point\nfor i in range(5): print(i, flush=True); fault_point('p')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, faults.ENV: "p:3", "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -signal.SIGKILL and proc.stdout.split() == ["0", "1", "2"]
