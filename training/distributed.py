"""Rank, world size and collectives that also work in one process (identity when torch.distributed
is not initialised), and initialisation from torchrun's environment variables.

    torchrun --nproc_per_node 2 -m training.train ...   # NCCL on CUDA, gloo on CPU
"""

from __future__ import annotations

import datetime
import gc
import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_type: str) -> bool:
    """Join the process group torchrun describes (no-op outside torchrun or when already done).

    Args:
        device_type: ``"cuda"`` picks NCCL, anything else gloo.

    Returns:
        True when a process group with more than one rank is active.
    """
    if is_initialized() or not launched_by_torchrun():
        return world_size() > 1
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return world_size() > 1


def backend() -> str:
    """The process group's backend ("nccl", "gloo"), or "none" outside one."""
    return str(dist.get_backend()) if is_initialized() else "none"


def shutdown() -> None:
    """Destroy the process group, through its Python object: that releases the GIL while gloo
    joins its worker threads, which may need the GIL to free a finished collective's tensors.
    Drop every DDP wrapper first: when a DDP reducer holds the group's last reference, it is
    destroyed with the GIL held, and the process can hang at exit (it did in CI)."""
    if is_initialized():
        gc.collect()  # reference cycles may still hold a DDP wrapper
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, in place and returned (``x`` itself in one process)."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks: what DDP does to gradients, so the EMA statistics match them."""
    return all_reduce_sum(x).div_(world_size()) if world_size() > 1 else x


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``x`` from rank ``src`` on every rank, in place and returned."""
    if is_initialized() and world_size() > 1:
        dist.broadcast(x, src=src)
    return x


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` in one process)."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()
