"""DDP helpers in one place (torchvision ``references/classification/utils.py`` style).

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`init_distributed` reads them and
picks NCCL on GPUs and gloo on CPU. Everything else asks :class:`DistInfo` whether it is the main
process (rank 0 alone writes files) and uses :func:`all_gather_cat` to collect predictions, because
AUROC must be computed on all predictions, not averaged per rank.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(prefer_cuda: bool = True) -> DistInfo:
    """Initialise the process group when launched by torchrun; single-process otherwise."""
    cuda = prefer_cuda and torch.cuda.is_available()
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        return DistInfo(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    log.info("distributed: rank %d/%d (local %d) backend %s", rank, world, local, backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate a tensor of per-rank length along dim 0 from all ranks (rank order)."""
    if not info.enabled:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    pad = torch.zeros((m - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    buf = [torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=t.device) for _ in range(info.world_size)]
    dist.all_gather(buf, torch.cat([t, pad]))
    return torch.cat([b[: int(s.item())] for b, s in zip(buf, sizes)])


_CPU_GROUP = None


def _cpu_group():
    """A gloo group for CPU tensors when the default group is NCCL (None: the default group is gloo).

    Created on first use; every rank reaches that first use at the same collective call.
    """
    global _CPU_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


def all_reduce_disjoint(t: torch.Tensor, info: DistInfo) -> None:
    """Fill in, in place, a CPU tensor of which each rank computed other elements (the rest zero).

    Why bytes: every byte is non-zero on at most one rank, so an integer sum of the raw bytes is
    that rank's byte, whatever the dtype (fp16 feature caches included): the result is bit-exact,
    where a float sum would also be exact but needs a dtype the backend can add.
    """
    if not info.enabled:
        return
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("all_reduce_disjoint needs a contiguous CPU tensor")
    dist.all_reduce(t.view(torch.uint8), group=_cpu_group())


def all_reduce_mean(values: list[float], info: DistInfo) -> list[float]:
    """Mean of each value over ranks (e.g. the epoch's training loss)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (e.g. the early-stopping decision)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    global _CPU_GROUP
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None
