"""torch.library registration of lgvq's ops: custom ops, fake (meta) impls, autograd, autocast.

Each op here takes already-validated, laid-out tensors (see lgvq_kernels.functional) and a
resolved backend name, and forwards to that backend's implementation (looked up in
lgvq_kernels._backends). The compiled kernels live in their own namespace
(``torch.ops.lgvq_C``) so that Triton and CUDA can both serve CUDA tensors behind the one
``torch.ops.lgvq`` op.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lgvq_kernels import reference
from lgvq_kernels._backends import implementation

# --------------------------------------------------------------------------------------------
# nearest code
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("lgvq::nearest_code", mutates_args=())
def nearest_code(x: Tensor, codebook: Tensor, codebook_sqnorm: Optional[Tensor], metric: str,
                 precision: str, backend: str) -> tuple[Tensor, Tensor]:
    """x [N, D] contiguous, codebook [K, D] contiguous, same dtype → (indices [N] int64,
    distances [N] float32, or float64 for float64 inputs). Cosine: x rows and codes of any
    norm; distance = 1 - u.v with u = x / max(|x|, 1e-12) and v = c / max(|c|, 1e-12)."""
    indices, distances = implementation("nearest_code", backend)(x, codebook, codebook_sqnorm,
                                                                 metric, precision)
    return indices, distances


@nearest_code.register_fake
def _(x, codebook, codebook_sqnorm, metric, precision, backend):
    n = x.shape[0]
    return (x.new_empty(n, dtype=torch.int64),
            x.new_empty(n, dtype=reference.compute_dtype(x.dtype)))


def _nearest_code_setup_context(ctx, inputs, output):
    x, codebook, codebook_sqnorm, metric, _, _ = inputs
    indices, _ = output
    ctx.metric = metric
    ctx.has_sqnorm = codebook_sqnorm is not None
    ctx.save_for_backward(x, codebook, indices)
    ctx.mark_non_differentiable(indices)


def _unit_rows(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows / max(|rows|, 1e-12), |rows|, max(|rows|, 1e-12)), norms [N, 1]."""
    norm = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    scale = norm.clamp_min(1e-12)
    return rows / scale, norm, scale


def _nearest_code_backward(ctx, grad_indices, grad_distances):
    # Gradient of the distance at the chosen code (the choice itself is piecewise constant).
    # Plain torch ops, so it runs on every device and is itself differentiable.
    x, codebook, indices = ctx.saved_tensors
    dtype = reference.compute_dtype(x.dtype)
    g = grad_distances.to(dtype)[:, None]
    xf, chosen = x.to(dtype), codebook.to(dtype).index_select(0, indices)
    grad_sqnorm = None
    if ctx.metric == "cosine":  # d = 1 - u.v, u = x / max(|x|, eps), v = c / max(|c|, eps)
        unit, x_norm, x_scale = _unit_rows(xf)
        code, c_norm, c_scale = _unit_rows(chosen)
        # du/dx: (I - u u^T) / |x| above eps (as F.normalize's backward), I / eps below; the
        # same for v and c
        similarity = (unit * code).sum(1, keepdim=True)
        along_x = torch.where(x_norm > 1e-12, code - similarity * unit, code)
        along_c = torch.where(c_norm > 1e-12, unit - similarity * code, unit)
        grad_x, grad_chosen = -along_x * g / x_scale, -along_c * g / c_scale
    elif ctx.has_sqnorm:  # d = |x|^2 - 2 x.c + sqnorm[k]: sqnorm is an independent input
        grad_x, grad_chosen = 2.0 * (xf - chosen) * g, -2.0 * xf * g
        grad_sqnorm = reference.segment_sum(g[:, 0], indices, codebook.shape[0])
    else:  # d = |x - c|^2
        grad_x = 2.0 * (xf - chosen) * g
        grad_chosen = -grad_x
    # a deterministic segment sum (index_add would use float atomics on CUDA)
    grad_codebook = reference.segment_sum(grad_chosen, indices, codebook.shape[0])
    return grad_x.to(x.dtype), grad_codebook.to(codebook.dtype), grad_sqnorm, None, None, None


nearest_code.register_autograd(_nearest_code_backward, setup_context=_nearest_code_setup_context)

# Under autocast the search runs in float32: low-precision distances lose codes
# (vector-quantize-pytorch#114). Call it outside autocast with fp16/bf16 tensors to opt in.
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("lgvq::nearest_code", _device_type, torch.float32)


