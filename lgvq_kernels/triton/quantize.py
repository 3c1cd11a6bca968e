"""Triton kernels for the fused straight-through quantizer: a forward that gathers the chosen
codes and reduces the squared error in one pass over row blocks, and a backward that visits the
rows code by code (a stable sort by code) so that the codebook gradient is a deterministic
segment sum, with no float atomics, while the same pass writes the gradient of every row.
Semantics are those of lgvq_kernels.reference.quantize_straight_through(_backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lgvq_kernels.triton._common import (INTERPRET, check_can_serve, check_same_dtype,
                                         contiguous_rows, device_guard, round_to_bfloat16,
                                         segment_block_rows, sort_by_code)

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N"])
def _quantize_forward_kernel(x_ptr, codebook_ptr, indices_ptr, mask_ptr, quantized_ptr,
                             partials_ptr, N, K, stride_xn, stride_xd, stride_ck, stride_cd,
                             D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             HAS_MASK: tl.constexpr):
    """One program per BLOCK_N rows: quantized[i] = codebook[indices[i]] (copied as loaded) and
    partials[program] = sum over its rows of mask[i] * |x_i - codebook[indices[i]]|^2 (fp32).
    A row whose index is outside [0, K) is treated as the CUDA kernel does: it reads nothing
    from the codebook, its quantized row is zeros and it adds nothing (not even a NaN)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    codes = tl.load(indices_ptr + rows, mask=row_mask, other=0)
    gather_mask = row_mask & (codes >= 0) & (codes < K)
    cols = tl.arange(0, BLOCK_D)
    # int64 offsets: N*D may exceed 2^31 (the pointer increments below are 64-bit too).
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    x_ptrs = x_ptr + rows64[:, None] * stride_xn + cols64[None, :] * stride_xd
    c_ptrs = codebook_ptr + codes.to(tl.int64)[:, None] * stride_ck + cols64[None, :] * stride_cd
    q_ptrs = quantized_ptr + rows64[:, None] * D + cols64[None, :]
    row_squared = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        col_mask = (cols + d0) < D
        tile_mask = row_mask[:, None] & col_mask[None, :]
        e = tl.load(c_ptrs, mask=gather_mask[:, None] & col_mask[None, :], other=0.0)
        tl.store(q_ptrs, e, mask=tile_mask)  # the raw code: no arithmetic on it
        # fp32 right after loading (the interpreter computes bf16 arithmetic on raw bits)
        x = tl.load(x_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        diff = x - e.to(tl.float32)
        row_squared += tl.sum(diff * diff, axis=1)
        x_ptrs += BLOCK_D * stride_xd
        c_ptrs += BLOCK_D * stride_cd
        q_ptrs += BLOCK_D
    row_squared = tl.where(gather_mask, row_squared, 0.0)
    if HAS_MASK:
        # a product, like the reference: a masked-out non-finite row still gives NaN
        valid = tl.load(mask_ptr + rows, mask=row_mask, other=0).to(tl.float32)
        row_squared = row_squared * valid
    tl.store(partials_ptr + pid, tl.sum(row_squared, axis=0))


@triton.jit
def _quantize_backward_kernel(grad_quantized_ptr, x_ptr, codebook_ptr, mask_ptr, order_ptr,
                              offsets_ptr, coef_x_ptr, coef_codebook_ptr, grad_x_ptr,
                              grad_codebook_ptr, stride_gn, stride_gd, stride_xn, stride_xd,
                              stride_ck, stride_cd, D: tl.constexpr, BLOCK_R: tl.constexpr,
                              BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
                              HAS_GRAD_QUANTIZED: tl.constexpr, ROUND_TO_BF16: tl.constexpr):
    """One program per (code k, block of BLOCK_D columns). Its rows are order[offsets[k] :
    offsets[k + 1]] (ascending row numbers: a stable sort), visited in tiles of BLOCK_R:
        diff         = mask_i (x_i - e_k)
        grad_x[i]    = grad_quantized[i] + coef_x * diff
        grad_codebook[k] = sum_i coef_codebook * diff      (tile sums added in row order)
    coef_x = grad_commitment * 2 / (valid D), coef_codebook = -grad_codebook_loss * 2 / (valid D)
    arrive as device scalars. Every row has exactly one code, so every grad_x row is written
    once; a code without rows writes zeros. ROUND_TO_BF16: bf16 outputs under the interpreter
    (see round_to_bfloat16)."""
    code = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    cols64 = cols.to(tl.int64)
    e = tl.load(codebook_ptr + code.to(tl.int64) * stride_ck + cols64 * stride_cd,
                mask=col_mask, other=0.0).to(tl.float32)
    coef_x = tl.load(coef_x_ptr)
    coef_codebook = tl.load(coef_codebook_ptr)
    start = tl.load(offsets_ptr + code)
    end = tl.load(offsets_ptr + code + 1)
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        positions = r0 + tl.arange(0, BLOCK_R)
        in_segment = positions < end
        rows = tl.load(order_ptr + positions, mask=in_segment, other=0).to(tl.int64)
        tile_mask = in_segment[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols64[None, :] * stride_xd,
                    mask=tile_mask, other=0.0).to(tl.float32)
        diff = x - e[None, :]
        if HAS_MASK:
            valid = tl.load(mask_ptr + rows, mask=in_segment, other=0).to(tl.float32)
            diff = diff * valid[:, None]
        grad_x = diff * coef_x
        if HAS_GRAD_QUANTIZED:
            grad_x += tl.load(grad_quantized_ptr + rows[:, None] * stride_gn
                              + cols64[None, :] * stride_gd, mask=tile_mask,
                              other=0.0).to(tl.float32)
        if ROUND_TO_BF16:
            grad_x = round_to_bfloat16(grad_x)
        tl.store(grad_x_ptr + rows[:, None] * D + cols64[None, :], grad_x, mask=tile_mask)
        total += tl.sum(tl.where(tile_mask, diff * coef_codebook, 0.0), axis=0)
    if ROUND_TO_BF16:
        total = round_to_bfloat16(total)
    tl.store(grad_codebook_ptr + code.to(tl.int64) * D + cols64, total, mask=col_mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _block_d(dim: int) -> int:
    # Row tiles are BLOCK_N (or BLOCK_R) x BLOCK_D; wider D is looped (forward) or split over
    # programs (backward). Not yet timed on a GPU.
    return min(triton.next_power_of_2(dim), 64 if INTERPRET else 128)


def _forward_block_n(num_rows: int) -> int:
    # The interpreter costs ~0.5 ms per tl op per program: few, large programs there.
    if INTERPRET:
        return min(128, max(16, triton.next_power_of_2(num_rows)))
    return 32


def _in_range(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    return (indices >= 0) & (indices < num_codes)


def _valid_elements(x: torch.Tensor, mask: torch.Tensor | None, indices: torch.Tensor,
                    num_codes: int) -> torch.Tensor:
    """max(1, valid rows * D) as a float32 device scalar (no host sync): rows selected by the
    mask whose index is in [0, K), as the CUDA kernels count them."""
    valid = _in_range(indices, num_codes)
    if mask is not None:
        valid = valid & mask
    return (valid.sum() * x.shape[1]).clamp_min(1).to(torch.float32)


def quantize_straight_through_forward(x: torch.Tensor, codebook: torch.Tensor,
                                      indices: torch.Tensor, mask: torch.Tensor | None
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D], codebook [K, D] (same dtype: float32/float16/bfloat16; any strides),
    indices [N] int64 in [0, K), mask [N] bool or None → (quantized [N, D] x.dtype,
    squared_error float32 scalar: masked mean of (x - codebook[indices])^2)."""
    check_same_dtype(x, codebook)
    check_can_serve(x=x, codebook=codebook)
    indices, mask = contiguous_rows(indices, mask)
    num_rows, dim = x.shape
    quantized = torch.empty(num_rows, dim, dtype=x.dtype, device=x.device)
    denominator = _valid_elements(x, mask, indices, codebook.shape[0])
    if num_rows == 0:
        return quantized, torch.zeros((), dtype=torch.float32, device=x.device) / denominator
    block_n = _forward_block_n(num_rows)
    num_programs = triton.cdiv(num_rows, block_n)
    partials = torch.empty(num_programs, dtype=torch.float32, device=x.device)
    with device_guard(x):
        _quantize_forward_kernel[(num_programs,)](
            x, codebook, indices, indices if mask is None else mask, quantized, partials,
            num_rows, codebook.shape[0], x.stride(0), x.stride(1), codebook.stride(0),
            codebook.stride(1), D=dim, BLOCK_N=block_n, BLOCK_D=_block_d(dim),
            HAS_MASK=mask is not None)
    # A fixed-size reduction of the per-program partials: the same bits every run.
    return quantized, partials.sum() / denominator


def quantize_straight_through_backward(grad_quantized: torch.Tensor | None,
                                       grad_commitment: torch.Tensor,
                                       grad_codebook_loss: torch.Tensor, x: torch.Tensor,
                                       codebook: torch.Tensor, indices: torch.Tensor,
                                       mask: torch.Tensor | None
                                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_quantized [N, D] (any float dtype and strides) or None, grad_commitment and
    grad_codebook_loss 0-d float tensors, x/codebook/indices/mask as in the forward →
    (grad_x [N, D] x.dtype, grad_codebook [K, D] codebook.dtype). The codebook gradient is a
    segment sum in a fixed order: the same bits every run."""
    check_same_dtype(x, codebook)
    check_can_serve(x=x, codebook=codebook)
    indices, mask = contiguous_rows(indices, mask)
    num_rows, dim = x.shape
    num_codes = codebook.shape[0]
    grad_x = torch.empty(num_rows, dim, dtype=x.dtype, device=x.device)
    if num_rows == 0 or num_codes == 0:
        return grad_x, torch.zeros(num_codes, dim, dtype=codebook.dtype, device=x.device)
    grad_codebook = torch.empty(num_codes, dim, dtype=codebook.dtype, device=x.device)
    scale = 2.0 / _valid_elements(x, mask, indices, num_codes)
    coef_x = (grad_commitment.to(torch.float32) * scale).reshape(1)
    coef_codebook = (-grad_codebook_loss.to(torch.float32) * scale).reshape(1)
    order, offsets = sort_by_code(indices, num_codes)
    block_d = _block_d(dim)
    has_grad_quantized = grad_quantized is not None
    grad_quantized = grad_quantized if has_grad_quantized else x  # placeholder, never read
    with device_guard(x):
        _quantize_backward_kernel[(num_codes, triton.cdiv(dim, block_d))](
            grad_quantized, x, codebook, indices if mask is None else mask, order, offsets,
            coef_x, coef_codebook, grad_x, grad_codebook, grad_quantized.stride(0),
            grad_quantized.stride(1), x.stride(0), x.stride(1), codebook.stride(0),
            codebook.stride(1), D=dim, BLOCK_R=segment_block_rows(num_rows, num_codes),
            BLOCK_D=block_d, HAS_MASK=mask is not None,
            HAS_GRAD_QUANTIZED=has_grad_quantized,
            ROUND_TO_BF16=INTERPRET and x.dtype == torch.bfloat16)
    # Rows with an index outside [0, K) lie in no segment: as on CUDA they get only the
    # straight-through gradient (zeros without one).
    straight = (grad_quantized.to(x.dtype) if has_grad_quantized
                else torch.zeros((), dtype=x.dtype, device=x.device))
    grad_x = torch.where(_in_range(indices, num_codes)[:, None], grad_x, straight)
    return grad_x, grad_codebook
