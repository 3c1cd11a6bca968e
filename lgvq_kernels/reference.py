"""Pure-PyTorch implementations of every op: the test oracle (run in float64) and the
benchmark baseline. Same signatures and semantics as the backend entry points in _library.py;
inputs arrive already validated and laid out by lgvq_kernels.functional.
"""

from __future__ import annotations

import torch
from torch import Tensor

METRICS = ("l2", "cosine")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nearest_code(x: Tensor, codebook: Tensor, codebook_sqnorm: Tensor | None, metric: str,
                 precision: str) -> tuple[Tensor, Tensor]:
    """x [N, D], codebook [K, D] (same dtype), codebook_sqnorm [K] or None.

    l2:     distance = ||x - c||^2 (expanded form, clamped at 0).
    cosine: x and codebook arrive unit-normalised; distance = 1 - x.c.
    Returns (indices int64 [N], distances [N] in the accumulation dtype). Ties go to the lowest
    index; a non-finite score is never chosen unless every score of the row is non-finite, in
    which case index 0 is returned with its (non-finite) distance.
    """
    dtype = compute_dtype(x.dtype)
    xf, cf = x.to(dtype), codebook.to(dtype)
    if x.shape[0] == 0:
        return (torch.empty(0, dtype=torch.int64, device=x.device),
                torch.empty(0, dtype=dtype, device=x.device))
    with _matmul_precision(precision, x.device):
        if metric == "l2":
            cn = (cf * cf).sum(1) if codebook_sqnorm is None else codebook_sqnorm.to(dtype)
            scores = torch.addmm(cn, xf, cf.t(), alpha=-2.0)
        else:
            scores = torch.mm(xf, cf.t()).neg_()
    finite = torch.where(torch.isfinite(scores), scores, torch.inf)
    indices = finite.argmin(dim=1)
    best = scores.gather(1, indices[:, None]).squeeze(1)
    if metric == "l2":
        distances = ((xf * xf).sum(1) + best).clamp_min(0.0)
    else:
        distances = 1.0 + best
    return indices, distances


def nearest_code_oracle(x: Tensor, codebook: Tensor, metric: str = "l2") -> Tensor:
    """Exact float64 distance matrix [N, K] by direct differences (small shapes only: tests)."""
    xd, cd = x.double(), codebook.double()
    if metric == "cosine":
        xd = torch.nn.functional.normalize(xd, dim=-1)
        cd = torch.nn.functional.normalize(cd, dim=-1)
        return 1.0 - xd @ cd.t()
    return ((xd[:, None, :] - cd[None, :, :]) ** 2).sum(-1)


class _matmul_precision:
    """Context: TF32 matmuls on CUDA when precision == "tf32"; exact fp32 otherwise."""

    def __init__(self, precision: str, device: torch.device):
        self.enabled = device.type == "cuda"
        self.allow = precision == "tf32"

    def __enter__(self):
        if self.enabled:
            self.saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = self.allow

    def __exit__(self, *exc):
        if self.enabled:
            torch.backends.cuda.matmul.allow_tf32 = self.saved
