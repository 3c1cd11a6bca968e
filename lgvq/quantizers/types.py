"""Result types shared by the quantizers, and the batch codebook-usage measure."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LossBreakdown(NamedTuple):
    """Unweighted loss terms (float32 0-d tensors; ``[num_quantizers]`` for ResidualVQ).

    The first four fields are vector-quantize-pytorch's ``LossBreakdown``, in its order:
    commitment: mean over valid rows and dimensions of |x - sg(e)|^2 (gradient to the input).
    codebook_diversity, orthogonal_reg, inplace_optimize: regularisers lgvq does not offer
      (always zero).
    Then lgvq's own:
    codebook: the same value as commitment, |sg(x) - e|^2, with its gradient to the codebook
      (only part of the returned loss when the codebook is learnable).
    contrastive: the CVQ contrastive term (zero for the other quantizers).
    """

    commitment: Tensor
    codebook_diversity: Tensor
    orthogonal_reg: Tensor
    inplace_optimize: Tensor
    codebook: Tensor
    contrastive: Tensor

    @classmethod
    def of(cls, commitment: Tensor, codebook: Tensor,
           contrastive: Tensor | None = None) -> LossBreakdown:
        """The breakdown with the terms lgvq computes; the others are zeros."""
        zero = torch.zeros_like(commitment)
        return cls(commitment, zero, zero, zero, codebook,
                   zero if contrastive is None else contrastive)


class CodebookUsage(NamedTuple):
    """How the codes were used by the valid rows of one batch (float32 0-d tensors).

    perplexity: exp(entropy of the code histogram); 1 when one code takes every row, K when the
      rows are spread evenly over all K codes. With several codebooks (separate heads) it is
      the mean over codebooks.
    used_fraction: fraction of the codes chosen by at least one row (mean over codebooks).
    """

    perplexity: Tensor
    used_fraction: Tensor


def code_counts(indices: Tensor, num_codes: int) -> Tensor:
    """indices int64 ``[G, N]`` (G codebooks, -1 marks a row to ignore) -> float32 ``[G, K]``.

    A scatter-add, so no host synchronisation (``torch.bincount`` reads the maximum back).
    """
    valid = (indices >= 0).to(torch.float32)
    counts = torch.zeros(indices.shape[0], num_codes, dtype=torch.float32, device=indices.device)
    return counts.scatter_add_(1, indices.clamp_min(0), valid)


def codebook_usage_from_counts(counts: Tensor) -> CodebookUsage:
    """counts float32 ``[G, K]`` (rows per code for each of G codebooks) -> CodebookUsage."""
    totals = counts.sum(-1, keepdim=True)
    probabilities = counts / totals.clamp_min(1.0)
    entropy = -torch.special.xlogy(probabilities, probabilities).sum(-1)
    perplexity = entropy.exp().mean()
    used_fraction = (counts > 0).to(torch.float32).mean()
    return CodebookUsage(perplexity, used_fraction)


class QuantizedRows(NamedTuple):
    """What one pass of :meth:`VectorQuantizer.quantize_rows` produces (internal currency,
    also used by ResidualVQ)."""

    quantized: Tensor  # [M, heads * codebook_dim]: the codes, gradient to the input rows
    indices: Tensor  # [M, heads] int64; -1 where the row mask is False
    commitment: Tensor  # 0-d float32, mean over codebooks
    codebook_loss: Tensor  # 0-d float32, mean over codebooks
    searched_rows: list  # per codebook: the rows searched [M_c, codebook_dim] (detached)
    searched_masks: list  # per codebook: bool [M_c] or None
    searched_indices: list  # per codebook: int64 [M_c] nearest code of every row
