"""Triton kernels for LG-VQ's relationship-alignment loss: one program per sample does the whole
per-sample work (normalise, similarity tile, first argmax over positions, gather of the chosen
codes, both normalised Gram matrices) in registers; the forward writes one partial sum of
squares per sample (added by the launcher in a fixed order), the backward recomputes the same
state and writes the sample's code gradient, each position exactly once: the per-position sum
over words is a one-hot product (positions x words) @ (words x C), so no float atomics.
Semantics are those of lgvq_kernels.reference.relation_alignment_loss(_backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lgvq_kernels._backends import BackendUnavailableError, size_info
from lgvq_kernels.triton._common import (INTERPRET, check_can_serve, device_guard,
                                         round_to_bfloat16)

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, rows, row_mask, cols, col_mask, stride_r, stride_c):
    """[rows, cols] tile as fp32 (upcast right after loading: the interpreter computes bf16
    arithmetic on raw bits); masked elements are 0."""
    ptrs = ptr + rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c
    return tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _row_denominators(ptr, rows, row_mask, stride_r, stride_c, C: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """max(|row|, 1e-12) per row: the denominator of F.normalize(eps=1e-12)."""
    squares = tl.zeros([rows.shape[0]], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        x = _load_rows(ptr, rows, row_mask, cols, cols < C, stride_r, stride_c)
        squares += tl.sum(x * x, axis=1)
    return tl.maximum(tl.sqrt(squares), 1e-12)


@triton.jit
def _sample_state(words_ptr, visual_ptr, codes_ptr, mask_ptr, b, L, M,
                  stride_wb, stride_wl, stride_wc, stride_vb, stride_vm, stride_vc,
                  stride_cb, stride_cm, stride_cc, stride_mb, stride_ml,
                  C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_C: tl.constexpr, INTERPRETING: tl.constexpr):
    """The per-sample state both kernels need. Returns, per word (padding rows: zeros):
    chosen (int32: first position of the maximal W.V), best (the similarity s there),
    m (mask as fp32), code_norm |s c_chosen| and code_den = max(code_norm, eps), and the
    difference of Gram matrices D = c_hat c_hat^T - w_hat w_hat^T [BLOCK_L, BLOCK_L] with its
    code Gram P."""
    word_rows = tl.arange(0, BLOCK_L)
    word_valid = word_rows < L
    words_base = words_ptr + b.to(tl.int64) * stride_wb
    visual_base = visual_ptr + b.to(tl.int64) * stride_vb
    codes_base = codes_ptr + b.to(tl.int64) * stride_cb
    word_den = _row_denominators(words_base, word_rows, word_valid, stride_wl, stride_wc,
                                 C, BLOCK_C)

    # Running first maximum over position tiles, torch.max semantics: the largest value, the
    # lowest position holding it; a NaN wins (the first NaN), like torch.max.
    best = tl.full([BLOCK_L], float("-inf"), dtype=tl.float32)
    best_is_nan = word_rows < 0
    chosen = tl.zeros([BLOCK_L], dtype=tl.int32)
    for m0 in range(0, M, BLOCK_M):
        positions = m0 + tl.arange(0, BLOCK_M)
        position_valid = positions < M
        visual_den = _row_denominators(visual_base, positions, position_valid, stride_vm,
                                       stride_vc, C, BLOCK_C)
        scores = tl.zeros([BLOCK_L, BLOCK_M], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_valid = cols < C
            # normalise first, then the dot: the reference's order of rounding
            w = _load_rows(words_base, word_rows, word_valid, cols, col_valid, stride_wl,
                           stride_wc) / word_den[:, None]
            v = _load_rows(visual_base, positions, position_valid, cols, col_valid, stride_vm,
                           stride_vc) / visual_den[:, None]
            if INTERPRETING:
                # np.matmul may round identical columns differently (duplicate visual tokens
                # would not tie, as they do on a GPU): a broadcast product summed over C.
                scores += tl.sum(w[:, None, :] * v[None, :, :], axis=2)
            else:
                scores = tl.dot(w, tl.trans(v), scores, input_precision="ieee")
        is_nan = (scores != scores) & position_valid[None, :]
        first_nan = tl.min(tl.where(is_nan, positions[None, :], M), axis=1)
        tile_has_nan = first_nan < M
        scores = tl.where(position_valid[None, :] & ~is_nan, scores, float("-inf"))
        tile_best = tl.max(scores, axis=1)
        # explicit lowest index of the maximum (tl.argmax's tie rule is not documented)
        tile_index = tl.min(tl.where(scores == tile_best[:, None], positions[None, :], M),
                            axis=1)
        # strict >: an equal maximum in a later tile (higher position) never replaces
        take_nan = tile_has_nan & ~best_is_nan
        better = (tile_best > best) & ~best_is_nan
        chosen = tl.where(take_nan, first_nan, tl.where(better, tile_index, chosen))
        best = tl.where(take_nan, float("nan"), tl.where(better, tile_best, best))
        best_is_nan = best_is_nan | tile_has_nan
    chosen = tl.minimum(tl.maximum(chosen, 0), M - 1)  # never out of bounds, whatever happens
    best = tl.where(word_valid, best, 0.0)
    m = tl.load(mask_ptr + b.to(tl.int64) * stride_mb + word_rows.to(tl.int64) * stride_ml,
                mask=word_valid, other=0).to(tl.float32)

    # |u_i| with u_i = s_i c_{chosen_i}, then the Gram matrices from the normalised rows.
    code_squares = tl.zeros([BLOCK_L], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        u = best[:, None] * _load_rows(codes_base, chosen, word_valid, cols, cols < C,
                                       stride_cm, stride_cc)
        code_squares += tl.sum(u * u, axis=1)
    code_norm = tl.sqrt(code_squares)
    code_den = tl.maximum(code_norm, 1e-12)
    code_gram = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float32)
    word_gram = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_valid = cols < C
        u = best[:, None] * _load_rows(codes_base, chosen, word_valid, cols, col_valid,
                                       stride_cm, stride_cc)
        code_side = (u / code_den[:, None]) * m[:, None]
        word_side = (_load_rows(words_base, word_rows, word_valid, cols, col_valid, stride_wl,
                                stride_wc) / word_den[:, None]) * m[:, None]
        code_gram = tl.dot(code_side, tl.trans(code_side), code_gram, input_precision="ieee")
        word_gram = tl.dot(word_side, tl.trans(word_side), word_gram, input_precision="ieee")
    return chosen, best, m, code_norm, code_den, code_gram - word_gram, code_gram


@triton.jit
def _relation_forward_kernel(words_ptr, visual_ptr, codes_ptr, mask_ptr, chosen_ptr,
                             partials_ptr, L, M, stride_wb, stride_wl, stride_wc, stride_vb,
                             stride_vm, stride_vc, stride_cb, stride_cm, stride_cc, stride_mb,
                             stride_ml, C: tl.constexpr, BLOCK_L: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                             INTERPRETING: tl.constexpr):
    """One program per sample b: chosen[b, :] (int64) and partials[b] = sum_ij D_ij^2 (fp32)."""
    b = tl.program_id(0)
    chosen, best, m, code_norm, code_den, difference, code_gram = _sample_state(
        words_ptr, visual_ptr, codes_ptr, mask_ptr, b, L, M, stride_wb, stride_wl, stride_wc,
        stride_vb, stride_vm, stride_vc, stride_cb, stride_cm, stride_cc, stride_mb, stride_ml,
        C, BLOCK_L, BLOCK_M, BLOCK_C, INTERPRETING)
    word_rows = tl.arange(0, BLOCK_L)
    tl.store(chosen_ptr + b.to(tl.int64) * L + word_rows, chosen.to(tl.int64),
             mask=word_rows < L)
    # padding rows and columns of D are exact zeros (their rows were loaded as zeros)
    tl.store(partials_ptr + b, tl.sum(tl.sum(difference * difference, axis=1), axis=0))


@triton.jit
def _relation_backward_kernel(words_ptr, visual_ptr, codes_ptr, mask_ptr, coef_ptr,
                              grad_codes_ptr, L, M, stride_wb, stride_wl, stride_wc, stride_vb,
                              stride_vm, stride_vc, stride_cb, stride_cm, stride_cc, stride_mb,
                              stride_ml, C: tl.constexpr, BLOCK_L: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                              INTERPRETING: tl.constexpr, ROUND_TO_BF16: tl.constexpr):
    """One program per sample b writes grad_codes[b] ([M, C], contiguous), every element once.
    With coef = 4 grad_loss / (B L L), per word i (unit_i = u_i / den_i, u_i = s_i c_i):
        grad_unit_i = coef m_i (D c_hat)_i
        unit_i . grad_unit_i = coef sum_j D_ij P_ij          (P = c_hat c_hat^T, m binary)
        g_i = s_i (|u_i| > eps ? grad_unit_i - unit_i (unit_i . grad_unit_i) : grad_unit_i) / den_i
        grad_codes[b, p] = sum_{i: chosen_i = p} g_i     (one-hot [BLOCK_M, BLOCK_L] @ g)."""
    b = tl.program_id(0)
    chosen, best, m, code_norm, code_den, difference, code_gram = _sample_state(
        words_ptr, visual_ptr, codes_ptr, mask_ptr, b, L, M, stride_wb, stride_wl, stride_wc,
        stride_vb, stride_vm, stride_vc, stride_cb, stride_cm, stride_cc, stride_mb, stride_ml,
        C, BLOCK_L, BLOCK_M, BLOCK_C, INTERPRETING)
    coef = tl.load(coef_ptr)
    word_rows = tl.arange(0, BLOCK_L)
    word_valid = word_rows < L
    radial = coef * tl.sum(difference * code_gram, axis=1)  # unit_i . grad_unit_i
    keeps_projection = code_norm > 1e-12
    codes_base = codes_ptr + b.to(tl.int64) * stride_cb
    out_base = grad_codes_ptr + b.to(tl.int64) * M * C
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_valid = cols < C
        unit = (best[:, None] * _load_rows(codes_base, chosen, word_valid, cols, col_valid,
                                           stride_cm, stride_cc)) / code_den[:, None]
        code_side = unit * m[:, None]
        grad_unit = tl.dot(difference, code_side, input_precision="ieee") \
            * (coef * m)[:, None]
        projected = grad_unit - unit * radial[:, None]
        grad = tl.where(keeps_projection[:, None], projected, grad_unit) / code_den[:, None]
        grad = grad * best[:, None]
        for m0 in range(0, M, BLOCK_M):
            positions = m0 + tl.arange(0, BLOCK_M)
            position_valid = positions < M
            one_hot = ((positions[:, None] == chosen[None, :]) & word_valid[None, :]).to(
                tl.float32)
            total = tl.dot(one_hot, grad, input_precision="ieee")
            if ROUND_TO_BF16:
                total = round_to_bfloat16(total)
            tl.store(out_base + positions.to(tl.int64)[:, None] * C + cols[None, :], total,
                     mask=position_valid[:, None] & col_valid[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

def _check(words: torch.Tensor, visual: torch.Tensor, codes: torch.Tensor) -> None:
    check_can_serve(words=words, visual=visual, codes=codes)
    info = size_info("triton", "relation_alignment_loss", {"words": words.shape[1]})
    if not info.available:
        raise BackendUnavailableError(info.reason)


# Tiles per BLOCK_L (the padded words per sample) on a GPU: (BLOCK_M, BLOCK_C, num_warps).
# Measured with the ahead-of-time compile (python -m lgvq_kernels.triton._aot --only relation,
# C = 256, fp32; fp32 ieee dots are FMA dots, register-heavy) under Triton 3.9 (our venv) and
# 3.6 (the GPU image's): registers / spilled (stack) bytes of the forward, the backward, on
# sm_90 then sm_80, Triton 3.9 (3.6 where it differs):
#   16:  (32, 16, 4)   96/0, 98/0;     118/0, 96/0        shared 9 KiB (3.6: 120, 96; 122, 94)
#   32:  (32, 16, 8)   88/0, 128/0;    98/0, 118/0        shared 12 KiB (3.6: 96, 128; 98, 128)
#   64:  (16, 16, 8)   154/0, 255/8;   128/24, 255/0      shared 24 KiB (the least spilling of
#                      the tiles tried; 16 warps spill ~200 bytes in the backward)
#   128: (16, 16, 16)  128/392, 128/1088; 128/248, 128/904 shared 48 / 80 KiB: the three
#                      [128, 128] fp32 Gram tiles do not fit in registers whatever the tiles
#                      (8 warps spill 584 / 2640 bytes on sm_90); correct, slower.
# The L16 and L32 tiles are the only ones tried without a spill under both Triton versions on
# both architectures: (64, 16, 8) and (64, 32, 8), chosen under 3.9, spill 8-48 bytes under 3.6;
# (32, 32, 4) spills 8-32 bytes under 3.9 on sm_90.
# 256 is not shipped: its backward's dot reads the [256, 256] fp32 difference through 288 KiB
# of shared memory (227 KiB on H100/H200, 163 KiB on A100): OutOfResources. Longer captions
# go to the native kernel (backend="auto" knows the limit: _backends.TRITON_RELATION_MAX_WORDS).
# Not yet timed on a GPU.
_GPU_TILES = {16: (32, 16, 4), 32: (32, 16, 8), 64: (16, 16, 8), 128: (16, 16, 16)}
GPU_BLOCK_LS = tuple(_GPU_TILES)


def _gpu_meta(block_l: int) -> dict:
    """GPU tiles for BLOCK_L (a power of two in [16, TRITON_RELATION_MAX_WORDS])."""
    block_m, block_c, num_warps = _GPU_TILES[block_l]
    return dict(BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps)


def _meta(length: int, positions: int, width: int) -> dict:
    block_l = max(16, triton.next_power_of_2(length))  # tl.dot needs every block dim >= 16
    if INTERPRET:
        # ~0.5 ms per tl op per loop trip whatever the tile: few, large tiles (capped, the
        # similarity is a BLOCK_L x BLOCK_M x BLOCK_C broadcast product there).
        tiles = dict(BLOCK_M=min(128, max(16, triton.next_power_of_2(positions))),
                     BLOCK_C=min(128, max(16, triton.next_power_of_2(width))), num_warps=4)
    else:
        tiles = _gpu_meta(block_l)
    return dict(C=width, BLOCK_L=block_l, INTERPRETING=INTERPRET, **tiles)


def _strides(words, visual, codes, word_mask) -> tuple[int, ...]:
    return (*words.stride(), *visual.stride(), *codes.stride(), *word_mask.stride())


def relation_alignment_forward(words: torch.Tensor, visual: torch.Tensor, codes: torch.Tensor,
                               word_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """words [B, L, C], visual [B, M, C], codes [B, M, C] (float32/float16/bfloat16, dtypes may
    differ, any strides), word_mask [B, L] bool → (loss 0-d float32, chosen [B, L] int64)."""
    _check(words, visual, codes)
    batch, length, width = words.shape
    positions = visual.shape[1]
    device = codes.device
    chosen = torch.empty(batch, length, dtype=torch.int64, device=device)
    if batch * length == 0:
        return torch.zeros((), dtype=torch.float32, device=device), chosen
    partials = torch.empty(batch, dtype=torch.float32, device=device)
    with device_guard(codes):
        _relation_forward_kernel[(batch,)](
            words, visual, codes, word_mask, chosen, partials, length, positions,
            *_strides(words, visual, codes, word_mask), **_meta(length, positions, width))
    # A fixed-size reduction of the per-sample partials: the same bits every run.
    return partials.sum() / (batch * length * length), chosen


def relation_alignment_backward(grad_loss: torch.Tensor, words: torch.Tensor,
                                visual: torch.Tensor, codes: torch.Tensor,
                                word_mask: torch.Tensor) -> torch.Tensor:
    """grad_loss 0-d float tensor, the rest as in the forward → grad_codes [B, M, C] in
    codes.dtype (contiguous). Deterministic: every element is written once, no atomics."""
    _check(words, visual, codes)
    batch, length, width = words.shape
    positions = visual.shape[1]
    if batch * length == 0:
        return torch.zeros(codes.shape, dtype=codes.dtype, device=codes.device)
    grad_codes = torch.empty(codes.shape, dtype=codes.dtype, device=codes.device)
    coef = (grad_loss.to(device=codes.device, dtype=torch.float32)
            * (4.0 / (batch * length * length))).reshape(1)
    with device_guard(codes):
        _relation_backward_kernel[(batch,)](
            words, visual, codes, word_mask, coef, grad_codes, length, positions,
            *_strides(words, visual, codes, word_mask), **_meta(length, positions, width),
            ROUND_TO_BF16=INTERPRET and codes.dtype == torch.bfloat16)
    return grad_codes
