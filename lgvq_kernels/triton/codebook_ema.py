"""Triton kernels for the codebook statistics and the EMA codebook update: the per-code counts
and sums of the assigned rows as a deterministic segment sum (rows sorted by code, no atomics),
then the EMA of both, Laplace smoothing, the new codebook and dead-code replacement, on the
device with no host sync. Semantics are those of lgvq_kernels.reference.codebook_statistics and
codebook_ema_update_.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lgvq_kernels.triton._common import (INTERPRET, check_can_serve, contiguous_rows,
                                         device_guard, round_to_bfloat16, segment_block_rows,
                                         sort_by_code)

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _codebook_statistics_kernel(x_ptr, mask_ptr, order_ptr, offsets_ptr, stats_ptr, stride_xn,
                                stride_xd, D: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr):
    """One program per (code k, block of BLOCK_D columns) over the rows order[offsets[k] :
    offsets[k + 1]] (ascending: a stable sort), in tiles of BLOCK_R added in row order:
    stats[k, :D] = sum of mask_i x_i, and (column block 0) stats[k, D] = sum of mask_i."""
    code = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    cols64 = cols.to(tl.int64)
    start = tl.load(offsets_ptr + code)
    end = tl.load(offsets_ptr + code + 1)
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    count = tl.zeros([BLOCK_R], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        positions = r0 + tl.arange(0, BLOCK_R)
        in_segment = positions < end
        rows = tl.load(order_ptr + positions, mask=in_segment, other=0).to(tl.int64)
        # fp32 right after loading (the interpreter computes bf16 arithmetic on raw bits)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols64[None, :] * stride_xd,
                    mask=in_segment[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        if HAS_MASK:
            # a product, like the reference: a masked-out non-finite row still gives NaN
            valid = tl.load(mask_ptr + rows, mask=in_segment, other=0).to(tl.float32)
            x = x * valid[:, None]
            count += valid
        else:
            count += in_segment.to(tl.float32)
        total += tl.sum(x, axis=0)
    row_start = code.to(tl.int64) * (D + 1)
    tl.store(stats_ptr + row_start + cols64, total, mask=col_mask)
    if tl.program_id(1) == 0:
        tl.store(stats_ptr + row_start + D, tl.sum(count, axis=0))


@triton.jit
def _cluster_size_kernel(stats_ptr, cluster_size_ptr, dead_ptr, total_ptr, K, stride_sk,
                         stride_sd, stride_size, decay, one_minus_decay, dead_threshold,
                         D: tl.constexpr, BLOCK_K: tl.constexpr, CHECK_DEAD: tl.constexpr):
    """A single program over all K codes in blocks of BLOCK_K:
        cluster_size = decay cluster_size + (1 - decay) stats[:, D]
        dead = cluster_size < dead_threshold (CHECK_DEAD), where cluster_size becomes 1
        total = sum(cluster_size)  (fixed order: lane-wise over the blocks, then across lanes)
    One program, so the total needs no atomics and no second pass."""
    lane_totals = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_mask = codes < K
        codes64 = codes.to(tl.int64)
        counts = tl.load(stats_ptr + codes64 * stride_sk + D * stride_sd, mask=code_mask,
                         other=0.0).to(tl.float32)
        size = tl.load(cluster_size_ptr + codes64 * stride_size, mask=code_mask, other=0.0)
        size = size * decay + counts * one_minus_decay
        if CHECK_DEAD:
            dead = size < dead_threshold
            size = tl.where(dead, 1.0, size)
        else:
            dead = codes < 0  # all False
        tl.store(cluster_size_ptr + codes64 * stride_size, size, mask=code_mask)
        tl.store(dead_ptr + codes, dead, mask=code_mask)
        lane_totals += tl.where(code_mask, size, 0.0)
    tl.store(total_ptr, tl.sum(lane_totals, axis=0))


@triton.jit
def _codebook_update_kernel(stats_ptr, cluster_size_ptr, dead_ptr, total_ptr, embed_sum_ptr,
                            codebook_ptr, replacement_ptr, K, stride_sk, stride_sd, stride_size,
                            stride_ek, stride_ed, stride_ck, stride_cd, stride_rk, stride_rd,
                            decay, one_minus_decay, eps, num_codes_eps, D: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                            CHECK_DEAD: tl.constexpr, ROUND_TO_BF16: tl.constexpr):
    """One program per (BLOCK_K codes, BLOCK_D columns), after _cluster_size_kernel:
        embed_sum = dead ? replacement : decay embed_sum + (1 - decay) stats[:, :D]
        smoothed  = (cluster_size + eps) / (total + K eps) * total
        codebook  = embed_sum / smoothed where smoothed > 0 (else unchanged)."""
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    code_mask = codes < K
    tile_mask = code_mask[:, None] & (cols < D)[None, :]
    codes64 = codes.to(tl.int64)
    cols64 = cols.to(tl.int64)
    size = tl.load(cluster_size_ptr + codes64 * stride_size, mask=code_mask, other=0.0)
    total = tl.load(total_ptr)
    denominator = total + num_codes_eps
    # total == 0 (nothing ever counted) or eps == 0 with an empty code: 0/0 is avoided, and
    # smoothed = 0 keeps the code, as the reference does.
    safe_denominator = tl.where(denominator > 0, denominator, 1.0)
    smoothed = tl.where(denominator > 0, (size + eps) / safe_denominator * total, 0.0)
    embed_ptrs = embed_sum_ptr + codes64[:, None] * stride_ek + cols64[None, :] * stride_ed
    sums = tl.load(stats_ptr + codes64[:, None] * stride_sk + cols64[None, :] * stride_sd,
                   mask=tile_mask, other=0.0).to(tl.float32)
    embed = tl.load(embed_ptrs, mask=tile_mask, other=0.0)
    embed = embed * decay + sums * one_minus_decay
    if CHECK_DEAD:
        dead = tl.load(dead_ptr + codes, mask=code_mask, other=0) != 0
        fresh = tl.load(replacement_ptr + codes64[:, None] * stride_rk
                        + cols64[None, :] * stride_rd, mask=tile_mask & dead[:, None],
                        other=0.0).to(tl.float32)
        embed = tl.where(dead[:, None], fresh, embed)
    tl.store(embed_ptrs, embed, mask=tile_mask)
    codebook_ptrs = codebook_ptr + codes64[:, None] * stride_ck + cols64[None, :] * stride_cd
    old = tl.load(codebook_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
    positive = smoothed > 0
    # clamped at the smallest normal, like the reference
    divisor = tl.where(positive, tl.maximum(smoothed, 1.1754943508222875e-38), 1.0)
    new = tl.where(positive[:, None], embed / divisor[:, None], old)
    if ROUND_TO_BF16:
        new = round_to_bfloat16(new)
    tl.store(codebook_ptrs, new, mask=tile_mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

def _block_d(dim: int) -> int:
    return min(triton.next_power_of_2(dim), 64 if INTERPRET else 128)


def _update_block_k(block_d: int) -> int:
    # The interpreter costs ~0.5 ms per tl op per program: few, large programs there.
    # On a GPU, tiles of about 4096 elements (not yet timed).
    return 64 if INTERPRET else max(1, 4096 // block_d)


def codebook_statistics_forward(x: torch.Tensor, indices: torch.Tensor, num_codes: int,
                                mask: torch.Tensor | None) -> torch.Tensor:
    """x [N, D] float32/float16/bfloat16 (any strides), indices [N] int64 in [0, num_codes),
    mask [N] bool or None → stats [num_codes, D + 1] float32: stats[:, :D] the sums of the
    (valid) rows of each code, stats[:, D] their counts. Deterministic segment sums."""
    check_can_serve(x=x)
    indices, mask = contiguous_rows(indices, mask)
    num_rows, dim = x.shape
    stats = torch.zeros(num_codes, dim + 1, dtype=torch.float32, device=x.device)
    if num_rows == 0 or num_codes == 0:
        return stats
    order, offsets = sort_by_code(indices, num_codes)
    block_d = _block_d(dim)
    with device_guard(x):
        _codebook_statistics_kernel[(num_codes, triton.cdiv(dim, block_d))](
            x, indices if mask is None else mask, order, offsets, stats, x.stride(0),
            x.stride(1), D=dim, BLOCK_R=segment_block_rows(num_rows, num_codes),
            BLOCK_D=block_d, HAS_MASK=mask is not None)
    return stats


def codebook_ema_update_forward_(stats: torch.Tensor, cluster_size: torch.Tensor,
                                 embed_sum: torch.Tensor, codebook: torch.Tensor, decay: float,
                                 eps: float, dead_threshold: float,
                                 replacement: torch.Tensor | None) -> torch.Tensor:
    """In place, on the device, no host sync. stats [K, D+1] (float32/float16/bfloat16),
    cluster_size [K] and embed_sum [K, D] float32 (EMA state, updated), codebook [K, D]
    float32/float16/bfloat16 (overwritten), replacement [K, D] (float32/float16/bfloat16) or
    None; any strides → dead-code mask [K] bool (all False without replacement or with
    dead_threshold <= 0)."""
    check_can_serve(codebook=codebook, stats=stats, cluster_size=cluster_size,
                    embed_sum=embed_sum, replacement=replacement)
    num_codes, dim = codebook.shape
    dead = torch.zeros(num_codes, dtype=torch.bool, device=codebook.device)
    if num_codes == 0:
        return dead
    decay, eps, dead_threshold = float(decay), float(eps), float(dead_threshold)
    check_dead = replacement is not None and dead_threshold > 0
    replacement = replacement if check_dead else embed_sum  # placeholder, never read
    total = torch.empty(1, dtype=torch.float32, device=codebook.device)
    block_d = _block_d(max(dim, 1))
    block_k = _update_block_k(block_d)
    with device_guard(codebook):
        _cluster_size_kernel[(1,)](
            stats, cluster_size, dead, total, num_codes, stats.stride(0), stats.stride(1),
            cluster_size.stride(0), decay, 1.0 - decay, dead_threshold, D=dim,
            BLOCK_K=min(1024, triton.next_power_of_2(num_codes)), CHECK_DEAD=check_dead)
        if dim > 0:
            _codebook_update_kernel[(triton.cdiv(num_codes, block_k), triton.cdiv(dim, block_d))](
                stats, cluster_size, dead, total, embed_sum, codebook, replacement, num_codes,
                stats.stride(0), stats.stride(1), cluster_size.stride(0), embed_sum.stride(0),
                embed_sum.stride(1), codebook.stride(0), codebook.stride(1),
                replacement.stride(0), replacement.stride(1), decay, 1.0 - decay, eps,
                num_codes * eps, D=dim, BLOCK_K=block_k, BLOCK_D=block_d,
                CHECK_DEAD=check_dead,
                ROUND_TO_BF16=INTERPRET and codebook.dtype == torch.bfloat16)
    return dead