# --------------------------------------------------------------------------------------------
# quantize with straight-through
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("lgvq::quantize_straight_through", mutates_args=())
def quantize_straight_through(x: Tensor, codebook: Tensor, indices: Tensor,
                              mask: Optional[Tensor], backend: str
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """x [N, D], codebook [K, D], indices [N] int64, mask [N] bool or None → (quantized [N, D]
    x.dtype, commitment_loss 0-d, codebook_loss 0-d). Both losses hold the same value (mean
    squared error over valid rows); the commitment loss sends its gradient to x, the codebook
    loss to the codebook, and quantized passes its gradient straight through to x."""
    quantized, squared_error = implementation("quantize_straight_through", backend)(
        x, codebook, indices, mask)
    return quantized, squared_error, squared_error.clone()


@quantize_straight_through.register_fake
def _(x, codebook, indices, mask, backend):
    loss_dtype = reference.compute_dtype(x.dtype)
    return (torch.empty_like(x), x.new_empty((), dtype=loss_dtype),
            x.new_empty((), dtype=loss_dtype))


@torch.library.custom_op("lgvq::quantize_straight_through_backward", mutates_args=())
def quantize_straight_through_backward(grad_quantized: Optional[Tensor], grad_commitment: Tensor,
                                       grad_codebook_loss: Tensor, x: Tensor, codebook: Tensor,
                                       indices: Tensor, mask: Optional[Tensor], backend: str
                                       ) -> tuple[Tensor, Tensor]:
    return implementation("quantize_straight_through_backward", backend)(
        grad_quantized, grad_commitment, grad_codebook_loss, x, codebook, indices, mask)


@quantize_straight_through_backward.register_fake
def _(grad_quantized, grad_commitment, grad_codebook_loss, x, codebook, indices, mask, backend):
    return torch.empty_like(x), torch.empty_like(codebook)


def _quantize_setup_context(ctx, inputs, output):
    x, codebook, indices, mask, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(x, codebook, indices, mask)


def _quantize_backward(ctx, grad_quantized, grad_commitment, grad_codebook_loss):
    x, codebook, indices, mask = ctx.saved_tensors
    loss_dtype = reference.compute_dtype(x.dtype)
    zero = x.new_zeros((), dtype=loss_dtype)
    grad_x, grad_codebook = torch.ops.lgvq.quantize_straight_through_backward(
        None if grad_quantized is None else grad_quantized.contiguous(),
        zero if grad_commitment is None else grad_commitment.to(loss_dtype),
        zero if grad_codebook_loss is None else grad_codebook_loss.to(loss_dtype),
        x, codebook, indices, mask, ctx.backend)
    return grad_x, grad_codebook, None, None, None


quantize_straight_through.register_autograd(_quantize_backward,
                                            setup_context=_quantize_setup_context)

# --------------------------------------------------------------------------------------------
# codebook statistics and EMA update
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("lgvq::codebook_statistics", mutates_args=())
def codebook_statistics(x: Tensor, indices: Tensor, num_codes: int, mask: Optional[Tensor],
                        backend: str) -> Tensor:
    """x [N, D], indices [N] int64 → packed stats [num_codes, D + 1]: sums, then counts."""
    return implementation("codebook_statistics", backend)(x, indices, num_codes, mask)


@codebook_statistics.register_fake
def _(x, indices, num_codes, mask, backend):
    return x.new_empty((num_codes, x.shape[1] + 1), dtype=reference.compute_dtype(x.dtype))


@torch.library.custom_op("lgvq::codebook_ema_update_",
                         mutates_args=("cluster_size", "embed_sum", "codebook"))
def codebook_ema_update_(stats: Tensor, cluster_size: Tensor, embed_sum: Tensor, codebook: Tensor,
                         decay: float, eps: float, dead_threshold: float,
                         replacement: Optional[Tensor], backend: str) -> Tensor:
    """In-place EMA update (see reference.codebook_ema_update_); returns the dead mask [K]."""
    return implementation("codebook_ema_update_", backend)(
        stats, cluster_size, embed_sum, codebook, decay, eps, dead_threshold, replacement)


@codebook_ema_update_.register_fake
def _(stats, cluster_size, embed_sum, codebook, decay, eps, dead_threshold, replacement, backend):
    return cluster_size.new_empty(cluster_size.shape, dtype=torch.bool)


# Losses and EMA statistics accumulate in float32 whatever autocast asks for.
for _device_type in ("cpu", "cuda"):
    for _op in ("quantize_straight_through", "codebook_statistics"):
        torch.library.register_autocast(f"lgvq::{_op}", _device_type, torch.float32)


# --------------------------------------------------------------------------------------------
# relationship alignment (LG-VQ)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("lgvq::relation_alignment_loss", mutates_args=())
def relation_alignment_loss(words: Tensor, visual: Tensor, codes: Tensor, word_mask: Tensor,
                            backend: str) -> tuple[Tensor, Tensor]:
    """words [B, L, C], visual [B, M, C], codes [B, M, C], word_mask [B, L] bool →
    (loss 0-d, chosen [B, L] int64). See reference.relation_alignment_loss."""
    loss, chosen = implementation("relation_alignment_loss", backend)(words, visual, codes,
                                                                      word_mask)
    return loss, chosen


@relation_alignment_loss.register_fake
def _(words, visual, codes, word_mask, backend):
    return (codes.new_empty((), dtype=reference.compute_dtype(codes.dtype)),
            codes.new_empty(word_mask.shape, dtype=torch.int64))


@torch.library.custom_op("lgvq::relation_alignment_loss_backward", mutates_args=())
def relation_alignment_loss_backward(grad_loss: Tensor, words: Tensor, visual: Tensor,
                                     codes: Tensor, word_mask: Tensor, backend: str) -> Tensor:
    return implementation("relation_alignment_loss_backward", backend)(
        grad_loss, words, visual, codes, word_mask)


@relation_alignment_loss_backward.register_fake
def _(grad_loss, words, visual, codes, word_mask, backend):
    return torch.empty_like(codes)


def _relation_setup_context(ctx, inputs, output):
    words, visual, codes, word_mask, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(words, visual, codes, word_mask)
    ctx.mark_non_differentiable(output[1])


def _relation_backward(ctx, grad_loss, grad_chosen):
    words, visual, codes, word_mask = ctx.saved_tensors
    grad_codes = torch.ops.lgvq.relation_alignment_loss_backward(
        grad_loss, words, visual, codes, word_mask, ctx.backend)
    return None, None, grad_codes, None, None


relation_alignment_loss.register_autograd(_relation_backward,
                                          setup_context=_relation_setup_context)
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("lgvq::relation_alignment_loss", _device_type, torch.float32)
