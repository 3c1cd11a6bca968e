"""Pure-PyTorch implementations of every op: the test oracle (run in float64) and the
benchmark baseline. Same signatures and semantics as the backend entry points in _library.py;
inputs arrive already validated and laid out by lgvq_kernels.functional.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

METRICS = ("l2", "cosine")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, num_segments: int) -> Tensor:
        ctx.save_for_backward(indices)
        ctx.num_segments = num_segments
        out = values.new_zeros((num_segments, *values.shape[1:]))
        if values.shape[0] == 0 or num_segments == 0:
            return out
        sorted_indices, order = torch.sort(indices, stable=True)
        boundaries = torch.arange(num_segments + 1, dtype=indices.dtype, device=indices.device)
        offsets = torch.searchsorted(sorted_indices, boundaries)
        # one serial sum per segment and column on CPU and CUDA alike (no atomics)
        return torch.segment_reduce(values.index_select(0, order), "sum", offsets=offsets,
                                    axis=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (indices,) = ctx.saved_tensors
        valid = (indices >= 0) & (indices < ctx.num_segments)
        safe = torch.where(valid, indices, 0)
        shape = (-1,) + (1,) * (grad.dim() - 1)
        return grad.index_select(0, safe) * valid.reshape(shape).to(grad.dtype), None, None


def segment_sum(values: Tensor, indices: Tensor, num_segments: int) -> Tensor:
    """out[k] = the sum of values[i] over the rows i with indices[i] == k, shape
    [num_segments, *values.shape[1:]], values' dtype. Deterministic on every device: the rows are
    sorted by index (stable) and every segment is summed in ascending row order, with no float
    atomics (``index_add`` and ``scatter_add`` use them on CUDA). Indices outside
    [0, num_segments) add nothing. Differentiable, twice (its gradient is a gather)."""
    return _SegmentSum.apply(values, indices, num_segments)


# Scores per block of the search: one buffer of about this many scores (16 MiB in float32),
# reused by every block and, on CPU, by later calls (``_score_buffer``), so the N x K matrix
# never exists whole and the block stays in cache between the GEMM that writes it and the argmin
# that reads it. Blocks take whole codebooks while that leaves at least MIN_BLOCK_ROWS rows;
# past that (few rows, huge K) they split the codebook instead, so that the codebook is read
# once per MIN_BLOCK_ROWS rows. Measured on the 2-core EPYC against addmm + argmin
# (docs/benchmarks.md, "The reference backend"): a fresh 4-16 MiB score matrix per call costs
# its page faults (2048 x 4096 scores: addmm 19 ms into a new matrix, 5.9 ms into a reused one).
CHUNK_SCORES = 1 << 22
MIN_BLOCK_ROWS = 256


def _block_sizes(n: int, k: int) -> tuple[int, int]:
    rows = min(n, max(MIN_BLOCK_ROWS, CHUNK_SCORES // k))
    return rows, min(k, max(1, CHUNK_SCORES // rows))


# CPU only: ATen's argmin/argmax over a row run ~10x slower per score than amin/amax (no vector
# lanes in the index-tracking loop; 1024 x 1024 float32 scores, 2 threads: argmin 0.49-0.62 ms,
# amin 0.03-0.05 ms). So a row is split into groups of GROUP_WIDTH contiguous scores: amin per
# group (vectorised), argmin over the group minima (the first group holding the row's minimum),
# argmin inside that one group. The same index as argmin, NaN included (amin propagates NaN, so
# the first group holding a NaN is chosen and the first NaN inside it). 0.28 ms at 1024 x 1024.
GROUP_WIDTH = 64  # measured best for K <= 4096 (32: 0.37 ms, 128: 0.34 ms at 1024 x 1024)
GROUP_WIDTH_LARGE = 256  # K >= 8192 (256 x 16384 scores: 0.28 ms, 64: 0.40 ms, argmin 1.76)
MIN_GROUPED_SCORES = 1 << 16  # below this the extra ops cost more than they save


def first_best(scores: Tensor, lowest: bool) -> Tensor:
    """``scores.argmin(1)`` (lowest) or ``scores.argmax(1)``, [N] int64, the same indices: ties
    to the first, a NaN chosen over any number (the first NaN). Grouped on CPU (see
    GROUP_WIDTH); elsewhere the plain reduction."""
    arg = torch.argmin if lowest else torch.argmax
    n, k = scores.shape
    width = GROUP_WIDTH_LARGE if k >= 8192 else GROUP_WIDTH
    groups = k // width
    if scores.device.type != "cpu" or groups < 2 or n * k < MIN_GROUPED_SCORES:
        return arg(scores, dim=1)
    split = groups * width
    main = scores[:, :split].view(n, groups, width)
    group_best = (torch.amin if lowest else torch.amax)(main, dim=2)
    group = arg(group_best, dim=1, keepdim=True)
    inside = main.gather(1, group[:, :, None].expand(n, 1, width)).squeeze(1)
    index = group.squeeze_(1).mul_(width).add_(arg(inside, dim=1))
    if split == k:
        return index
    # the last k % width scores: taken when strictly better, or NaN where the rest is not
    tail = scores[:, split:]
    tail_index = arg(tail, dim=1, keepdim=True)
    tail_value = tail.gather(1, tail_index).squeeze_(1)
    value = scores.gather(1, index[:, None]).squeeze_(1)
    take = (tail_value < value) if lowest else (tail_value > value)
    take |= tail_value.isnan() & ~value.isnan()
    return torch.where(take, tail_index.squeeze_(1) + split, index)


def _squared_norms(rows: Tensor) -> Tensor:
    # the 2-norm squared: no [rows, D] temporary (rows * rows allocates one: 16 MiB at
    # 16384 x 256, 3.4x slower than this on one core)
    return torch.linalg.vector_norm(rows, dim=1).square_()


def nearest_code(x: Tensor, codebook: Tensor, codebook_sqnorm: Tensor | None, metric: str,
                 precision: str) -> tuple[Tensor, Tensor]:
    """x [N, D], codebook [K, D] (same dtype), codebook_sqnorm [K] or None.

    l2:     distance = ||x - c||^2 (expanded form, clamped at 0).
    cosine: x and the codebook of any norm; with v = c / max(|c|, 1e-12) the search ranks
            x.v, highest first (the same order as x.v / |x|) and distance =
            1 - x.v / max(|x|, 1e-12) (a zero row or code: similarity 0). No normalised copy of
            x is made, nor of the codebook beyond one code block (see ``_search``).
    Returns (indices int64 [N], distances [N] in the accumulation dtype). Ties go to the lowest
    index; a non-finite score is never chosen unless every score of the row is non-finite, in
    which case index 0 is returned with its (non-finite) distance.

    The search runs in blocks of ~CHUNK_SCORES scores (``_block_sizes``) in one reused buffer:
    one addmm (l2) or mm (cosine, ranked by argmax of x.c: the same choice as argmin of -x.c,
    ties to the first) and one arg-reduction per block, extra memory bounded by the block
    whatever N and K. Non-finite scores: where the codebook fits one block, a row whose chosen
    score is not finite (NaN propagates through the reduction, -inf wins it, a row of +inf) is
    searched again with the non-finite scores masked, after the whole search (one host read on
    CPU). Where the codebook is split, on CPU a block is searched again masked when its chosen
    scores are not all finite (one host read per block); on other devices (no host read) every
    block is masked before the merge. Code blocks merge in ascending order, ties kept by the
    earlier one.
    """
    dtype = compute_dtype(x.dtype)
    xf, cf = x.to(dtype), codebook.to(dtype)
    n, k = x.shape[0], codebook.shape[0]
    indices = torch.empty(n, dtype=torch.int64, device=x.device)
    best = torch.empty(n, dtype=dtype, device=x.device)
    if n == 0:
        return indices, best
    l2 = metric == "l2"
    offsets = inverse = None
    if l2:
        offsets = _squared_norms(cf) if codebook_sqnorm is None else codebook_sqnorm.to(dtype)
    else:
        inverse = torch.linalg.vector_norm(cf, dim=1).clamp_min_(1e-12).reciprocal_()
    rows, codes = _block_sizes(n, k)
    # CPU (host reads are free there): one codebook block, one check after the search; a split
    # codebook, one check per block. Elsewhere every block is masked (no host read).
    on_cpu = x.device.type == "cpu"
    defer = on_cpu and codes == k
    with _matmul_precision(precision, x.device):
        _search(xf, cf, offsets, inverse, rows, codes, "never" if defer else
                ("when_needed" if on_cpu else "always"), indices, best)
        # one sum screens every row (a NaN or an infinity makes it non-finite; a finite sum
        # that overflows only costs the exact look below): isfinite over N rows is a composite
        # of several ops on CPU
        if defer and not math.isfinite(float(best.sum())):
            redo = (~torch.isfinite(best)).nonzero().squeeze(1)
            if redo.numel():
                again_index, again_best = indices[redo], best[redo]
                _search(xf[redo], cf, offsets, inverse, rows, codes, "always", again_index,
                        again_best)
                indices[redo], best[redo] = again_index, again_best
    indices = lowest_chosen_duplicate(cf, indices)
    if l2:
        return indices, (_squared_norms(xf) + best).clamp_min_(0.0)
    return indices, best.div_(torch.linalg.vector_norm(xf, dim=1).clamp_min_(1e-12)).neg_().add_(1.0)


def _search(xf: Tensor, cf: Tensor, offsets: Tensor | None, inverse: Tensor | None, rows: int,
            codes: int, mask: str, indices: Tensor, best: Tensor) -> None:
    """The blocked search of ``nearest_code`` into indices and best (l2, ``offsets`` = |c|^2:
    the lowest |c|^2 - 2 x.c; cosine, ``inverse`` = 1 / max(|c|, eps): the highest x.v,
    v = c * inverse). mask: "always", non-finite scores never chosen (a row of them: index 0)
    in every block; "when_needed", a block is masked when its chosen scores are not all finite
    (a host read); "never", the reduction's own choice.

    Cosine folds the norms in whichever way costs less: with fewer rows than D each block's
    scores x.c are scaled by ``inverse`` (N x K multiplies); otherwise each code block is made
    unit (c * inverse, K x D multiplies per row block, once when the codebook is one block)
    into a buffer of one block's codes."""
    if mask not in ("always", "when_needed", "never"):
        raise ValueError(f"mask must be 'always', 'when_needed' or 'never', got {mask!r}")
    n, k = xf.shape[0], cf.shape[0]
    l2 = offsets is not None
    scale_scores = not l2 and n < xf.shape[1]
    unit = None
    if not l2 and not scale_scores:
        unit = torch.empty(min(k, codes), cf.shape[1], dtype=cf.dtype, device=cf.device)
        if codes >= k:  # one block: made once
            unit = torch.mul(cf, inverse[:, None], out=unit)
    buffer = _score_buffer(min(n, rows) * min(k, codes), xf)
    for start in range(0, n, rows):
        part = xf[start:start + rows]
        row_best, row_index = best[start:start + rows], indices[start:start + rows]
        for first in range(0, k, codes):
            block = cf[first:first + codes]
            scores = buffer[:part.shape[0] * block.shape[0]].view(part.shape[0], block.shape[0])
            if l2:
                torch.addmm(offsets[first:first + codes], part, block.t(), alpha=-2.0,
                            out=scores)
            elif scale_scores:
                torch.mm(part, block.t(), out=scores)
                scores.mul_(inverse[first:first + codes])
            else:
                if codes < k:
                    block = torch.mul(block, inverse[first:first + codes, None],
                                      out=unit[:block.shape[0]])
                else:
                    block = unit
                torch.mm(part, block.t(), out=scores)
            if mask == "always":
                index = _masked_best(scores, l2)
            else:
                index = first_best(scores, l2)
            # (argmin then a gather: min(dim=1) measured 1.76 ms for 1024 x 1024 scores against
            # ~0.5 ms for argmin, one thread)
            value = scores.gather(1, index[:, None]).squeeze(1)
            if mask == "when_needed" and not bool(torch.isfinite(value).all()):
                index = _masked_best(scores, l2)
                value = scores.gather(1, index[:, None]).squeeze(1)
            if first == 0:
                row_best.copy_(value)
                row_index.copy_(index)
                continue
            # a later block replaces a finite best only when strictly better; a non-finite
            # best (a row non-finite so far) by any finite value
            better = (value < row_best) if l2 else (value > row_best)
            better |= ~torch.isfinite(row_best) & torch.isfinite(value)
            row_best.copy_(torch.where(better, value, row_best))
            row_index.copy_(torch.where(better, index + first, row_index))


