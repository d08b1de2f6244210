"""Data-parallel training under ``torchrun``: process-group set-up from the environment.

``torchrun --nproc_per_node N`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` for each process;
:func:`init_distributed` joins the group (NCCL on GPUs, gloo on CPU) and picks each process's device.
Without those variables everything runs in one process and nothing here opens a socket.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the number of processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, saves checkpoints and registers the model."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"${name}={value!r} is not an integer; torchrun sets it") from err


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group ``torchrun`` describes, or run alone.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available). Under ``torchrun`` on CUDA,
            each process takes GPU ``LOCAL_RANK``.

    Returns:
        The :class:`DistContext` of this process.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        torch.cuda.set_device(local)
        where = torch.device("cuda", local)
    else:
        where = torch.device(kind)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if where.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        log.info("rank %d of %d joined the %s process group on %s", rank, world, backend, where)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=where)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (after a barrier, so no rank exits while others still talk)."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(value: Any, ctx: DistContext) -> Any:
    """Rank 0's ``value`` on every rank (identity when alone)."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` when alone)."""
    if not ctx.distributed:
        return [value]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out
