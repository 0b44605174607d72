"""Several processes training one network: DDP under ``torchrun``, from the environment it sets.

``torchrun --nproc-per-node N`` starts N copies of a command with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT set; :func:`session` joins them into one process group (NCCL on GPUs, gloo on CPU; rank r on
``cuda:LOCAL_RANK``). Without torchrun nothing here touches ``torch.distributed``: one process, rank 0 of 1,
is the default, and every helper below is then a no-op.

Rank 0 alone prints, writes records, weights, reports and checkpoints (:func:`on_main`); the others wait for it
at a barrier, so a file it writes is there for every rank afterwards.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TypeVar

from .errors import ConfigError
from .utils import resolve_device

if TYPE_CHECKING:
    import torch
    from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Started by torchrun with more than one process (its WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """This process's rank among the group's; (0 of 1) outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main() -> bool:
    """Rank 0 (torchrun's RANK, also before the group is joined), or the one process: the one that prints."""
    return not launched() or int(os.environ.get("RANK", "0")) == 0


def init_from_env(device="auto") -> World:
    """Join the process group that torchrun's environment describes (nothing without torchrun).

    NCCL when ``device`` resolves to CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on CPU.
    """
    import torch
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return world()
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return world()


@contextlib.contextmanager
def session(device="auto"):
    """A block run in torchrun's process group (joined on entry, left on exit); one process: nothing."""
    import torch.distributed as dist

    joined = launched() and not dist.is_initialized()
    w = init_from_env(device)
    try:
        yield w
    finally:
        if joined:
            dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda`` is ``cuda:LOCAL_RANK`` in a process group (one GPU per rank)."""
    import torch

    w = world()
    if w.size > 1 and device.type == "cuda":
        return torch.device("cuda", w.local_rank)
    return device


def barrier() -> None:
    """Wait until every rank is here (nothing in one process)."""
    if world().size > 1:
        import torch.distributed as dist

        dist.barrier()


def on_main(fn: Callable[..., T], *args, **kwargs) -> T | None:
    """``fn(*args, **kwargs)`` on rank 0 only (a write); every rank goes on once it is done."""
    result = fn(*args, **kwargs) if world().main else None
    barrier()
    return result


def shard(batch: int) -> slice | None:
    """This rank's part of every global batch of ``batch`` samples (None in one process: all of it).

    Equal parts, so DDP's mean of the ranks' gradients is the gradient of the global batch's mean loss.
    """
    w = world()
    if w.size == 1:
        return None
    if batch % w.size:
        raise ConfigError(f"the batch of {batch} samples does not split into {w.size} equal parts, one per process; "
                          f"choose a batch size divisible by {w.size} (a set smaller than the batch is one batch)")
    part = batch // w.size
    return slice(w.rank * part, (w.rank + 1) * part)


def wrap(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """``model`` as DDP sees it in a process group (gradients averaged over ranks), else ``model`` itself.

    BatchNorm normalizes each rank's part with that part's statistics, and DDP gives every rank rank 0's running
    statistics before each forward; ``sync_bn`` (GPUs only: torch's SyncBatchNorm) uses the global batch's.
    """
    from torch import nn

    if world().size == 1:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise ConfigError("synchronized BatchNorm (--sync-bn) runs on GPUs only (torch's SyncBatchNorm)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the ranks (gloo has no AVG: a sum, divided)."""
    w = world()
    if w.size == 1:
        return value
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return value / w.size


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank, so every rank holds one network."""
    if world().size == 1:
        return
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, 0)