# CPU: the score buffer outlives the call, one per thread and dtype, grown to the
# largest block a call has needed (at most CHUNK_SCORES scores: 16 MiB in float32, 32 MiB in
# float64). A fresh 4-16 MiB buffer per call comes from mmap whenever the heap cannot hold it,
# and its first touch then page-faults: 1024 x 1024 x 64, interleaved with other providers
# (the benchmark, or a training step's own allocations), 2.6-2.9 ms a call against 1.6 ms with
# a warm buffer (2-core EPYC). Other devices have caching allocators.
_buffers = threading.local()


def _score_buffer(size: int, like: Tensor) -> Tensor:
    """``size`` scores of ``like``'s dtype to write into (nothing returned may alias them)."""
    if (like.device.type != "cpu" or type(like) is not torch.Tensor
            or torch._C._len_torch_dispatch_stack()):  # a mode or subclass: a plain buffer
        return torch.empty(size, dtype=like.dtype, device=like.device)
    held = _buffers.__dict__.setdefault("scores", {})  # this thread's, by dtype
    buffer = held.get(like.dtype)
    if buffer is None or buffer.numel() < size:
        # a normal tensor even under inference mode: an inference tensor could not be written
        # by a later call outside it
        with torch.inference_mode(False):
            buffer = held[like.dtype] = torch.empty(size, dtype=like.dtype)
    return buffer[:size]


