"""Where a training run executes: its device and, when launched by torchrun, its rank in a
data-parallel group (each rank trains on its rows of the global batch; gradients are averaged).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["Parallel", "init_parallel"]


@dataclass
class Parallel:
    """This process's place in the data-parallel group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size``."""
        if batch_size % self.world:
            raise ValueError(f"batch_size={batch_size} must be divisible by the number of "
                             f"processes ({self.world})")
        per_rank = batch_size // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def follows(self, done: int, checkpoint_every: int, steps: int) -> bool:
        """True on a rank other than the main one, after it has waited at the barrier of a
        checkpoint step (nobody moves on before the main rank has written it): the caller then
        skips logging and checkpointing."""
        if self.main:
            return False
        if done % checkpoint_every == 0 or done == steps:
            self.barrier()
        return True

    def average_gradients(self, parameters) -> None:
        """Average the gradients of ``parameters`` over ranks with one flat all-reduce (a
        parameter without a gradient on this rank contributes zeros, so every rank sends the
        same layout)."""
        if self.world == 1:
            return
        parameters = [p for p in parameters if p.requires_grad]
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        grads = [p.grad for p in parameters]
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= self.world
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)


def init_parallel(device: torch.device) -> tuple[Parallel, torch.device]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1): gloo on CPU, nccl
    on CUDA (one GPU per local rank). A single process needs no launcher."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Parallel(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Parallel(torch.distributed.get_rank(), torch.distributed.get_world_size()), device
