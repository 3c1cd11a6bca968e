"""Body of one rank of tests/modules/test_quantizer_distributed.py (spawned with
torch.multiprocessing; imported by name, so it lives in its own module).

Each rank trains quantizers on its share of the data with sync_codebook left on auto and saves
the resulting state to ``<out_dir>/rank<rank>.pt`` for the parent test to compare.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

import lgvq

DIM, CODES, STEPS, ROWS_PER_SAMPLE = 8, 16, 4, 12


def full_batches(steps: int = STEPS, samples: int = 6):
    """The whole (global) batch of every step and its mask, the same on every rank."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(samples, ROWS_PER_SAMPLE, DIM, generator=generator),
             torch.rand(samples, ROWS_PER_SAMPLE, generator=generator) > 0.2)
            for _ in range(steps)]


def ema_quantizer(backend: str, sync_codebook=None) -> lgvq.VectorQuantizer:
    torch.manual_seed(0)  # the same initial codebook everywhere
    return lgvq.VectorQuantizer(DIM, CODES, decay=0.8, backend=backend, heads=2, codebook_dim=4,
                                separate_codebook_per_head=True, sync_codebook=sync_codebook)


def train_ema(quantizer: lgvq.VectorQuantizer, batches, rank: int | None = None,
              world_size: int = 1) -> dict:
    for x, mask in batches:
        share = x.shape[0] // world_size
        part = slice(0, None) if rank is None else slice(rank * share, (rank + 1) * share)
        quantizer(x[part], mask=None if mask is None else mask[part])
    return {name: tensor.clone() for name, tensor in quantizer.state_dict().items()}


def run(rank: int, world_size: int, port: int, out_dir: str, backends: list) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=30))
    try:
        results = {}
        for backend in backends:
            # EMA: each rank holds half of every batch
            results[f"ema/{backend}"] = train_ema(ema_quantizer(backend), full_batches(),
                                                  rank, world_size)

            # k-means init and dead-code replacement: ranks draw different random numbers and
            # hold different amounts of data; the codebooks must still agree
            torch.manual_seed(100 + rank)
            quantizer = lgvq.VectorQuantizer(DIM, CODES, kmeans_init=True, kmeans_iters=5,
                                             threshold_ema_dead_code=3.0, decay=0.5,
                                             backend=backend)
            generator = torch.Generator().manual_seed(10 + rank)
            local = torch.randn(1, 20 + 15 * rank, DIM, generator=generator)
            quantizer(local)
            results[f"kmeans/{backend}"] = quantizer.codebooks.clone()
            for _ in range(STEPS):
                quantizer(torch.randn(1, 20 + 15 * rank, DIM, generator=generator) * 0.1)
            results[f"dead_codes/{backend}"] = quantizer.codebooks.clone()
            results[f"dead_codes_cluster_size/{backend}"] = quantizer.cluster_size.clone()

            # CVQ re-anchoring with different data per rank
            torch.manual_seed(0)
            cvq = lgvq.ClusteredVectorQuantizer(DIM, CODES, backend=backend)
            for _ in range(STEPS):
                cvq(torch.randn(2, 10, DIM, generator=generator))
            results[f"cvq/{backend}"] = cvq.codebook.detach().clone()

            # a rank with an empty batch still joins every collective
            empty_or_not = torch.randn(0 if rank == 1 else 3, 5, DIM, generator=generator)
            results[f"empty/{backend}"] = train_ema(ema_quantizer(backend),
                                                    [(empty_or_not, None)] * 2)["codebooks"]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