def release_score_buffers() -> None:
    """Free this thread's kept score buffers (``nearest_code`` on CPU keeps one, at most 16 MiB
    in float32, so that the next call does not page-fault a fresh one)."""
    _buffers.scores = {}


def _masked_best(scores: Tensor, lowest: bool) -> Tensor:
    # NaN, -inf and +inf can never win: an infinity on the losing side stands in for them (a
    # row of them: the first code, as the contract says)
    worst = torch.inf if lowest else -torch.inf
    return first_best(torch.where(torch.isfinite(scores), scores, worst), lowest)


SUM_SCREEN_MAX_CODES = 4096  # past this, row sums collide too often (birthday) to screen
DIRECT_MATCH_MAX_PAIRS = 1 << 17  # chosen codes x K up to this: one broadcast comparison


def lowest_chosen_duplicate(codebook: Tensor, indices: Tensor) -> Tensor:
    """``lowest_duplicate(codebook)[indices]``, computed for the chosen codes only.

    Up to SUM_SCREEN_MAX_CODES codes, distinct row sums clear the codebook at once. Otherwise a
    code can equal a chosen one only if their first values are equal: every code's first
    value is screened by a hash of its bits (``_first_value_bucket``: a bucket no chosen first
    value occupies clears the code), the rest are looked up (``searchsorted``) among the chosen
    codes' sorted first values, and only the pairs that match, with the code before the chosen
    one, are compared whole (usually none). O(K) for the screen, no N x K or K x K work; with
    few chosen codes (C x K <= DIRECT_MATCH_MAX_PAIRS) one [K, C] comparison of first values
    finds the same pairs, cheaper than the screen. Measured on the 2-core Xeon (before the
    direct comparison and the hash screen):
    ~0.1 ms at 1 x 16384 x 256, where screening the whole codebook (row sums,
    |c|^2, unique keys, then torch.unique(dim=0) on colliding rows) took ~1.9 ms, 5x the search,
    and 35 ms of the 87 ms search at 64 x 262144 x 256. NaN first values never match (a NaN
    code is never chosen for a finite row anyway); -0.0 matches 0.0, as in lowest_duplicate."""
    if codebook.shape[0] <= SUM_SCREEN_MAX_CODES:
        # distinct row sums, distinct rows (equal rows have equal sums: ATen reduces every row
        # in the same order); 1024 x 64: ~35 us against ~0.3 ms for the lookup below
        ordered = codebook.sum(1).sort().values  # (-0.0 == 0.0: equal sums stay adjacent)
        if not bool((ordered[1:] == ordered[:-1]).any()):
            return indices
    if indices.numel() == 1:  # one row (a GEMV): no unique needed
        chosen, position = indices, torch.zeros_like(indices)
    else:
        chosen, position = torch.unique(indices, return_inverse=True)  # ascending
    if chosen.numel() * codebook.shape[0] <= DIRECT_MATCH_MAX_PAIRS:
        # few chosen codes: every (code, chosen) pair of equal first values straight from one
        # [K, C] comparison (1 x 16384 x 256, 2-core EPYC: the screen 0.16 ms against 0.24 ms
        # with the lookup below)
        first = codebook[:, 0]
        match = first[:, None] == first[chosen][None, :]
        pair_code, slot = match.nonzero(as_tuple=True)
        return _merge_duplicates(codebook, indices, chosen, position, pair_code, slot)
    first = codebook[:, 0].contiguous()
    chosen_first = first[chosen]
    # a hash screen first: a code can match only if its first value falls in a bucket that a
    # chosen first value occupies (~C / buckets of the codes, plus the collisions); only those
    # are looked up exactly (64 x 262144 x 256, 2-core Xeon: the screen 11 -> ~4 ms, against
    # two searchsorted calls over every code)
    buckets = min(MAX_FIRST_VALUE_BUCKETS,
                  max(1024, 1 << (64 * chosen.numel() - 1).bit_length()))
    occupied = torch.zeros(buckets, dtype=torch.bool, device=codebook.device)
    occupied[_first_value_bucket(chosen_first, buckets)] = True
    code = occupied[_first_value_bucket(first, buckets)].nonzero().squeeze(1)
    values, order = chosen_first.sort(stable=True)
    # NaN first values sort last and equal nothing; searchsorted must not see them (its binary
    # search steps right past a NaN, so a finite value could be placed beyond its equal run)
    comparable = int((~values.isnan()).sum())
    if comparable == 0:
        return indices
    values, order = values[:comparable], order[:comparable]
    candidate = first[code]
    low = torch.searchsorted(values, candidate, right=False)
    # equal first values only where the value at the insertion point equals the code's (NaN:
    # inserted past the end, never equal); the right-hand look-up only for those
    hit = values[low.clamp(max=values.numel() - 1)] == candidate
    code, low = code[hit], low[hit]
    count = torch.searchsorted(values, first[code], right=True) - low
    # every (code, chosen slot) pair with equal first values: the slots low .. low + count - 1
    pair_code = code.repeat_interleave(count)
    start = (count.cumsum(0) - count).repeat_interleave(count)
    slot = order[low.repeat_interleave(count)
                 + torch.arange(pair_code.numel(), device=codebook.device) - start]
    return _merge_duplicates(codebook, indices, chosen, position, pair_code, slot)


