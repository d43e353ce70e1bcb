"""Process groups for ``perdiag train`` under ``torchrun``: one rank, or many with DDP.

``torchrun --nproc_per_node N -m perdiag train ...`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in every process. :func:`session` reads them: with
``WORLD_SIZE`` > 1 it joins the process group (``gloo`` on the CPU, ``nccl`` on CUDA, where each
rank uses ``cuda:LOCAL_RANK``) and leaves it on exit; otherwise it returns a single-rank context
and touches nothing, so the same code path serves both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from perdiag.errors import PerdiagError
from perdiag.workflow import check_device


@dataclass
class DistContext:
    """Where this process stands: its rank among ``world_size`` and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        """True when there is more than one rank (DDP, all-reduces)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and prints."""
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` in place over the ranks (``sum`` or ``max``); a no-op on one rank."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as err:
        raise PerdiagError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from err


@contextlib.contextmanager
def session(device: str = "cpu", *, timeout_s: float = 1800.0) -> Iterator[DistContext]:
    """Yield the :class:`DistContext` of this process; join and leave the process group if needed.

    A process group that is already initialised (a caller's own) is used and left alone.
    """
    resolved = check_device(device)
    world_size = world_size_from_env()
    if world_size <= 1:
        yield DistContext(device=resolved)
        return
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise PerdiagError(
                f"rank {rank} needs cuda:{local_rank} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                "use at most that many processes per node"
            )
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        yield DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=resolved)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, context: DistContext) -> torch.nn.Module:
    """``model`` itself on one rank, else DistributedDataParallel around it (hooks go on ``model``)."""
    if not context.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
