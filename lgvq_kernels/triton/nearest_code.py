"""Triton kernels for the nearest-code search: one program per block of rows streams the
codebook past them in tiles and keeps a running (min, argmin) per row in registers, so the N x K
distance matrix never exists. When the rows are too few to fill the GPU (N = 64 rows are one or
two programs on 132 SMs), the codebook is split into SPLITS contiguous ranges of whole tiles,
one program per (row block, range), and a second kernel merges the partial (min, argmin) in
range order, ties to the lowest index, as the CUDA kernel does. Semantics are those of
lgvq_kernels.reference.nearest_code.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from lgvq_kernels.triton._common import (INTERPRET, check_can_serve, check_same_dtype,
                                         device_guard)

# LGVQ_TRITON_AUTOTUNE=0: one heuristic config per shape instead of benchmarking up to 8 per
# new (K, D, N bucket, dtype) on GPU (each costs a compile: tests, quick runs).
_AUTOTUNE = os.environ.get("LGVQ_TRITON_AUTOTUNE", "1") != "0"
# LGVQ_TRITON_AUTOTUNE_CONFIGS=n: try at most n configs per shape key (0: all; gpu_check uses 3).
_AUTOTUNE_CONFIGS = int(os.environ.get("LGVQ_TRITON_AUTOTUNE_CONFIGS", "0") or 0)

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _codebook_sqnorm_kernel(codebook_ptr, sqnorm_ptr, K, stride_ck, stride_cd,
                            D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """sqnorm[k] = sum_d codebook[k, d]^2, accumulated in float32."""
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    code_mask = codes < K
    cols = tl.arange(0, BLOCK_D)
    ptrs = (codebook_ptr + codes.to(tl.int64)[:, None] * stride_ck
            + cols.to(tl.int64)[None, :] * stride_cd)
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask = code_mask[:, None] & ((cols + d0) < D)[None, :]
        c = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(c * c, axis=1)
        ptrs += BLOCK_D * stride_cd
    tl.store(sqnorm_ptr + codes, total, mask=code_mask)


@triton.jit
def _distance(best, score_c0, x_sqnorm, IS_COSINE: tl.constexpr):
    """The distance of the chosen score (code 0's score when no score was finite)."""
    chosen = tl.where(best < float("inf"), best, score_c0)
    if IS_COSINE:
        return 1.0 + chosen
    distance = x_sqnorm + chosen
    return tl.where(distance < 0.0, 0.0, distance)  # clamp at 0; NaN stays NaN


@triton.jit(do_not_specialize=["N", "N_BUCKET", "SPLITS"])
def _nearest_code_kernel(x_ptr, codebook_ptr, sqnorm_ptr, indices_ptr, distances_ptr,
                         part_score_ptr, part_index_ptr, row_stats_ptr,
                         N, K, stride_xn, stride_xd, stride_ck, stride_cd, N_BUCKET, SPLITS,
                         D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_D: tl.constexpr, IS_COSINE: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
                         INTERPRETING: tl.constexpr):
    """One program per (BLOCK_N rows, codebook range); loops over the range's tiles of BLOCK_K
    codes (and over D in chunks of BLOCK_D unless D fits one chunk, when the x tile is loaded
    once and kept). Score of code k (argmin = nearest): l2 sqnorm[k] - 2 x.c_k, cosine -x.c_k.
    Range r of SPLITS holds whole tiles: [r T BLOCK_K, (r + 1) T BLOCK_K) with
    T = cdiv(cdiv(K, BLOCK_K), SPLITS), so every code sits in the tile it has unsplit.
    SPLIT: write the range's (min score, argmin) to part_score/part_index [SPLITS, N] and, from
    range 0, (|x|^2, score of code 0) to row_stats [2, N] for _merge_splits_kernel; else the
    final indices and distances.

    INTERPRETING (TRITON_INTERPRET=1): loads are upcast to fp32 (the interpreter computes bf16
    on raw bits), and x.c is a broadcast product summed over D instead of tl.dot, whose
    np.matmul rounds identical columns differently (duplicate codes would not tie exactly, as
    they do on a GPU, where every output column takes the same path)."""
    KEEP_X: tl.constexpr = BLOCK_D >= D
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    split = tl.program_id(1)
    range_codes = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLITS) * BLOCK_K
    k_start = split * range_codes
    k_end = tl.minimum(K, k_start + range_codes)
    cols = tl.arange(0, BLOCK_D)
    # int64 offsets: N*D or K*D may exceed 2^31 (later pointer increments are 64-bit too).
    x_ptrs = (x_ptr + rows.to(tl.int64)[:, None] * stride_xn
              + cols.to(tl.int64)[None, :] * stride_xd)
    c_ptrs = (codebook_ptr + (k_start + tl.arange(0, BLOCK_K)).to(tl.int64)[None, :] * stride_ck
              + cols.to(tl.int64)[:, None] * stride_cd)  # [BLOCK_D, BLOCK_K]: codebook^T tile
    c0_ptrs = codebook_ptr + cols.to(tl.int64) * stride_cd

    # Per row: |x|^2 and x.c_0 (the score of code 0 is the answer of a row with no finite score).
    if KEEP_X:
        x_kept = tl.load(x_ptrs, mask=row_mask[:, None] & (cols < D)[None, :], other=0.0)
        if INTERPRETING:  # the interpreter gets bf16 arithmetic wrong: compute in fp32 there
            x_kept = x_kept.to(tl.float32)
        xf = x_kept.to(tl.float32)
        c0 = tl.load(c0_ptrs, mask=cols < D, other=0.0).to(tl.float32)
        x_sqnorm = tl.sum(xf * xf, axis=1)
        x_dot_c0 = tl.sum(xf * c0[None, :], axis=1)
    else:
        x_kept = 0.0  # unused: x chunks are reloaded for every codebook tile
        x_sqnorm = tl.zeros([BLOCK_N], dtype=tl.float32)
        x_dot_c0 = tl.zeros([BLOCK_N], dtype=tl.float32)
        x_chunk_ptrs = x_ptrs
        for d0 in range(0, D, BLOCK_D):
            col_mask = (cols + d0) < D
            xf = tl.load(x_chunk_ptrs, mask=row_mask[:, None] & col_mask[None, :],
                         other=0.0).to(tl.float32)
            c0 = tl.load(c0_ptrs, mask=col_mask, other=0.0).to(tl.float32)
            x_sqnorm += tl.sum(xf * xf, axis=1)
            x_dot_c0 += tl.sum(xf * c0[None, :], axis=1)
            x_chunk_ptrs += BLOCK_D * stride_xd
            c0_ptrs += BLOCK_D * stride_cd

    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_index = tl.zeros([BLOCK_N], dtype=tl.int32)  # stays 0 for a row with no finite score
    for k0 in range(k_start, k_end, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_mask = codes < K
        if KEEP_X:
            c = tl.load(c_ptrs, mask=(cols < D)[:, None] & code_mask[None, :], other=0.0)
            if INTERPRETING:
                dots = tl.sum(x_kept[:, :, None] * c.to(tl.float32)[None, :, :], axis=1)
            else:
                dots = tl.dot(x_kept, c, input_precision=INPUT_PRECISION)
        else:
            dots = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            x_chunk_ptrs = x_ptrs
            c_chunk_ptrs = c_ptrs
            for d0 in range(0, D, BLOCK_D):
                col_mask = (cols + d0) < D
                x = tl.load(x_chunk_ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
                c = tl.load(c_chunk_ptrs, mask=col_mask[:, None] & code_mask[None, :],
                            other=0.0)
                if INTERPRETING:
                    x = x.to(tl.float32)
                    c = c.to(tl.float32)
                    dots += tl.sum(x[:, :, None] * c[None, :, :], axis=1)
                else:
                    dots = tl.dot(x, c, dots, input_precision=INPUT_PRECISION)
                x_chunk_ptrs += BLOCK_D * stride_xd
                c_chunk_ptrs += BLOCK_D * stride_cd
        if IS_COSINE:
            scores = -dots
        else:
            sqnorm = tl.load(sqnorm_ptr + codes, mask=code_mask, other=0.0).to(tl.float32)
            scores = sqnorm[None, :] - 2.0 * dots
        # Smallest finite score of the tile and the lowest index holding it, explicitly
        # (tl.argmin's tie rule is not documented); padding codes and NaN/Inf count as +inf.
        finite = (tl.abs(scores) < float("inf")) & code_mask[None, :]
        scores = tl.where(finite, scores, float("inf"))
        tile_best = tl.min(scores, axis=1)
        tile_index = tl.min(tl.where(scores == tile_best[:, None], codes[None, :], K), axis=1)
        # Strict <: on equal minima the earlier tile (lower index) keeps the row; +inf never wins.
        better = tile_best < best
        best_index = tl.where(better, tile_index, best_index)
        best = tl.where(better, tile_best, best)
        c_ptrs += BLOCK_K * stride_ck

    if IS_COSINE:
        score_c0 = -x_dot_c0
    else:
        score_c0 = tl.load(sqnorm_ptr).to(tl.float32) - 2.0 * x_dot_c0
    if SPLIT:
        part = split.to(tl.int64) * N + rows
        tl.store(part_score_ptr + part, best, mask=row_mask)
        tl.store(part_index_ptr + part, best_index, mask=row_mask)
        first = row_mask & ((rows * 0 + split) == 0)  # a [BLOCK_N] mask (interpreter)
        tl.store(row_stats_ptr + rows, x_sqnorm, mask=first)
        tl.store(row_stats_ptr + N + rows, score_c0, mask=first)
    else:
        tl.store(indices_ptr + rows, best_index.to(tl.int64), mask=row_mask)
        tl.store(distances_ptr + rows, _distance(best, score_c0, x_sqnorm, IS_COSINE),
                 mask=row_mask)


@triton.jit(do_not_specialize=["N", "SPLITS"])
def _merge_splits_kernel(part_score_ptr, part_index_ptr, row_stats_ptr, indices_ptr,
                         distances_ptr, N, SPLITS, BLOCK_N: tl.constexpr,
                         IS_COSINE: tl.constexpr):
    """Per row, the partial minima in range order with strict <: the lowest range holding the
    minimum keeps the row, and within a range its lowest index won already, so ties go to the
    lowest index overall; a row with no finite score keeps index 0 (every range's default)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_index = tl.zeros([BLOCK_N], dtype=tl.int32)
    for split in range(0, SPLITS):
        part = split * N.to(tl.int64) + rows
        score = tl.load(part_score_ptr + part, mask=row_mask, other=float("inf"))
        index = tl.load(part_index_ptr + part, mask=row_mask, other=0)
        better = score < best
        best_index = tl.where(better, index, best_index)
        best = tl.where(better, score, best)
    x_sqnorm = tl.load(row_stats_ptr + rows, mask=row_mask, other=0.0)
    score_c0 = tl.load(row_stats_ptr + N + rows, mask=row_mask, other=0.0)
    tl.store(indices_ptr + rows, best_index.to(tl.int64), mask=row_mask)
    tl.store(distances_ptr + rows, _distance(best, score_c0, x_sqnorm, IS_COSINE), mask=row_mask)


def _prune_gpu_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (more padding than work); keep at least one.
    With LGVQ_TRITON_AUTOTUNE_CONFIGS=n > 0, at most n: the heuristic config first, then the
    others in list order (each config tried costs a compile and a timing on the first call)."""
    n_cap = max(16, triton.next_power_of_2(named_args["N"]))
    k_cap = max(16, triton.next_power_of_2(named_args["K"]))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap]
    if not kept:
        kept = [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return cap_configs(kept, _heuristic_config(named_args["N"], named_args["K"]),
                       _AUTOTUNE_CONFIGS)


def cap_configs(configs: list, preferred: dict, limit: int) -> list:
    """At most ``limit`` configs (all when limit <= 0), the one matching ``preferred`` first."""
    def matches(config) -> bool:
        return (config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], config.num_warps,
                config.num_stages) == (preferred["BLOCK_N"], preferred["BLOCK_K"],
                                       preferred["num_warps"], preferred["num_stages"])

    ordered = [c for c in configs if matches(c)] + [c for c in configs if not matches(c)]
    return ordered[:limit] if limit > 0 else ordered


# GPU only: triton.autotune's default benchmarking needs a device (the interpreter uses
# _interpreter_blocks instead). Keyed on K, D, a power-of-2 bucket of N and the dtypes
# (the autotuner appends tensor dtypes to the key). Not yet timed on a GPU. Ahead-of-time
# compile (python -m lgvq_kernels.triton._aot, Triton 3.9; bytes spilled on sm_90 / sm_80):
# - every config fits the shared memory of both; the largest is 224.5 KiB (tf32, D = 100 kept
#   as a 128-wide x tile, 64 x 128 codes, 3 stages) of the 227 KiB of an H100/H200. 128 x 128
#   tiles are gone: at tf32 D = 100 they needed 256 KiB (sm_90) and 193 KiB (sm_80, 163 KiB).
# - the kernel is register-bound and most configs spill (255 registers): bf16 D = 64 is
#   spill-free at 32 x 64 / 4 warps and 128 x 64 / 8 warps (and 64 x 128 / 8 warps on sm_90);
#   bf16 D = 256 (chunked x) spills 192-1760 bytes whatever the tile (128 x 64 / 8 warps:
#   272 / 536); tf32 D = 100 spills 352-1952 on sm_90 except 32 x 64 / 4 warps (0 / 120);
#   tf32 D = 256 688-2744; fp32 ieee D = 64 24-1304. Correct, but slower than the tiles allow.
GPU_CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
               for bn, bk, w, s in [(32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4),
                                    (64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 4, 3),
                                    (128, 64, 8, 3)]]