MAX_FIRST_VALUE_BUCKETS = 1 << 22  # 4 MiB of flags at most


def _first_value_bucket(values: Tensor, buckets: int) -> Tensor:
    """A bucket in [0, buckets) (a power of two) for each value: its bits folded (equal values
    share a bucket; -0.0 and 0.0 too, through + 0.0). Only a screen: collisions cost a look-up,
    never a wrong answer."""
    key = (values + 0.0).view(torch.int64 if values.element_size() == 8 else torch.int32)
    if values.element_size() == 8:  # the high word holds the exponent and the upper mantissa
        key = key ^ (key >> 32)
    return ((key ^ (key >> 9) ^ (key >> 18)) & (buckets - 1)).long()


def _merge_duplicates(codebook: Tensor, indices: Tensor, chosen: Tensor, position: Tensor,
                      pair_code: Tensor, slot: Tensor) -> Tensor:
    # pairs (pair_code, chosen[slot]) share their first values; a pair whose code comes first
    # and equals the chosen code whole moves that choice to it (the lowest such code)
    earlier = pair_code < chosen[slot]
    if not bool(earlier.any()):
        return indices
    pair_code, slot = pair_code[earlier], slot[earlier]
    same = (codebook[pair_code] == codebook[chosen[slot]]).all(1)
    lowest = chosen.scatter_reduce(0, slot[same], pair_code[same], reduce="amin")
    return lowest[position]


