"""torch.distributed helpers: one process per device under ``torchrun`` (single- or multi-node).

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; with ``WORLD_SIZE > 1`` the trainer
joins the process group through ``env://`` (NCCL on GPUs, gloo on CPU). Every helper is a no-op
in a single process, so the training loop reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from latentdist.errors import UsageError


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``; ``created`` if we initialised the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device_type: str, timeout=None) -> DistInfo:
    """Join the process group when launched by torchrun with ``WORLD_SIZE > 1``; ``timeout``
    (a ``datetime.timedelta``) bounds each collective's wait, default torch's."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))
        gpus = torch.cuda.device_count()
        if per_node > gpus:  # every rank says so: no rank is left waiting for the others
            raise UsageError(
                f"torchrun started {per_node} processes on this node but {gpus} GPU(s) are "
                f"visible; DDP on CUDA (NCCL) needs one GPU per process: use "
                f"--nproc_per_node {gpus} or fewer, or --device cpu (gloo)"
            )
    created = False
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            init_method="env://",
            **({"timeout": timeout} if timeout is not None else {}),
        )
        created = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, created)


def teardown(info: DistInfo) -> None:
    if info.created and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum in place across processes."""
    if active():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average in place across processes."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def broadcast_(*tensors: torch.Tensor, src: int = 0) -> None:
    """Copy rank ``src``'s tensors to every process."""
    if active():
        for t in tensors:
            dist.broadcast(t, src=src)


def all_gather_object(obj: object) -> list:
    """Every process's ``obj`` (one entry per rank)."""
    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every process (e.g. an error message, so all ranks stop together)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