_nearest_code_kernel_autotuned = None if INTERPRET else triton.autotune(
    configs=[triton.Config({"BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"]},
                           num_warps=c["num_warps"], num_stages=c["num_stages"])
             for c in GPU_CONFIGS],
    key=["K", "D", "N_BUCKET", "SPLITS", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_gpu_configs},
)(_nearest_code_kernel)

# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------

def _block_d(dim: int, fma_dot: bool) -> int:
    """D chunk: the whole padded D when it is small enough to keep the x tile in registers
    across the codebook loop, else a chunk size. tl.dot needs every block dim >= 16."""
    padded = max(16, triton.next_power_of_2(dim))
    if INTERPRET:
        return min(padded, 64)  # the interpreter's x.c is a BLOCK_N x BLOCK_D x BLOCK_K product
    # A 128-wide x tile is kept across the codebook loop for fp16/bf16/tf32, up to 32 for fp32
    # "ieee" (FMA, no tensor cores); wider D is chunked. Both spill at most tiles: see the
    # ahead-of-time numbers above GPU_CONFIGS.
    keep_max, chunk = (32, 32) if fma_dot else (128, 64)
    return padded if padded <= keep_max else chunk


# Codebook split: enough programs for about two per SM, each range at least _MIN_SPLIT_TILES
# tiles of 128 codes (a range re-reads the x tile and pays a share of the merge), at most
# _MAX_SPLITS ranges. The interpreter takes 2 "processors" and 1-tile ranges, so that tests on
# small shapes exercise the split and the merge. Not yet timed on a GPU.
_MIN_SPLIT_TILES = 1 if INTERPRET else 8
_MAX_SPLITS = 64
_SPLIT_TILE = 128