def lowest_duplicate(codebook: Tensor) -> Tensor:
    """[K] int64: for each code, the lowest index of a code with identical values.

    A blocked GEMM may round the same dot product differently in different output columns
    (edge micro-kernels), so exact duplicate codes need not score equal; mapping every choice to
    its lowest duplicate restores "ties go to the lowest index" for them.
    """
    num_codes = codebook.shape[0]
    _, group = torch.unique(codebook, dim=0, return_inverse=True)
    order = torch.arange(num_codes, device=codebook.device)
    first = torch.full((int(group.max()) + 1,), num_codes, device=codebook.device)
    first = first.scatter_reduce(0, group, order, reduce="amin")
    return first[group]


def nearest_code_oracle(x: Tensor, codebook: Tensor, metric: str = "l2") -> Tensor:
    """Float64 distance matrix [N, K] of x [N, D] to codebook [K, D] (tests: small shapes).

    In float64 the expanded form |x|^2 - 2 x.c + |c|^2 is accurate to ~1e-15 relative to
    |x|^2 + |c|^2, far below the float32 error bounds the kernels are held to.
    """
    xd, cd = x.double(), codebook.double()
    if metric == "cosine":
        xd = torch.nn.functional.normalize(xd, dim=-1)
        cd = torch.nn.functional.normalize(cd, dim=-1)
        return 1.0 - xd @ cd.t()
    return ((xd * xd).sum(1, keepdim=True) - 2.0 * xd @ cd.t() + (cd * cd).sum(1)).clamp_min(0.0)


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


