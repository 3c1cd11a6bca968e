"""Batch sampling and k-means for codebook initialisation and dead-code replacement, built on
the nearest-code and codebook-statistics ops (no N x K matrix is ever formed)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lgvq.quantizers import distributed
from lgvq_kernels.functional import codebook_statistics, nearest_code


def sample_rows(rows: Tensor, mask: Tensor | None, num: int, fallback: Tensor) -> Tensor:
    """``num`` rows drawn uniformly, with replacement, from the valid rows of ``rows``.

    rows ``[N, D]``, mask bool ``[N]`` or None, fallback ``[num, D]`` (returned when no row is
    valid). Returns ``[num, D]`` in rows' dtype. Runs on device without host synchronisation:
    with a mask, the r-th valid row is found by a binary search in the cumulative mask.
    """
    if rows.shape[0] == 0:
        return fallback.to(rows.dtype).clone()
    if mask is None:
        return rows[torch.randint(0, rows.shape[0], (num,), device=rows.device)]
    positions = mask.to(torch.int64).cumsum(0)
    valid_count = positions[-1]
    rank = (torch.rand(num, device=rows.device) * valid_count).long()
    rank = torch.minimum(rank, (valid_count - 1).clamp_min(0))
    picked = torch.searchsorted(positions, rank + 1).clamp_max(rows.shape[0] - 1)
    return torch.where(valid_count > 0, rows[picked], fallback.to(rows.dtype))


def sample_initial_centroids(rows: Tensor, num: int) -> Tensor:
    """``num`` rows of ``rows`` ``[n >= 1, D]``: distinct when n >= num, with repeats otherwise."""
    if rows.shape[0] >= num:
        picked = torch.randperm(rows.shape[0], device=rows.device)[:num]
    else:
        picked = torch.randint(0, rows.shape[0], (num,), device=rows.device)
    return rows[picked]


class KMeansResult(NamedTuple):
    centroids: Tensor  # [K, D] float32
    counts: Tensor  # [K] float32: rows assigned to each centroid in the last iteration


def kmeans(rows: Tensor, num_codes: int, iterations: int, *, metric: str = "l2",
           mask: Tensor | None = None, backend: str = "auto", sync: bool = False
           ) -> KMeansResult | None:
    """Lloyd's k-means on the valid rows of a batch.

    Args:
      rows: ``[N, D]`` floating (computed in float32).
      num_codes: K >= 1 centroids; initial centroids are valid rows drawn at random (distinct
        when there are at least K of them).
      iterations: Lloyd iterations (assign with ``nearest_code``, average with
        ``codebook_statistics``). A centroid with no member keeps its previous value.
      metric: ``"l2"`` or ``"cosine"`` (centroids re-normalised after each average).
      mask: optional bool ``[N]``; False rows are ignored (one host sync to select them).
      sync: under torch.distributed, draw the initial centroids on the lowest rank that has rows
        and broadcast them, and all-reduce the statistics of every iteration, so that all ranks
        get the same result (on the union of their batches).

    Returns ``KMeansResult(centroids [K, D] float32, counts [K] float32)``, or None when no row
    (on any rank) is valid.
    """
    valid_rows = (rows if mask is None else rows[mask]).detach().to(torch.float32)
    if sync:
        source = distributed.first_rank_with_rows(valid_rows.shape[0], rows.device)
        if source is None:
            return None
        if torch.distributed.get_rank() == source:
            centroids = sample_initial_centroids(valid_rows, num_codes).contiguous()
        else:
            centroids = valid_rows.new_empty(num_codes, rows.shape[1])
        distributed.broadcast_(centroids, source)
    else:
        if valid_rows.shape[0] == 0:
            return None
        centroids = sample_initial_centroids(valid_rows, num_codes)

    counts = torch.zeros(num_codes, dtype=torch.float32, device=rows.device)
    for _ in range(iterations):
        assigned = nearest_code(valid_rows, centroids, metric=metric, backend=backend).indices
        stats = codebook_statistics(valid_rows, assigned, num_codes, backend=backend)
        if sync:
            distributed.all_reduce_sum_(stats)
        counts = stats[:, -1]
        means = stats[:, :-1] / counts.clamp_min(1.0)[:, None]
        if metric == "cosine":
            means = F.normalize(means, dim=-1)
        centroids = torch.where((counts > 0)[:, None], means, centroids)
    return KMeansResult(centroids, counts)
