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


# Scores per block of the search: a block [rows, codes] holds about this many (16 MiB in
# float32), so the N x K matrix never exists whole. Blocks take whole codebooks while that
# leaves at least MIN_BLOCK_ROWS rows; past that (few rows, huge K) they split the codebook
# instead of the rows, so that the codebook is read once (64 x 262144 x 256: 16-row blocks
# re-read its 256 MiB four times, 6x slower than addmm).
CHUNK_SCORES = 1 << 22
MIN_BLOCK_ROWS = 256


def _block_sizes(n: int, k: int) -> tuple[int, int]:
    rows = min(n, max(MIN_BLOCK_ROWS, CHUNK_SCORES // k))
    return rows, min(k, max(1, CHUNK_SCORES // rows))


def _squared_norms(rows: Tensor) -> Tensor:
    # the 2-norm squared: no [rows, D] temporary (rows * rows allocates one: 16 MiB at
    # 16384 x 256, 3.4x slower than this on one core)
    return torch.linalg.vector_norm(rows, dim=1).square_()


def nearest_code(x: Tensor, codebook: Tensor, codebook_sqnorm: Tensor | None, metric: str,
                 precision: str) -> tuple[Tensor, Tensor]:
    """x [N, D], codebook [K, D] (same dtype), codebook_sqnorm [K] or None.

    l2:     distance = ||x - c||^2 (expanded form, clamped at 0).
    cosine: the codebook arrives unit-normalised, x need not: the search ranks -x.c (the same
            order as -x.c / |x|) and distance = 1 - x.c / max(|x|, 1e-12) (a zero row: 1).
    Returns (indices int64 [N], distances [N] in the accumulation dtype). Ties go to the lowest
    index; a non-finite score is never chosen unless every score of the row is non-finite, in
    which case index 0 is returned with its (non-finite) distance.

    The search runs in blocks of ~CHUNK_SCORES scores (``_block_sizes``): one addmm (mm for
    cosine) and one ``argmin`` per block, extra memory bounded by the block whatever N and K. A
    block whose minimum is not finite (NaN, -inf or a row of +inf) is searched again with the
    non-finite scores masked. Blocks of codes are merged in ascending order, ties kept by the
    earlier block (the lower index).
    """
    dtype = compute_dtype(x.dtype)
    xf, cf = x.to(dtype), codebook.to(dtype)
    n, k = x.shape[0], codebook.shape[0]
    indices = torch.empty(n, dtype=torch.int64, device=x.device)
    best = torch.empty(n, dtype=dtype, device=x.device)
    if n == 0:
        return indices, best
    l2 = metric == "l2"
    if l2:
        offsets = _squared_norms(cf) if codebook_sqnorm is None else codebook_sqnorm.to(dtype)
    # a host read per block on CPU (free there); on other devices every block takes the masked
    # path, which needs none
    check_on_host = x.device.type == "cpu"
    rows, codes = _block_sizes(n, k)
    with _matmul_precision(precision, x.device):
        for start in range(0, n, rows):
            part = xf[start:start + rows]
            row_best, row_index = best[start:start + rows], indices[start:start + rows]
            for first in range(0, k, codes):
                block = cf[first:first + codes]
                if l2:
                    scores = torch.addmm(offsets[first:first + codes], part, block.t(),
                                         alpha=-2.0)
                else:
                    scores = torch.mm(part, block.t()).neg_()
                # argmin then a gather: min(dim=1) (values and indices) measured 1.76 ms for
                # 1024 x 1024 scores against ~0.5 ms for argmin (one thread)
                index = scores.argmin(dim=1)
                value = scores.gather(1, index[:, None]).squeeze(1)
                if not (check_on_host and bool(torch.isfinite(value).all())):
                    # NaN (min propagates it), -inf or a row of +inf somewhere: mask them
                    finite = torch.where(torch.isfinite(scores), scores, torch.inf)
                    index = finite.argmin(dim=1)
                    value = scores.gather(1, index[:, None]).squeeze(1)
                if first == 0:
                    row_best.copy_(value)
                    row_index.copy_(index)
                    continue
                # a later block replaces a finite best only when strictly lower; a non-finite
                # best (a row non-finite so far) by any finite value
                better = (value < row_best) | (~torch.isfinite(row_best) & torch.isfinite(value)
                                               & (value > -torch.inf))
                row_best.copy_(torch.where(better, value, row_best))
                row_index.copy_(torch.where(better, index + first, row_index))
    duplicates = lowest_duplicate_or_none(cf, offsets if l2 and codebook_sqnorm is None
                                          else None)
    if duplicates is not None:
        indices = duplicates[indices]
    if l2:
        return indices, (_squared_norms(xf) + best).clamp_min_(0.0)
    return indices, 1.0 + best / torch.linalg.vector_norm(xf, dim=1).clamp_min(1e-12)


def lowest_duplicate_or_none(codebook: Tensor, squared_norms: Tensor | None = None
                             ) -> Tensor | None:
    """``lowest_duplicate(codebook)``, or None when no two codes can be equal. A screen first:
    equal rows share their row sum and squared norm (ATen reduces every row of a contiguous
    matrix in the same order), packed into one int64 key per row (float32: the two bit patterns
    side by side; a lossy mix of float32 values widened to float64 collided at K = 262144 and
    sent the search to the slow path); only when two keys
    agree does the sort-based ``torch.unique(dim=0)`` run (78 ms at 16384 x 256 on one core,
    against ~1 ms for the screen). One float key alone would not do: 16384 random |c|^2 share
    a value ~17 times (birthday collisions over few ulps). ``squared_norms``: |c|^2 if the
    caller has it."""
    if squared_norms is None:
        squared_norms = _squared_norms(codebook)
    sums = codebook.sum(1) + 0.0  # (-0 -> +0)
    if sums.dtype == torch.float64:  # 64-bit patterns, mixed (collisions as rare as random)
        keys = sums.view(torch.int64) * -7046029254386353131 ^ squared_norms.view(torch.int64)
    else:  # both 32-bit patterns side by side: one int64 per distinct pair, exactly
        keys = (sums.view(torch.int32).to(torch.int64) << 32) \
            | (squared_norms.view(torch.int32).to(torch.int64) & 0xFFFFFFFF)
    if torch.unique(keys).numel() == codebook.shape[0]:
        return None
    return lowest_duplicate(codebook)


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