# ----------------------------------------------------------------------------------------------
# quantize with straight-through
# ----------------------------------------------------------------------------------------------


def quantize_straight_through(x: Tensor, codebook: Tensor, indices: Tensor,
                              mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Forward of the fused straight-through quantizer.

    x [N, D], codebook [K, D] (same dtype), indices [N] int64 in [0, K), mask [N] bool or None.
    Returns (quantized [N, D] in x's dtype: codebook[indices], its value; the straight-through
    gradient rule lives in the backward), squared_error (scalar, float32 or float64):
    sum over valid rows and D of (x - codebook[indices])^2 divided by (valid rows * D) (0 when no
    row is valid). The commitment loss and the codebook loss both have this value; they differ
    only in which input receives their gradient (see quantize_straight_through_backward).
    """
    dtype = compute_dtype(x.dtype)
    quantized = codebook.index_select(0, indices).to(x.dtype)
    diff = x.to(dtype) - codebook.to(dtype).index_select(0, indices)
    squared = (diff * diff).sum(1)
    if mask is not None:
        squared = squared * mask.to(dtype)
        valid = mask.sum()
    else:
        valid = torch.tensor(x.shape[0], device=x.device)
    denominator = (valid * x.shape[1]).clamp_min(1).to(dtype)
    return quantized, squared.sum() / denominator


def quantize_straight_through_backward(grad_quantized: Tensor | None, grad_commitment: Tensor,
                                       grad_codebook_loss: Tensor, x: Tensor, codebook: Tensor,
                                       indices: Tensor, mask: Tensor | None
                                       ) -> tuple[Tensor, Tensor]:
    """Backward: (grad_x [N, D] x.dtype, grad_codebook [K, D] codebook.dtype).

    grad_x = grad_quantized (straight through) + grad_commitment * 2 (x - e) / (valid * D)
    grad_codebook[k] = sum over valid rows i with indices[i] == k of
                       grad_codebook_loss * 2 (e - x_i) / (valid * D)
    The segment sum runs in a fixed order (rows ascending within each code): same bits every
    run. grad_commitment / grad_codebook_loss are scalar tensors (0-d).
    """
    dtype = compute_dtype(x.dtype)
    num_codes, dim = codebook.shape
    diff = x.to(dtype) - codebook.to(dtype).index_select(0, indices)
    if mask is not None:
        diff = diff * mask.to(dtype)[:, None]
        valid = mask.sum()
    else:
        valid = torch.tensor(x.shape[0], device=x.device)
    scale = 2.0 / (valid * dim).clamp_min(1).to(dtype)
    grad_x = diff * (grad_commitment.to(dtype) * scale)
    if grad_quantized is not None:
        grad_x = grad_x + grad_quantized.to(dtype)
    per_row = diff * (-grad_codebook_loss.to(dtype) * scale)
    grad_codebook = segment_sum(per_row, indices, num_codes)
    return grad_x.to(x.dtype), grad_codebook.to(codebook.dtype)


# ----------------------------------------------------------------------------------------------
# codebook statistics and EMA update
# ----------------------------------------------------------------------------------------------


def codebook_statistics(x: Tensor, indices: Tensor, num_codes: int,
                        mask: Tensor | None) -> Tensor:
    """Per-code counts and sums of assigned vectors, packed for one all-reduce.

    x [N, D], indices [N] int64 in [0, num_codes), mask [N] bool or None.
    Returns stats [num_codes, D + 1] float32 (float64 for float64 x): stats[:, :D] = sum of the
    rows assigned to each code, stats[:, D] = their count. Deterministic: rows are summed in
    ascending order within each code.
    """
    dtype = compute_dtype(x.dtype)
    rows = torch.cat([x.to(dtype), torch.ones(x.shape[0], 1, dtype=dtype, device=x.device)], 1)
    if mask is not None:
        rows = rows * mask.to(dtype)[:, None]
    return segment_sum(rows, indices, num_codes)


def codebook_ema_update_(stats: Tensor, cluster_size: Tensor, embed_sum: Tensor,
                         codebook: Tensor, decay: float, eps: float,
                         dead_threshold: float, replacement: Tensor | None) -> Tensor:
    """In-place EMA update of the codebook from packed statistics (see codebook_statistics).

    stats [K, D+1]; cluster_size [K] and embed_sum [K, D] (EMA state, float32/float64, updated
    in place); codebook [K, D] (any float dtype, overwritten). With n = stats[:, D]:
        cluster_size = decay * cluster_size + (1 - decay) * n
        embed_sum    = decay * embed_sum    + (1 - decay) * stats[:, :D]
        smoothed     = (cluster_size + eps) / (total + K * eps) * total,  total = sum(cluster_size)
        codebook     = embed_sum / smoothed          (codes with smoothed == 0 keep their value)
    Dead codes (cluster_size < dead_threshold after the update, when dead_threshold > 0 and
    replacement is given): replacement [K, D] holds a candidate vector per code (drawn from the
    batch by the caller); a dead code k gets embed_sum[k] = replacement[k] and cluster_size[k] = 1
    (so codebook[k] = replacement[k] / smoothed[k], about replacement[k]), so that its stale EMA
    state cannot pull it back.
    Returns the dead-code mask [K] bool (all False when no replacement). No host sync.
    """
    dim = codebook.shape[1]
    state = cluster_size.dtype
    counts, sums = stats[:, dim].to(state), stats[:, :dim].to(state)
    cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
    embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
    num_codes = cluster_size.shape[0]
    dead = torch.zeros(num_codes, dtype=torch.bool, device=codebook.device)
    if replacement is not None and dead_threshold > 0:
        dead = cluster_size < dead_threshold
        fresh = replacement.to(state)
        embed_sum.copy_(torch.where(dead[:, None], fresh, embed_sum))
        cluster_size.copy_(torch.where(dead, torch.ones_like(cluster_size), cluster_size))
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + num_codes * eps) * total
    # total == 0 (no vector ever counted) leaves the codebook as it is instead of 0/0
    fresh_codebook = embed_sum / smoothed.clamp_min(torch.finfo(state).tiny)[:, None]
    codebook.copy_(torch.where((smoothed > 0)[:, None], fresh_codebook.to(codebook.dtype),
                               codebook))
    return dead


# ----------------------------------------------------------------------------------------------
# relationship alignment (LG-VQ)
# ----------------------------------------------------------------------------------------------


def _relation_parts(words: Tensor, visual: Tensor, codes: Tensor, word_mask: Tensor):
    dtype = compute_dtype(codes.dtype)
    w = torch.nn.functional.normalize(words.to(dtype), dim=-1)
    v = torch.nn.functional.normalize(visual.to(dtype), dim=-1)
    similarity, chosen = torch.bmm(w, v.transpose(1, 2)).max(dim=2)  # [B, L]: first maximum
    gathered = codes.to(dtype).gather(1, chosen[..., None].expand(-1, -1, codes.shape[2]))
    m = word_mask.to(dtype)[..., None]
    scaled = similarity[..., None] * gathered  # u_i = s_i c_i
    norm = scaled.norm(dim=-1, keepdim=True)
    unit = scaled / norm.clamp_min(1e-12)  # F.normalize(u, eps=1e-12)
    code_side, word_side = unit * m, w * m
    difference = (torch.bmm(code_side, code_side.transpose(1, 2))
                  - torch.bmm(word_side, word_side.transpose(1, 2)))
    return chosen, similarity, m, norm, unit, code_side, difference


def relation_alignment_loss(words: Tensor, visual: Tensor, codes: Tensor,
                            word_mask: Tensor) -> tuple[Tensor, Tensor]:
    """LG-VQ relation loss (docs/method.md, relationship alignment).

    words [B, L, C] text-token features T, visual [B, M, C] visual tokens Zvt[1:], codes
    [B, M, C] projected codes g(zq_st), word_mask [B, L] bool (real tokens).
    W = normalize(words), V = normalize(visual); for each word i: chosen_i = argmax_p (W V^T)_ip
    (first maximum), s_i its value; c_hat_i = m_i normalize(s_i codes[chosen_i]);
    w_hat_i = m_i W_i; loss = mean over B*L*L of (c_hat c_hat^T - w_hat w_hat^T)^2.
    Returns (loss 0-d float32 (float64 for float64 codes), chosen [B, L] int64).
    """
    chosen, _, _, _, _, _, difference = _relation_parts(words, visual, codes, word_mask)
    loss = (difference ** 2).mean() if difference.numel() else difference.sum()
    return loss, chosen


def relation_alignment_loss_loop(words: Tensor, visual: Tensor, codes: Tensor, word_mask: Tensor,
                                 dtype: torch.dtype = torch.float64) -> Tensor:
    """The same loss written as the paper's public code does it: for each image, for each word,
    an argmax over the positions, a gather and a normalisation, then the two Gram matrices.
    Computed in ``dtype`` with autograd: the float64 oracle of the tests and the per-word-loop
    baseline of the benchmarks (float32)."""
    w_all = torch.nn.functional.normalize(words.to(dtype), dim=-1)
    v_all = torch.nn.functional.normalize(visual.to(dtype), dim=-1)
    batch, length, _ = words.shape
    total = codes.new_zeros((), dtype=dtype)
    for b in range(batch):
        similarity = w_all[b] @ v_all[b].t()
        rows = []
        for i in range(length):
            value, position = similarity[i].max(0)
            rows.append(torch.nn.functional.normalize(value * codes[b, position].to(dtype), dim=-1))
        mask = word_mask[b].to(dtype)[:, None]
        code_side = torch.stack(rows) * mask
        word_side = w_all[b] * mask
        total = total + ((code_side @ code_side.t() - word_side @ word_side.t()) ** 2).sum()
    return total / (batch * length * length)


def relation_alignment_loss_backward(grad_loss: Tensor, words: Tensor, visual: Tensor,
                                     codes: Tensor, word_mask: Tensor) -> Tensor:
    """Gradient of the relation loss w.r.t. codes [B, M, C] (codes.dtype). The loss is constant
    in words (target under stop-gradient, hard argmax) and in visual (hard argmax, and only the
    sign of s_i survives the normalisation), so codes is the only input with a gradient.

    With D = P - Q:  dL/dc_hat = 4 D c_hat / (B L L);  through the mask, the normalisation
    n = u / max(|u|, eps) (dn = (I - n n^T) du / |u|) and u = s c; summed per position."""
    chosen, similarity, m, norm, unit, code_side, difference = _relation_parts(
        words, visual, codes, word_mask)
    count = max(difference.numel(), 1)
    grad_code_side = torch.bmm(difference, code_side) * (4.0 * grad_loss.to(unit.dtype) / count)
    grad_unit = grad_code_side * m
    safe_norm = norm.clamp_min(1e-12)
    projected = grad_unit - unit * (unit * grad_unit).sum(-1, keepdim=True)
    grad_scaled = torch.where(norm > 1e-12, projected, grad_unit) / safe_norm
    grad_gathered = grad_scaled * similarity[..., None]
    batch, positions, width = codes.shape
    # per sample and position: one segment per (b, p), summed over the words in order
    flat = (chosen + positions * torch.arange(batch, device=chosen.device)[:, None]).reshape(-1)
    grad_codes = segment_sum(grad_gathered.reshape(-1, width), flat, batch * positions)
    return grad_codes.reshape(codes.shape).to(codes.dtype)
