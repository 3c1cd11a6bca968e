"""torch.distributed helpers that keep every rank's codebook identical.

Every collective here is called by all ranks in the same order; the quantizers never skip one
on a rank whose local batch happens to be empty (that would hang the others).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def sync_active(sync_codebook: bool | None) -> bool:
    """Whether codebook state must be synchronised: ``None`` means "when torch.distributed is
    initialised with more than one process"; ``True`` with no process group is a no-op."""
    if sync_codebook is False:
        return False
    return world_size() > 1


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: Tensor, source: int = 0) -> Tensor:
    dist.broadcast(tensor, src=source)
    return tensor


def first_rank_with_rows(num_rows: int, device: torch.device) -> int | None:
    """The lowest rank whose local batch has rows, or None when no rank has any (host sync)."""
    size = world_size()
    candidate = torch.tensor([dist.get_rank() if num_rows > 0 else size], device=device)
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN)
    rank = int(candidate.item())
    return None if rank == size else rank