@functools.lru_cache(maxsize=None)
def _processors(device_index: int | None) -> int:
    if device_index is None:
        return 2
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(row_programs: int, num_codes: int, processors: int,
               tile: int = _SPLIT_TILE) -> int:
    """Codebook ranges per row block: 1 when the row blocks alone give two programs per
    processor, else as many as bring the grid there, within the bounds above."""
    target = 2 * processors
    if row_programs >= target:
        return 1
    ranges = triton.cdiv(target, row_programs)
    return max(1, min(ranges, triton.cdiv(num_codes, tile) // _MIN_SPLIT_TILES, _MAX_SPLITS))


def _heuristic_config(num_rows: int, num_codes: int) -> dict:
    """GPU tile when not autotuning: one of the autotuned configs, sized to the problem."""
    block_n = 128 if num_rows >= 4096 else 64 if num_rows >= 64 else 32
    block_k = 128 if num_codes >= 128 and block_n == 64 else 64
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if block_n * block_k >= 8192 else 4,
                num_stages=3)


def _interpreter_blocks(num_rows: int, num_codes: int) -> tuple[int, int]:
    # The interpreter costs ~0.5 ms per tl op per program and per loop trip, whatever the tile
    # size: big tiles, few programs, few trips (capped: x.c is a 3-D broadcast product there).
    block_n = min(128, max(16, triton.next_power_of_2(num_rows)))
    block_k = min(128, max(16, triton.next_power_of_2(num_codes)))
    return block_n, block_k


def nearest_code_forward(x: torch.Tensor, codebook: torch.Tensor,
                         codebook_sqnorm: torch.Tensor | None, metric: str,
                         precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D], codebook [K, D] (same dtype: float32/float16/bfloat16, unit inner stride not
    required), codebook_sqnorm [K] or None (computed; l2 only) → (indices int64 [N],
    distances float32 [N]). metric "l2" | "cosine"; precision "ieee" | "tf32" (fp32 inputs)."""
    check_same_dtype(x, codebook)
    check_can_serve(x=x, codebook=codebook)
    num_rows, dim = x.shape
    num_codes = codebook.shape[0]
    is_cosine = metric == "cosine"

    indices = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    distances = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return indices, distances

    # fp16/bf16 products are exact in the fp32 accumulator; precision only matters for fp32.
    input_precision = precision if x.dtype == torch.float32 else "ieee"
    block_d = _block_d(dim, fma_dot=x.dtype == torch.float32 and precision == "ieee")
    with device_guard(x):
        if is_cosine:
            sqnorm = distances  # placeholder pointer, never read
        elif codebook_sqnorm is not None:
            sqnorm = codebook_sqnorm.to(torch.float32).contiguous()
        else:
            sqnorm = torch.empty(num_codes, dtype=torch.float32, device=x.device)
            block_k = 256 if INTERPRET else 64
            _codebook_sqnorm_kernel[(triton.cdiv(num_codes, block_k),)](
                codebook, sqnorm, num_codes, codebook.stride(0), codebook.stride(1),
                D=dim, BLOCK_K=block_k, BLOCK_D=block_d)

        if INTERPRET:
            block_n, block_k = _interpreter_blocks(num_rows, num_codes)
            config = dict(BLOCK_N=block_n, BLOCK_K=block_k)
            splits = num_splits(triton.cdiv(num_rows, block_n), num_codes, _processors(None),
                                block_k)
        else:
            config = {} if _AUTOTUNE else _heuristic_config(num_rows, num_codes)
            # the split is sized for 64-row blocks whatever the autotuner picks
            splits = num_splits(triton.cdiv(num_rows, 64), num_codes,
                                _processors(x.device.index if x.is_cuda else None))
        if splits > 1:
            part_score = torch.empty(splits, num_rows, dtype=torch.float32, device=x.device)
            part_index = torch.empty(splits, num_rows, dtype=torch.int32, device=x.device)
            row_stats = torch.empty(2, num_rows, dtype=torch.float32, device=x.device)
        else:  # placeholders, never written
            part_score, part_index, row_stats = distances, indices, distances
        args = (x, codebook, sqnorm, indices, distances, part_score, part_index, row_stats,
                num_rows, num_codes, x.stride(0), x.stride(1), codebook.stride(0),
                codebook.stride(1), triton.next_power_of_2(num_rows), splits)
        meta = dict(D=dim, BLOCK_D=block_d, IS_COSINE=is_cosine,
                    INPUT_PRECISION=input_precision, SPLIT=splits > 1,
                    INTERPRETING=INTERPRET)

        def grid(meta):
            return (triton.cdiv(num_rows, meta["BLOCK_N"]), splits)

        kernel = _nearest_code_kernel_autotuned if _AUTOTUNE and not INTERPRET \
            else _nearest_code_kernel
        kernel[grid](*args, **config, **meta)
        if splits > 1:
            block_n = 128 if INTERPRET else 256
            _merge_splits_kernel[(triton.cdiv(num_rows, block_n),)](
                part_score, part_index, row_stats, indices, distances, num_rows, splits,
                BLOCK_N=block_n, IS_COSINE=is_cosine)
    return indices, distances
