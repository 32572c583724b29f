"""DDP on CPU: two gloo processes on 127.0.0.1 launched by torchrun, compared with one process.

With augmentation and dropout off, two ranks with batch 8 each see exactly the samples a single
process sees with batch 16 (the sampler interleaves one permutation), and DDP's gradient average
equals the single process's batch mean, so the weights must agree to float tolerance.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import torch
from safetensors.torch import load_file

from pneumoscope.train.checkpoint import resolve_checkpoint

COMMON = ["data.limit_per_class=40", "preprocess.size=48", "augment.rotate=0", "augment.translate=0",
          "augment.scale_min=1", "augment.scale_max=1", "augment.brightness=0", "augment.contrast=0",
          "model.kwargs={dense_dropout: 0.0}", "train.phases.0.epochs=2", "train.phases.0.lr=0.003"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache) -> dict:
    return {**os.environ, "PNEUMOSCOPE_CACHE": str(cache), "PYTHONPATH": os.pathsep.join(sys.path),
            "OMP_NUM_THREADS": "1"}


def _sets(items):
    return sum((["--set", s] for s in items), [])


def _torchrun(n: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1",
            f"--master-port={_free_port()}", "-m", "pneumoscope", *args]


def _weights(run):
    return load_file(str(resolve_checkpoint(run / "checkpoints", "last") / "model.safetensors"))


def test_two_gloo_ranks_equal_one_process_with_the_global_batch(tmp_path, data_root):
    cache = tmp_path / "cache"
    base = ["train", "--config", "smoke", "--data", str(data_root), "--no-progress"]
    single = subprocess.run([sys.executable, "-m", "pneumoscope", *base, "--out", str(tmp_path / "single"),
                             *_sets(COMMON + ["train.batch_size=16"])], env=_env(cache), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(_torchrun(2, [*base, "--out", str(tmp_path / "ddp"), *_sets(COMMON + ["train.batch_size=8"])]),
                         env=_env(cache), capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    env = json.loads((tmp_path / "ddp" / "env.json").read_text())
    assert env["world_size"] == 2
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    # Equal up to float reduction order, which Adam amplifies for near-zero gradients: measured on
    # two Xeons, max |Δw| 1e-5 on one and 1.7e-4 on another (L2 over all weights 1.1e-3); a single
    # process at the per-rank batch of 8 (what ranks that did not average gradients would resemble)
    # lands 3.6e-2 away (L2 4.7): 36x and 470x beyond these bounds.
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-3, rtol=0), k
    assert sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a) ** 0.5 < 1e-2
    # validation AUROC is computed on predictions gathered from both ranks: equal to the single-process value
    ha, hb = pd.read_csv(tmp_path / "single" / "metrics.csv"), pd.read_csv(tmp_path / "ddp" / "metrics.csv")
    assert list(hb["epoch"]) == [1, 2]
    pd.testing.assert_series_equal(ha["val_auroc"], hb["val_auroc"], atol=1e-6)
    # only rank 0 wrote: one log, one history
    assert len(list((tmp_path / "ddp").glob("train.log"))) == 1


def test_killed_distributed_run_resumes_with_one_process(tmp_path, data_root):
    cache = tmp_path / "cache"
    run = tmp_path / "ddp"
    over = COMMON[:-2] + ["train.phases.0.epochs=4", "train.batch_size=8"]
    proc = subprocess.Popen(_torchrun(2, ["train", "--config", "smoke", "--data", str(data_root), "--no-progress",
                                          "--out", str(run), *_sets(over)]),
                            env=_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pointer = run / "checkpoints" / "last.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not pointer.exists():
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    assert pointer.exists(), "the distributed run never wrote a checkpoint"
    done_before = len(pd.read_csv(run / "metrics.csv"))
    assert done_before < 4
    res = subprocess.run([sys.executable, "-m", "pneumoscope", "train", "--resume", str(run), "--data", str(data_root),
                          "--no-progress"], env=_env(cache), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    hist = pd.read_csv(run / "metrics.csv")
    assert list(hist["epoch"]) == [1, 2, 3, 4]
    assert json.loads((run / "env.json").read_text())["world_size"] == 1


def test_frozen_prefix_feature_cache_under_ddp(tmp_path, data_root):
    """The default recipe's path (frozen prefix computed once, tail trained) also runs under torchrun."""
    run = tmp_path / "fc"
    sets = ["data.limit_per_class=24", "preprocess.size=64", "train.batch_size=8", "train.phases.0.epochs=2",
            "train.phases.0.feature_views=2"]
    res = subprocess.run(_torchrun(2, ["train", "--config", "default", "--data", str(data_root), "--no-progress",
                                       "--out", str(run), *_sets(sets)]),
                         env=_env(tmp_path / "cache"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    hist = pd.read_csv(run / "metrics.csv")
    assert list(hist["epoch"]) == [1, 2] and hist["feature_cache"].all() and (hist["trainable_stages"] == 4).all()
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    assert (run / "summary.json").exists()
    assert "feature pass sharded over 2 ranks" in (run / "train.log").read_text()


def _disjoint_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from pneumoscope.train.distributed import DistInfo, all_reduce_disjoint

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)  # every rank draws the same "full" tensor
    full = torch.randn(7, 3, 5).half()
    full[2, 1, 1] = -0.0  # a non-zero bit pattern that compares equal to zero
    mine = torch.zeros_like(full)
    mine[rank::world] = full[rank::world]
    all_reduce_disjoint(mine, DistInfo(rank=rank, world_size=world))
    torch.save({"got": mine, "want": full}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_all_reduce_disjoint_fills_in_other_ranks_rows_bit_exactly(tmp_path):
    """What the sharded feature pass relies on: after the all-reduce every rank holds every rank's rows."""
    import torch.multiprocessing as mp

    mp.spawn(_disjoint_rank, args=(3, f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "res")), nprocs=3)
    for rank in range(3):
        res = torch.load(tmp_path / f"res.{rank}", weights_only=True)
        assert torch.equal(res["got"].view(torch.int16), res["want"].view(torch.int16)), rank
