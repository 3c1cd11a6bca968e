"""nearest_code on every backend: the public op against the float64 oracle, ties, non-finite
values and layouts; its registration (opcheck, gradcheck, torch.compile, autocast); the backend
registry. Then the Triton launcher on its own, tile by tile (under TRITON_INTERPRET=1 on CPU
tensors, or on a GPU): interpreted shapes stay small, ~0.5 ms per interpreted tl op.
Bad input on every backend: test_bad_input.py."""

import itertools
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import lgvq_kernels
from lgvq_kernels import reference
from lgvq_kernels._backends import BackendUnavailableError
from tests.utils import (FLOAT_DTYPES, GPU_DTYPES, INTERPRET, NATIVE_CHECK_ERRORS,
                         device_backends, fast_backends, kernel_device, skip_unsupported,
                         usable_backends)

CPU_BACKENDS = usable_backends("nearest_code")
FAST_CPU_BACKENDS = fast_backends("nearest_code")
NS, KS, DS = (0, 1, 7, 1000), (1, 3, 511), (1, 3, 8, 17, 64, 256)


def make_inputs(n, k, d, dtype, device="cpu", seed=0, unit=False):
    """x [n, d] and codebook [k, d] from one generator; unit: rows normalised first (the
    launcher takes the unit rows the public op hands it, rounded to the input dtype)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    codebook = torch.randn(k, d, generator=g)
    if unit:
        x = torch.nn.functional.normalize(x, dim=-1)
        codebook = torch.nn.functional.normalize(codebook, dim=-1)
    return x.to(dtype).to(device), codebook.to(dtype).to(device)


# ------------------------------------------------------------------------------------------
# the oracle check and its two error models
# ------------------------------------------------------------------------------------------


def accumulation_bound(x, codebook, metric):
    """[N, K]: the float32-accumulation error of a distance computed by the public op from the
    inputs as given, ~D ulps of the scale |x|^2 + max |c|^2 (cosine: of 1)."""
    n, k, d = x.shape[0], codebook.shape[0], x.shape[1]
    if metric == "cosine":
        return torch.full((n, k), 8 * d * 2.0**-23 + 1e-6, dtype=torch.float64)
    xd, cd = x.double().cpu(), codebook.double().cpu()
    scale = (xd * xd).sum(1) + (cd * cd).sum(1).max()
    return (8 * d * 2.0**-23 * scale + 1e-6)[:, None].expand(n, k)


# The launcher against the oracle, by dtype. l2: relative to |x|^2 + |c|^2 (fp32 accumulation
# of exact products; tf32 rounds inputs). cosine: absolute; the kernel takes the dtype-rounded
# unit vectors as they are while the oracle renormalises them, so the input rounding of the
# dtype (2^-11, 2^-8) enters.
L2_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
L2_TOLERANCE_TF32 = 2e-3
COSINE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def launcher_tolerance(x, codebook, metric, precision="ieee"):
    """[N, K]: the allowed error of each score of the launcher, by dtype (tables above)."""
    n, k = x.shape[0], codebook.shape[0]
    if metric == "cosine":
        return torch.full((n, k), COSINE_TOLERANCE[x.dtype], dtype=torch.float64)
    tol = L2_TOLERANCE_TF32 if precision == "tf32" and x.dtype == torch.float32 \
        else L2_TOLERANCE[x.dtype]
    x_sq = x.cpu().double().pow(2).sum(1)
    c_sq = codebook.cpu().double().pow(2).sum(1)
    return tol * (1.0 + x_sq[:, None] + c_sq[None, :])


def check_against_oracle(x, codebook, metric, indices, distances, tolerance, clear_gap):
    """The chosen code is optimal within its tolerance ([N, K]); where the oracle's top-2 gap
    exceeds clear_gap tolerances the index is exactly the oracle's; the reported distance is
    the oracle distance at the chosen index, within tolerance."""
    n, k = x.shape[0], codebook.shape[0]
    assert indices.shape == (n,) and indices.dtype == torch.int64
    assert distances.shape == (n,) and distances.dtype == reference.compute_dtype(x.dtype)
    assert indices.device == x.device and distances.device == x.device
    if n == 0:
        return
    indices, distances = indices.cpu(), distances.cpu().double()
    assert bool(((indices >= 0) & (indices < k)).all()), f"index outside [0, {k}): {indices}"
    oracle = reference.nearest_code_oracle(x.cpu(), codebook.cpu(), metric)  # [N, K] float64
    rows = torch.arange(n)
    chosen = oracle[rows, indices]
    best, best_index = oracle.min(dim=1)
    allowed = tolerance[rows, indices]
    excess = chosen - best - allowed
    worst = int(excess.argmax())
    assert bool((excess <= 0).all()), (
        f"{int((excess > 0).sum())} row(s) chose a code worse than the oracle's best by more "
        f"than the tolerance; worst row {worst}: chose {int(indices[worst])} "
        f"({float(chosen[worst]):.6g}), best {int(best_index[worst])} ({float(best[worst]):.6g})")
    if k > 1:
        second = oracle.topk(2, dim=1, largest=False).values[:, 1]
        clear = (second - best) > clear_gap * tolerance[rows, best_index]
        wrong = clear & (indices != best_index)
        assert not bool(wrong.any()), (
            f"{int(wrong.sum())} row(s) with a clear top-2 gap chose another index: rows "
            f"{wrong.nonzero().flatten()[:8].tolist()}, got {indices[wrong][:8].tolist()}, "
            f"expected {best_index[wrong][:8].tolist()}")
    distance_error = (distances - chosen).abs() - allowed
    assert bool((distance_error <= 0).all()), (
        f"distance off by more than the tolerance in {int((distance_error > 0).sum())} row(s); "
        f"worst: got {float(distances[distance_error.argmax()]):.6g}, oracle at the chosen "
        f"index {float(chosen[distance_error.argmax()]):.6g}")


def assert_matches_oracle(x, codebook, metric, indices, distances):
    """The public op's check: the accumulation bound, exact index beyond a gap of 2 bounds."""
    check_against_oracle(x, codebook, metric, indices, distances,
                         accumulation_bound(x, codebook, metric), clear_gap=2.0)


# ------------------------------------------------------------------------------------------
# the public op on every backend
# ------------------------------------------------------------------------------------------

GRID = [(n, k, d) for n, k, d in itertools.product(NS, KS, DS)]


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", GRID)
def test_oracle_grid_cpu(backend, dtype, metric, n, k, d):
    x, codebook = make_inputs(n, k, d, dtype, seed=n * 7 + k * 3 + d)
    result = lgvq_kernels.nearest_code(x, codebook, metric=metric, backend=backend)
    assert_matches_oracle(x, codebook, metric, result.indices, result.distances)


TRITON_GRID = [(0, 3, 8), (1, 1, 1), (7, 3, 17), (33, 70, 64)]


@pytest.mark.triton
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter unavailable")
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", TRITON_GRID)
def test_oracle_grid_triton_interpreter(dtype, metric, n, k, d):
    x, codebook = make_inputs(n, k, d, dtype, seed=n + k + d)
    result = lgvq_kernels.nearest_code(x, codebook, metric=metric, backend="triton")
    assert_matches_oracle(x, codebook, metric, result.indices, result.distances)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", [(0, 3, 8), (1, 1, 1), (7, 3, 17), (1000, 511, 256),
                                   (4099, 1024, 8), (513, 2049, 3)])
def test_oracle_grid_cuda(backend, dtype, metric, n, k, d):
    x, codebook = make_inputs(n, k, d, dtype, device="cuda", seed=n + k + d)
    result = lgvq_kernels.nearest_code(x, codebook, metric=metric, backend=backend)
    assert result.indices.device.type == "cuda"
    assert_matches_oracle(x, codebook, metric, result.indices, result.distances)


@pytest.mark.parametrize("device,backend", device_backends("nearest_code"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_ties_go_to_lowest_index(device, backend, dtype):
    skip_unsupported(backend, dtype, device)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 17, generator=g)
    # codes 1 and 4 are copies of code 3, code 0 equals code 2: every row ties.
    codebook = torch.stack([base[0], base[3], base[0], base[3], base[3], base[1]])
    x = torch.stack([base[3], base[0], base[3] + 1e-3, base[0] - 1e-3])
    x, codebook = x.to(dtype).to(device), codebook.to(dtype).to(device)
    result = lgvq_kernels.nearest_code(x, codebook, backend=backend)
    assert result.indices.cpu().tolist() == [1, 0, 1, 0]
    same = codebook[:1].expand(9, -1).contiguous()  # all codes equal: index 0
    assert lgvq_kernels.nearest_code(x, same, backend=backend).indices.cpu().tolist() == [0] * 4


@pytest.mark.parametrize("device,backend", device_backends("nearest_code"))
def test_noncontiguous_and_batched_inputs(device, backend):
    g = torch.Generator().manual_seed(2)
    x_big = torch.randn(3, 64, 5, generator=g).to(device)
    x = x_big.transpose(1, 2)[:, :, ::2]  # [3, 5, 32], strided
    codebook_big = torch.randn(40, 64, generator=g).to(device)
    codebook = codebook_big[::2, ::2]  # [20, 32], strided
    result = lgvq_kernels.nearest_code(x, codebook, backend=backend)
    assert result.indices.shape == (3, 5) and result.distances.shape == (3, 5)
    flat = lgvq_kernels.nearest_code(x.reshape(-1, 32).contiguous(), codebook.contiguous(),
                                     backend=backend)
    assert torch.equal(result.indices.reshape(-1), flat.indices)
    assert torch.equal(result.distances.reshape(-1), flat.distances)


@pytest.mark.parametrize("device,backend", device_backends("nearest_code"))
def test_non_finite_values_never_give_an_index_out_of_range(device, backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 9, generator=g)
    codebook = torch.randn(5, 9, generator=g)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    codebook[0, 2] = float("nan")  # code 0 can never be chosen for a finite row
    x, codebook = x.to(device), codebook.to(device)
    result = lgvq_kernels.nearest_code(x, codebook, backend=backend)
    indices = result.indices.cpu()
    assert int(indices.min()) >= 0 and int(indices.max()) < 5
    assert indices[1] == 0 and indices[2] == 0  # whole row non-finite: index 0
    assert torch.isnan(result.distances[1].cpu())
    finite_rows = [0, 3, 4, 5]
    assert bool((indices[finite_rows] != 0).all())
    expected = reference.nearest_code_oracle(x[finite_rows].cpu(), codebook[1:].cpu()).argmin(1)
    assert torch.equal(indices[finite_rows], expected + 1)


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_precomputed_sqnorm_matches(backend):
    x, codebook = make_inputs(50, 30, 12, torch.float32)
    sqnorm = (codebook * codebook).sum(1)
    a = lgvq_kernels.nearest_code(x, codebook, backend=backend)
    b = lgvq_kernels.nearest_code(x, codebook, codebook_sqnorm=sqnorm, backend=backend)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.distances, b.distances)


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_cosine_zero_rows(backend):
    x = torch.zeros(2, 4)
    codebook = torch.randn(3, 4)
    result = lgvq_kernels.nearest_code(x, codebook, metric="cosine", backend=backend)
    assert result.indices.tolist() == [0, 0]
    torch.testing.assert_close(result.distances, torch.ones(2))


def test_reference_blocks_keep_ties_and_non_finite_rules(monkeypatch):
    # Tiny blocks (3 rows x 4 codes) so that rows and codes both span several blocks: a tie
    # across code blocks goes to the earlier block, a row non-finite in its first block takes
    # a finite code of a later one, a NaN in a later block is never chosen.
    monkeypatch.setattr(reference, "CHUNK_SCORES", 12)
    monkeypatch.setattr(reference, "MIN_BLOCK_ROWS", 3)
    g = torch.Generator().manual_seed(5)
    codebook = torch.randn(11, 6, generator=g, dtype=torch.float64)
    codebook[9] = codebook[2]  # duplicate in a later block
    codebook[1, 0] = float("nan")  # first block: code 1 scores NaN for every row
    codebook[10, 3] = float("nan")  # last block too
    codebook[0] = codebook[3] = float("inf")  # two more non-finite codes of the first block
    x = codebook[[2, 9, 5, 7, 8, 2, 6]] + 1e-3 * torch.randn(7, 6, generator=g,
                                                            dtype=torch.float64)
    x[1] = codebook[9]
    assert reference._block_sizes(7, 11) == (3, 4)
    indices, distances = reference.nearest_code(x, codebook, None, "l2", "ieee")
    finite = torch.isfinite(codebook).all(1)
    oracle = reference.nearest_code_oracle(x, codebook)
    oracle[:, ~finite] = torch.inf
    expected = oracle.argmin(1)
    expected[expected == 9] = 2  # the duplicate: the lowest index
    assert indices.tolist() == expected.tolist() and indices[1] == 2
    torch.testing.assert_close(distances, oracle.gather(1, expected[:, None]).squeeze(1))


def test_reference_kept_score_buffer_is_reused_safely():
    # On CPU the score buffer outlives a call (reference._score_buffer): a larger earlier call
    # leaves a larger buffer, a call under inference mode must not leave an inference tensor
    # behind (a later call outside it could not write it), threads keep their own buffers, and
    # nothing a call returns aliases the buffer.
    reference.release_score_buffers()
    g = torch.Generator().manual_seed(3)

    def case(n, k, d):
        codebook = torch.randn(k, d, generator=g)
        return codebook[torch.randint(0, k, (n,), generator=g)] + 0.1 * torch.randn(
            n, d, generator=g), codebook

    def check(x, codebook, result):
        oracle = reference.nearest_code_oracle(x, codebook)
        assert torch.equal(result[0], oracle.argmin(1))
        torch.testing.assert_close(result[1].double(), oracle.min(1).values, rtol=1e-4,
                                   atol=1e-4)

    big, small = case(300, 200, 8), case(7, 5, 3)
    with torch.inference_mode():
        first = reference.nearest_code(*big, None, "l2", "ieee")
    held = reference._buffers.scores[torch.float32]
    assert held.numel() == 300 * 200 and not held.is_inference()
    check(*big, first)
    second = reference.nearest_code(*small, None, "l2", "ieee")  # a slice of the same buffer
    assert reference._buffers.scores[torch.float32] is held
    check(*small, second)
    check(*big, first)  # the earlier results do not alias the buffer
    for value in (*first, *second):
        assert value.untyped_storage().data_ptr() != held.untyped_storage().data_ptr()

    import threading

    results, problems = {}, [case(500, 64, 16) for _ in range(4)]

    def run(i):
        for _ in range(20):
            results[i] = reference.nearest_code(*problems[i], None, "l2", "ieee")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, problem in enumerate(problems):
        check(*problem, results[i])
    reference.release_score_buffers()
    assert not reference._buffers.scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lowest", [True, False])
@pytest.mark.parametrize("n,k,width", [(9, 128, 64), (9, 130, 64), (5, 193, 64), (7, 37, 4),
                                       (6, 8192 + 5, 256), (4, 16, 4)])
def test_first_best_is_argmin_argmax_exactly(monkeypatch, dtype, lowest, n, k, width):
    # The grouped reduction forced at every size: the same index as argmin / argmax on ties
    # (small integers), NaN (the first NaN), -inf / +inf, rows all of one of them, and a tail of
    # k % width scores that holds the row's best.
    monkeypatch.setattr(reference, "MIN_GROUPED_SCORES", 0)
    monkeypatch.setattr(reference, "GROUP_WIDTH", width)
    monkeypatch.setattr(reference, "GROUP_WIDTH_LARGE", width)
    g = torch.Generator().manual_seed(k + n)
    scores = torch.randint(-3, 4, (n, k), generator=g).to(dtype)
    nan, inf = float("nan"), float("inf")
    scores[0, [5, k - 1]] = nan
    scores[1, 3] = -inf
    scores[1, k - 2] = -inf
    scores[2] = inf
    scores[3] = nan
    scores[-1, k - 1] = -10.0 if lowest else 10.0  # the best score in the tail (or last group)
    if n > 5:
        scores[4, [2, k - 3]] = inf
        scores[5, k // 2] = nan
    arg = torch.argmin if lowest else torch.argmax
    assert torch.equal(reference.first_best(scores, lowest), arg(scores, dim=1))
    assert torch.equal(reference.first_best(-scores, lowest), arg(-scores, dim=1))
    # a NaN only in the last score of each row (the tail where k % width != 0)
    last_nan = torch.randint(-3, 4, (n, k), generator=g).to(dtype)
    last_nan[:, -1] = nan
    assert torch.equal(reference.first_best(last_nan, lowest), arg(last_nan, dim=1))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("split", [False, True], ids=["one_block", "split_codebook"])
def test_reference_grouped_search_and_non_finite_redo(monkeypatch, metric, split):
    # Grouped reductions forced; one code block (non-finite rows found after the search and
    # redone masked) or a split codebook (a block checked, and masked, when needed): the
    # oracle's choice with non-finite codes excluded, duplicates to the lowest index, a row
    # that is all non-finite to index 0.
    monkeypatch.setattr(reference, "MIN_GROUPED_SCORES", 0)
    monkeypatch.setattr(reference, "GROUP_WIDTH", 4)
    if split:
        monkeypatch.setattr(reference, "CHUNK_SCORES", 60)
        monkeypatch.setattr(reference, "MIN_BLOCK_ROWS", 5)
    g = torch.Generator().manual_seed(11)
    codebook = torch.randn(37, 6, generator=g, dtype=torch.float64)
    if metric == "cosine":  # unit codes (any norm is taken; these keep the case small)
        codebook = torch.nn.functional.normalize(codebook, dim=1)
    codebook[30] = codebook[4]
    codebook[7, 1] = float("nan")
    codebook[12] = float("inf")
    codebook[33, 0] = -float("inf")
    x = codebook[[4, 30, 2, 9, 20, 35, 1, 3, 36, 15, 16, 18, 22]].clone()
    x += 1e-3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    x[1] = codebook[30]
    x[5, 2] = float("nan")  # a row all non-finite
    rows, codes = reference._block_sizes(*x.shape[:1], codebook.shape[0])
    assert (codes < codebook.shape[0]) == split
    indices, distances = reference.nearest_code(x, codebook, None, metric, "ieee")
    oracle = reference.nearest_code_oracle(x, codebook, metric)
    oracle[:, ~torch.isfinite(codebook).all(1)] = torch.inf
    expected = oracle.argmin(1)
    expected[expected == 30] = 4
    expected[5] = 0
    assert indices.tolist() == expected.tolist() and indices[1] == 4
    finite_rows = [i for i in range(x.shape[0]) if i != 5]
    torch.testing.assert_close(distances[finite_rows],
                               oracle[finite_rows].gather(1, expected[finite_rows, None])
                               .squeeze(1))
    assert torch.isnan(distances[5])


@pytest.mark.parametrize("direct, buckets", [(0, 1 << 22), (0, 1), (1 << 40, 1 << 22)],
                         ids=["hashed_lookup", "one_bucket_lookup", "direct_match"])
@pytest.mark.parametrize("screen", [4096, 0], ids=["sum_screen", "lookup_only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 40, 3000])
def test_lowest_chosen_duplicate_equals_the_whole_codebook_rule(monkeypatch, buckets, direct,
                                                               screen, dtype, k):
    # lowest_duplicate(codebook)[indices] (torch.unique over all rows) against the chosen-codes
    # lookup: real duplicates (several copies, a later copy chosen), codes sharing the first
    # value but not the rest, -0.0 against 0.0, NaN codes, repeated and unsorted indices; with
    # the row-sum screen in front (K <= its limit) and without; the pairs found by the sorted
    # lookup (behind the first-value hash screen, or with every code in one bucket) or by the
    # direct [K, C] comparison.
    monkeypatch.setattr(reference, "SUM_SCREEN_MAX_CODES", screen)
    monkeypatch.setattr(reference, "DIRECT_MATCH_MAX_PAIRS", direct)
    monkeypatch.setattr(reference, "MAX_FIRST_VALUE_BUCKETS", buckets)
    g = torch.Generator().manual_seed(k)
    codebook = torch.randn(k, 5, generator=g).to(dtype)
    if k >= 40:
        codebook[17] = codebook[3]
        codebook[k - 1] = codebook[3]
        codebook[25, 0] = codebook[3, 0]  # same first value, different code
        codebook[30] = codebook[8]
        codebook[30, 0] = -0.0
        codebook[8, 0] = 0.0  # 30 equals 8 (-0.0 == 0.0)
        codebook[33, 1] = float("nan")
        codebook[34] = codebook[33]  # NaN rows are never equal
        codebook[35] = -0.0  # sums to -0.0, and equals the row of +0.0 after it
        codebook[36] = 0.0
    indices = torch.randint(0, k, (50,), generator=g)
    if k >= 40:
        indices[:9] = torch.tensor([k - 1, 17, 3, 25, 30, 34, 33, 17, 36])
    expected = reference.lowest_duplicate(codebook)[indices]
    got = reference.lowest_chosen_duplicate(codebook, indices)
    assert got.tolist() == expected.tolist()
    if k >= 40:
        assert got[:9].tolist() == [3, 3, 3, 25, 8, 34, 33, 3, 35]
    for one in indices[:9].tolist():  # a single row (its own path: no unique)
        single = reference.lowest_chosen_duplicate(codebook, torch.tensor([one]))
        assert single.tolist() == reference.lowest_duplicate(codebook)[[one]].tolist()


@pytest.mark.parametrize("buckets", [1, 1 << 22], ids=["one_bucket", "hashed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_chosen_code_with_a_nan_first_value_hides_no_duplicate(monkeypatch, buckets, dtype):
    # code 0 (chosen, e.g. by a row whose scores are all non-finite) starts with NaN; it sorts
    # last among the chosen first values, and the look-up must still find code 2 = code 5
    monkeypatch.setattr(reference, "SUM_SCREEN_MAX_CODES", 0)
    monkeypatch.setattr(reference, "DIRECT_MATCH_MAX_PAIRS", 0)
    monkeypatch.setattr(reference, "MAX_FIRST_VALUE_BUCKETS", buckets)
    codebook = torch.randn(10, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    codebook[0, 0] = float("nan")
    codebook[2] = codebook[5]
    got = reference.lowest_chosen_duplicate(codebook, torch.tensor([0, 5]))
    assert got.tolist() == [0, 2]
    codebook[:, 0] = float("nan")  # every first value NaN: nothing can be compared
    assert reference.lowest_chosen_duplicate(codebook, torch.tensor([0, 5])).tolist() == [0, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("buckets", [1024, 1 << 14, 1 << 22])
def test_first_value_buckets_put_equal_values_together(dtype, buckets):
    # the hash screen may only send equal first values to one bucket: -0.0 with 0.0 (different
    # bits, equal values), every value with itself; and it must spread ordinary values (a
    # screen that puts everything in one bucket is correct but screens nothing)
    values = torch.tensor([-0.0, 0.0, 1.5, -1.5, 3e38, -2.5e-39], dtype=dtype)
    bucket = reference._first_value_bucket(values, buckets)
    assert bucket[0] == bucket[1]
    assert bool(((bucket >= 0) & (bucket < buckets)).all())
    assert bucket.tolist() == reference._first_value_bucket(values.clone(), buckets).tolist()
    spread = reference._first_value_bucket(torch.randn(4096, dtype=dtype), buckets)
    assert spread.unique().numel() > 0.3 * min(buckets, 4096)


@pytest.mark.parametrize("direct", [0, 1 << 40], ids=["sorted_lookup", "direct_match"])
def test_the_row_sum_screen_sees_a_row_of_minus_zeros_equal_to_zeros(monkeypatch, direct):
    # the only duplicate pair: a row of -0.0 (its sum is -0.0) and, later, a row of +0.0 (sum
    # +0.0); the row-sum screen must not clear them as distinct
    monkeypatch.setattr(reference, "DIRECT_MATCH_MAX_PAIRS", direct)
    codebook = torch.randn(10, 4, generator=torch.Generator().manual_seed(5))
    codebook[2] = -0.0
    codebook[7] = 0.0
    got = reference.lowest_chosen_duplicate(codebook, torch.tensor([7, 1, 7]))
    assert got.tolist() == [2, 1, 2]


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
@pytest.mark.parametrize("n,d", [(6, 16), (300, 16), (6, 100), (300, 100), (300, 1100)])
def test_overflow_to_minus_inf_is_never_chosen(backend, n, d):
    # Scores that overflow to -inf among finite ones: x[0] = 3e38 against the even codes
    # (c[0] = 1) gives -2 x.c = -6e38 -> -inf in float32, the odd codes (c[0] = 0) score finite.
    # Every kernel path (direct, also at D = 100 with AVX2; GEMM tiles, at D = 1100 with AVX2;
    # few rows; AVX2 / AVX-512 lanes) must pick the best finite score: the odd code with the highest x.c (sqnorm given as zeros).
    g = torch.Generator().manual_seed(n + d)
    k = 70
    codebook = torch.randn(k, d, generator=g)
    codebook[0::2, 0] = 1.0
    codebook[1::2, 0] = 0.0
    x = torch.randn(n, d, generator=g)
    x[:, 0] = 3e38
    zeros = torch.zeros(k)
    result = lgvq_kernels.nearest_code(x, codebook, codebook_sqnorm=zeros, backend=backend)
    odd = codebook[1::2].double()
    expected = (x.double() @ odd.t()).argmax(1) * 2 + 1
    assert result.indices.tolist() == expected.tolist()


def _native_isa() -> str:
    try:
        import lgvq_kernels._C as native
    except ImportError:
        return ""
    return native.cpu_isa() if hasattr(native, "cpu_isa") else ""


@pytest.mark.skipif(not _native_isa().startswith("avx512"),
                    reason="the CPU has no AVX-512 (or the native extension is not built)")
def test_avx512_search_chooses_as_avx2():
    # The AVX-512 kernels sum each lane as the AVX2 ones do: the same indices, exactly. Shapes
    # where both take the same path: D <= 64 direct, few rows (one to four rows: the one-pass
    # tiles, whose AVX-512 pass sums as the AVX2 one), GEMM tiles at D > 1024 (with
    # AVX2 alone float32 takes the direct kernel up to D = 1024, the AVX-512 build GEMM tiles). The
    # distances are recomputed from the chosen code by plain C++ that the compiler builds for
    # each instruction set (measured: 1 ulp apart on a few rows), so they are held to rounding.
    # Codes that permute one vector, against a constant x, score equal but for rounding: there
    # the choice shows a change in the order of any sum (found in review: on random codes a
    # swapped pair of FMAs moved no index).
    script = (
        "import sys, torch, lgvq_kernels._C as C\n"
        "g = torch.Generator().manual_seed(0); out = {'isa': C.cpu_isa()}\n"
        "for n, k, d in ((37, 19, 3), (1000, 1000, 32), (513, 1030, 64), (200, 300, 100),\n"
        "                (600, 300, 1100), (1, 700, 257), (4, 300, 100), (2, 1030, 72),\n"
        "                (3, 513, 87)):\n"
        "    x = torch.randn(n, d, generator=g); c = torch.randn(k, d, generator=g)\n"
        "    # a NaN in row 3 (one-row shapes: none, or the whole search would be of a NaN row)\n"
        "    x[3 if n > 3 else 0, 0] = float('nan') if n != 1 else 0.0; c[5] = float('inf')\n"
        "    unit = torch.nn.functional.normalize(c, dim=1)\n"
        "    out[(n, k, d)] = (torch.ops.lgvq_C.nearest_code(x, c, None, False),\n"
        "                      torch.ops.lgvq_C.nearest_code(x, unit, None, True))\n"
        "for n, k, d in ((1, 700, 257), (4, 300, 100), (2, 1030, 72), (3, 513, 87)):\n"
        "    # codes that permute one vector against a constant x: every score is equal in exact\n"
        "    # arithmetic, so the choice rests on rounding alone (the order of every sum)\n"
        "    base = torch.randn(d, generator=g)\n"
        "    c = torch.stack([base[torch.randperm(d, generator=g)] for _ in range(k)])\n"
        "    x = torch.full((n, d), 0.75)\n"
        "    out[('permuted', n, k, d)] = (torch.ops.lgvq_C.nearest_code(x, c, None, False),\n"
        "                                  torch.ops.lgvq_C.nearest_code(x, c, None, True))\n"
        "torch.save(out, sys.argv[1])\n")
    runs = {}
    for name, env_value in (("avx512", None), ("avx2", "1")):
        env = dict(os.environ)
        env.pop("LGVQ_NO_AVX512", None)
        if env_value:
            env["LGVQ_NO_AVX512"] = env_value
        path = os.path.join(tempfile.mkdtemp(), f"{name}.pt")
        done = subprocess.run([sys.executable, "-c", script, path], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = torch.load(path)
    assert runs["avx512"].pop("isa").startswith("avx512")
    assert runs["avx2"].pop("isa").startswith("avx2")
    for shape, results in runs["avx512"].items():
        for metric, (wide, narrow) in zip(("l2", "cosine"), zip(results, runs["avx2"][shape])):
            assert torch.equal(wide[0], narrow[0]), (shape, metric)
            torch.testing.assert_close(wide[1], narrow[1], rtol=1e-6, atol=1e-6,
                                       equal_nan=True, msg=f"{shape} {metric}")


@pytest.mark.parametrize("n,d,k", [(6, 100, 4096), (300, 1100, 600)], ids=["few-rows-tiles", "gemm-tiles"])
def test_native_search_with_inputs_that_require_grad_on_two_threads(n, d, k):
    # The tile paths call at::mm_out on pool threads, which do not inherit the caller's
    # below-autograd state: inputs that require grad made mm_out raise there with 2+ threads
    # (found in review; 5-256 rows at D > 64, and the GEMM tiles). Indices and gradients as the
    # reference's.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(n + d)
        x0, c0 = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
        grads = {}
        for backend in ("native", "reference"):
            x, codebook = x0.clone().requires_grad_(), c0.clone().requires_grad_()
            result = lgvq_kernels.nearest_code(x, codebook, backend=backend)
            result.distances.sum().backward()
            grads[backend] = (result.indices, x.grad, codebook.grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads["native"][0], grads["reference"][0])
    torch.testing.assert_close(grads["native"][1], grads["reference"][1])
    torch.testing.assert_close(grads["native"][2], grads["reference"][2])


def test_native_few_rows_ties_across_code_tiles():
    # N <= 256 rows and D > 64 take the few-rows path (parallel over 256-code tiles); copies of
    # one code in three tiles: the lowest index wins, whatever tile finishes first.
    g = torch.Generator().manual_seed(6)
    codebook = torch.randn(700, 80, generator=g)
    codebook[650] = codebook[300] = codebook[10]
    x = torch.cat([codebook[[10, 300, 650]], torch.randn(4, 80, generator=g)])
    result = lgvq_kernels.nearest_code(x, codebook, backend="native")
    assert result.indices[:3].tolist() == [10, 10, 10]
    assert_matches_oracle(x, codebook, "l2", result.indices, result.distances)
    given = lgvq_kernels.nearest_code(x, codebook, backend="native",
                                      codebook_sqnorm=(codebook * codebook).sum(1))
    assert torch.equal(given.indices, result.indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("k", [7, 300])
@pytest.mark.parametrize("d", [65, 100, 257])
def test_native_one_to_four_rows_without_blas(dtype, metric, k, d):
    # One to four rows with D > 64: each 256-code tile is one pass over its codes (norms, keys
    # and the rows' products, no BLAS call); five rows go back to the tile GEMM. Every row count
    # against the oracle, with |c|^2 given and not, K = 7 (one partial group of eight codes) and
    # 300 (a second, partial tile), D with and without an 8-value or scalar tail; a row searched
    # alone and beside others chooses the same code.
    x, codebook = make_inputs(5, k, d, dtype, seed=k + d)
    codebook[k - 1] = codebook[1]  # a duplicate: the lower index wins
    x[0] = codebook[1]
    for n in range(1, 6):
        result = lgvq_kernels.nearest_code(x[:n], codebook, metric=metric, backend="native")
        assert_matches_oracle(x[:n], codebook, metric, result.indices, result.distances)
        assert result.indices[0] == 1
        alone = lgvq_kernels.nearest_code(x[n - 1:n], codebook, metric=metric, backend="native")
        assert alone.indices[0] == result.indices[n - 1]
        if metric == "l2":
            given = lgvq_kernels.nearest_code(x[:n], codebook, metric=metric, backend="native",
                                              codebook_sqnorm=(codebook * codebook).sum(1))
            assert torch.equal(given.indices, result.indices)


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
@pytest.mark.parametrize("d", [8, 40, 130])
def test_cosine_rows_of_any_norm(backend, d):
    # The op gets x as it is (no normalised copy) and divides by |x| itself: tiny, huge and
    # unit rows give the distances of their directions.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, d, generator=g)
    codebook = torch.randn(33, d, generator=g)
    scaled = x * torch.logspace(-10, 15, 40)[:, None]  # |x| above the 1e-12 clamp, |x|^2 finite
    result = lgvq_kernels.nearest_code(scaled, codebook, metric="cosine", backend=backend)
    unit = lgvq_kernels.nearest_code(torch.nn.functional.normalize(x, dim=-1), codebook,
                                     metric="cosine", backend=backend)
    assert torch.equal(result.indices, unit.indices)
    torch.testing.assert_close(result.distances, unit.distances, atol=1e-6, rtol=0)
    assert_matches_oracle(scaled, codebook, "cosine", result.indices, result.distances)


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
@pytest.mark.parametrize("n, d", [(40, 8), (300, 8), (40, 130), (100, 80), (300, 130), (5, 40),
                                  (300, 1100)])
@pytest.mark.parametrize("split", [False, True], ids=["one_block", "split_codebook"])
def test_cosine_codes_of_any_norm(monkeypatch, backend, n, d, split):
    # No normalised copy of the codebook is made (the norms are folded into the search): codes
    # scaled from 1e-10 to 1e15 choose what their unit versions choose, at the oracle's
    # distances. Shapes: the direct path and the GEMM tiles (few rows, with scaled scores
    # (N < D) or unit tiles, and row blocks) of the native kernel; the reference's scaled scores (N < D) and unit code blocks (N >= D), in
    # one block or a split codebook.
    if split:
        monkeypatch.setattr(reference, "CHUNK_SCORES", 40 * 7)
        monkeypatch.setattr(reference, "MIN_BLOCK_ROWS", 7)
    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(n, d, generator=g)
    unit = torch.nn.functional.normalize(torch.randn(333, d, generator=g), dim=-1)
    scaled = unit * torch.logspace(-10, 15, 333)[torch.randperm(333, generator=g)][:, None]
    result = lgvq_kernels.nearest_code(x, scaled, metric="cosine", backend=backend)
    expected = lgvq_kernels.nearest_code(x, unit, metric="cosine", backend=backend)
    assert_matches_oracle(x, scaled, "cosine", result.indices, result.distances)
    clear = clear_rows(x, unit, "cosine", 1e-4)
    assert torch.equal(result.indices[clear], expected.indices[clear])
    torch.testing.assert_close(result.distances, expected.distances, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
@pytest.mark.parametrize("d", [8, 130])
def test_cosine_zero_and_non_finite_codes(backend, d):
    # A zero code has similarity 0 with every row (distance 1); a code with an infinite or NaN
    # entry is never chosen (its unit code is NaN, as after F.normalize), though its direction
    # would be row 0's and row 1's best.
    e = torch.eye(d)
    x = e[:3] * torch.tensor([[1.0], [1e-6], [1e6]])
    inf_code, nan_code = e[0].clone(), e[1].clone()
    inf_code[0], nan_code[1] = float("inf"), float("nan")
    codebook = torch.stack([-(e[0] + e[1]), torch.zeros(d), 1e3 * (e[2] - 0.1 * e[0] - 0.1 * e[1]),
                            inf_code, nan_code])
    result = lgvq_kernels.nearest_code(x, codebook, metric="cosine", backend=backend)
    assert result.indices.tolist() == [1, 1, 2]  # rows 0, 1: the zero code beats -(e0 + e1)
    expected = torch.tensor([1.0, 1.0, 1.0 - 1.0 / 1.02 ** 0.5])
    torch.testing.assert_close(result.distances, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_native_agrees_with_reference_on_large_random_problem(backend):
    # Exercises the multi-tile paths (K > one GEMM tile, N > one row block) of the native kernel:
    # direct at D = 8, 40 (and 130 with AVX2 float32), GEMM tiles at D = 130 elsewhere and 1100.
    for d in (8, 40, 130, 1100):
        x, codebook = make_inputs(1500, 2500, d, torch.float32, seed=d)
        result = lgvq_kernels.nearest_code(x, codebook, backend=backend)
        assert_matches_oracle(x, codebook, "l2", result.indices, result.distances)


# ------------------------------------------------------------------------------------------
# registration: opcheck, gradcheck, compile, autocast
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_opcheck(backend, metric):
    x, codebook = make_inputs(9, 5, 16, torch.float32, unit=metric == "cosine")
    sqnorm = (codebook * codebook).sum(1) if metric == "l2" else None
    args = (x, codebook, sqnorm, metric, "ieee", backend)
    torch.library.opcheck(torch.ops.lgvq.nearest_code.default, args)
    # With requires_grad, opcheck's AOT test sums every output into one accumulator starting
    # with the int64 indices, and adding the float distances into it fails inside the harness
    # itself; the compiled backward is covered by test_compile_fullgraph_with_backward.
    args = (x.clone().requires_grad_(True), codebook.clone().requires_grad_(True), sqnorm,
            metric, "ieee", backend)
    torch.library.opcheck(torch.ops.lgvq.nearest_code.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def _separated_inputs(metric, dtype=torch.float64):
    # Rows close to distinct codes so that the argmin does not flip under finite differences.
    g = torch.Generator().manual_seed(4)
    codebook = torch.randn(6, 5, generator=g, dtype=dtype) * 3
    x = codebook[[0, 2, 3, 5, 2]] + 0.1 * torch.randn(5, 5, generator=g, dtype=dtype)
    return x, codebook


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
@pytest.mark.parametrize("variant", ["l2", "cosine", "l2_sqnorm"])
def test_gradcheck_distances(backend, variant):
    metric = "cosine" if variant == "cosine" else "l2"
    x, codebook = _separated_inputs(metric)
    x.requires_grad_(True)
    codebook.requires_grad_(True)
    if variant == "l2_sqnorm":
        sqnorm = (codebook.detach() ** 2).sum(1).requires_grad_(True)

        def f(x, codebook, sqnorm):
            return lgvq_kernels.nearest_code(x, codebook, codebook_sqnorm=sqnorm,
                                             backend=backend).distances

        assert torch.autograd.gradcheck(f, (x, codebook, sqnorm))
    else:
        def f(x, codebook):
            return lgvq_kernels.nearest_code(x, codebook, metric=metric,
                                             backend=backend).distances

        assert torch.autograd.gradcheck(f, (x, codebook))
        assert torch.autograd.gradgradcheck(f, (x, codebook))


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()

    def f(x, codebook):
        result = lgvq_kernels.nearest_code(x, codebook, backend=backend)
        return result.indices, result.distances * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    x, codebook = make_inputs(33, 17, 8, torch.float32)
    eager = f(x, codebook)
    got = compiled(x, codebook)
    assert torch.equal(got[0], eager[0])
    torch.testing.assert_close(got[1], eager[1])


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_compile_fullgraph_with_backward(backend):
    torch._dynamo.reset()

    def f(x, codebook):
        return lgvq_kernels.nearest_code(x, codebook, backend=backend).distances.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, codebook = make_inputs(20, 7, 6, torch.float32)
    x.requires_grad_(True)
    compiled(x, codebook).backward()
    expected = torch.autograd.grad(f(x, codebook), x)[0]
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_autocast_runs_in_float32(backend):
    x, codebook = make_inputs(40, 25, 16, torch.float32)
    plain = lgvq_kernels.nearest_code(x, codebook, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = lgvq_kernels.nearest_code(x.bfloat16(), codebook, backend=backend)
    assert auto.distances.dtype == torch.float32
    # bf16 x is upcast, so compare against the float32 run on the same (rounded) values
    rounded = lgvq_kernels.nearest_code(x.bfloat16().float(), codebook, backend=backend)
    assert torch.equal(auto.indices, rounded.indices)
    assert plain.indices.shape == auto.indices.shape


# ------------------------------------------------------------------------------------------
# the backend registry
# ------------------------------------------------------------------------------------------


def test_available_backends_explains_every_backend():
    for op in lgvq_kernels.OPS:
        info = lgvq_kernels.available_backends(op, "cpu")
        assert set(info) == {"reference", "native", "triton"}
        assert info["reference"].available
        for name, entry in info.items():
            assert entry.available or entry.reason, f"{name} unavailable for {op} without a reason"
    with pytest.raises(ValueError, match="op must be one of"):
        lgvq_kernels.available_backends("cpu")  # the op is required: never a silent default


def test_auto_never_picks_the_triton_interpreter(monkeypatch):
    monkeypatch.delenv("LGVQ_BACKEND", raising=False)
    assert lgvq_kernels.resolve_backend("auto", "cpu", "nearest_code") in ("native", "reference")


def test_env_override_and_unavailable_backend(monkeypatch):
    monkeypatch.setenv("LGVQ_BACKEND", "reference")
    assert lgvq_kernels.resolve_backend("auto", "cpu", "nearest_code") == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="triton.*TRITON_INTERPRET"):
        lgvq_kernels.resolve_backend("triton", "cpu", "nearest_code")
    with pytest.raises(ValueError, match="backend must be one of"):
        lgvq_kernels.nearest_code(torch.randn(2, 3), torch.randn(4, 3), backend="fastest")


@pytest.mark.skipif("triton" not in usable_backends("nearest_code", "cuda"),
                    reason="triton is not installed")
def test_auto_skips_backends_that_cannot_take_the_dtype(monkeypatch):
    # The GPU kernels take float32/float16/bfloat16: float64 CUDA tensors go to a backend that
    # takes them (decided from the registry alone: no GPU needed).
    monkeypatch.delenv("LGVQ_BACKEND", raising=False)
    assert lgvq_kernels.resolve_backend("auto", "cuda", "nearest_code", (torch.float32,)) \
        == "triton"
    assert lgvq_kernels.resolve_backend("auto", "cuda", "nearest_code", (torch.float64,)) \
        in ("reference",)
    with pytest.raises(BackendUnavailableError, match="float64"):
        lgvq_kernels.resolve_backend("triton", "cuda", "nearest_code", (torch.float64,))


def test_resolve_device():
    assert lgvq_kernels.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert lgvq_kernels.resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            lgvq_kernels.resolve_device("cuda:0")


@pytest.mark.parametrize("which", ["x", "codebook"])
def test_check_finite(which):
    x, codebook = torch.randn(4, 3), torch.randn(5, 3)
    (x if which == "x" else codebook)[1, 1] = math.nan
    with pytest.raises(ValueError, match=f"{which} contains 1 non-finite"):
        lgvq_kernels.nearest_code(x, codebook, check_finite=True)
    lgvq_kernels.nearest_code(x, codebook)  # off by default: no error, valid indices


@pytest.mark.skipif("native" not in CPU_BACKENDS, reason="native extension not built")
def test_native_op_checks_its_own_inputs():
    # Direct calls into the compiled op (bypassing Python validation) fail cleanly, not crash.
    with pytest.raises(ValueError, match="codebook must be \\[K, D\\]"):
        torch.ops.lgvq_C.nearest_code(torch.randn(3, 4), torch.randn(4), None, False)
    with pytest.raises(NATIVE_CHECK_ERRORS["dtype"], match="same dtype"):
        torch.ops.lgvq_C.nearest_code(torch.randn(3, 4), torch.randn(2, 4).double(), None, False)
    with pytest.raises(ValueError, match="codebook_sqnorm must be"):
        torch.ops.lgvq_C.nearest_code(torch.randn(3, 4), torch.randn(2, 4), torch.randn(3), False)


# ------------------------------------------------------------------------------------------
# the Triton launcher, tile by tile
# ------------------------------------------------------------------------------------------

DEVICE = kernel_device("triton")
TRITON = pytest.mark.skipif("triton" not in usable_backends("nearest_code", DEVICE),
                            reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1 "
                                   "(set before import)")
CLEAR_GAP = 4.0  # top-2 gap, in tolerances, above which the launcher's index must be the oracle's


def launcher():
    from lgvq_kernels.triton import nearest_code as module

    return module


def forward(*args):
    return launcher().nearest_code_forward(*args)


def check_launcher_against_oracle(x, codebook, indices, distances, metric, precision="ieee"):
    check_against_oracle(x, codebook, metric, indices, distances,
                         launcher_tolerance(x, codebook, metric, precision), CLEAR_GAP)


def clear_rows(x, codebook, metric, gap=1e-3):
    """Rows whose two best finite float64 scores differ by more than ``gap``: there a GPU's
    rounding (fma contraction, approximate division and square root, another summation order)
    cannot change the choice."""
    xd, cd = x.cpu().double(), codebook.cpu().double()
    scores = -(xd @ cd.t()) if metric == "cosine" else cd.pow(2).sum(1)[None, :] - 2.0 * (
        xd @ cd.t())
    scores = torch.where(torch.isfinite(scores), scores, torch.inf)
    top2 = scores.topk(2, dim=1, largest=False).values
    return (top2[:, 1] - top2[:, 0] > gap) & torch.isfinite(top2[:, 0])


def launcher_reference(x, codebook, codebook_sqnorm, metric):
    """The reference backend's answer in the launcher's terms: the launcher takes the unit x
    rows and codes the public op hands it as they are (cosine distance 1 - x.c); the
    reference, like the op, divides the similarity by |x| and |c|, which rounding unit rows
    to fp16/bf16 moves off 1."""
    indices, distances = reference.nearest_code(x, codebook, codebook_sqnorm, metric, "ieee")
    if metric == "cosine" and x.shape[0]:
        def norms(rows):
            return torch.linalg.vector_norm(rows.to(distances.dtype), dim=1).clamp_min(1e-12)

        distances = 1.0 - (1.0 - distances) * norms(x) * norms(codebook)[indices]
    return indices, distances


def check_against_reference(x, codebook, codebook_sqnorm, indices, distances, metric):
    """Same indices as the reference backend where the exact top-2 gap of the very scores both
    compute (no renormalisation, the given sqnorm) is clear; close distances."""
    ref_indices, ref_distances = launcher_reference(x, codebook, codebook_sqnorm, metric)
    if x.shape[0] == 0:
        assert indices.numel() == 0 and distances.numel() == 0
        return
    xd, cd = x.cpu().double(), codebook.cpu().double()
    if metric == "cosine":
        scores = -(xd @ cd.t())
    else:
        sqnorm = cd.pow(2).sum(1) if codebook_sqnorm is None else codebook_sqnorm.cpu().double()
        scores = sqnorm[None, :] - 2.0 * (xd @ cd.t())
    if codebook.shape[0] > 1:
        top2 = scores.topk(2, dim=1, largest=False).values
        clear = (top2[:, 1] - top2[:, 0]) > 1e-3
        assert torch.equal(indices.cpu()[clear], ref_indices.cpu()[clear])
    torch.testing.assert_close(distances.cpu(), ref_distances.cpu().float(), rtol=1e-4,
                               atol=1e-4)


@pytest.fixture
def one_config_per_shape(monkeypatch):
    """On a GPU the autotuner compiles and times up to 8 configs per new shape key; correctness
    tests take the heuristic config (test_triton_gpu_autotuned covers the autotuner)."""
    monkeypatch.setattr(launcher(), "_AUTOTUNE", False)


@pytest.fixture
def small_blocks(monkeypatch):
    """16 x 16 x 16 tiles: several row programs, several codebook tiles (the running-min merge)
    and the chunked-D loop on small shapes."""
    monkeypatch.setattr(launcher(), "_block_d", lambda dim, fma_dot: 16)
    monkeypatch.setattr(launcher(), "_interpreter_blocks", lambda n, k: (16, 16))


def launcher_test(test):
    """A test of the launcher: skipped without Triton, marked triton, one config per shape."""
    for mark in (TRITON, pytest.mark.triton, pytest.mark.usefixtures("one_config_per_shape")):
        test = mark(test)
    return test


def launcher_inputs(n, k, d, dtype, metric, seed=0):
    return make_inputs(n, k, d, dtype, DEVICE, seed, unit=metric == "cosine")


@launcher_test
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 3, 17, 64])
@pytest.mark.parametrize("k", [1, 3, 37])
@pytest.mark.parametrize("n", [0, 1, 7, 100])
def test_triton_matches_oracle(n, k, d, dtype, metric):
    x, codebook = launcher_inputs(n, k, d, dtype, metric, seed=n * 1000 + k * 10 + d)
    indices, distances = forward(x, codebook, None, metric, "ieee")
    check_launcher_against_oracle(x, codebook, indices, distances, metric)
    check_against_reference(x, codebook, None, indices, distances, metric)


# Several programs and tiles cost ~1 s each interpreted: every shape in float32, one in 16-bit.
@launcher_test
@pytest.mark.parametrize("dtype, n, k, d", [
    (torch.float32, 7, 37, 17), (torch.float32, 40, 37, 40), (torch.float32, 33, 50, 3),
    (torch.float16, 40, 37, 40), (torch.bfloat16, 40, 37, 40),
], ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_triton_small_blocks_merge_tiles(small_blocks, n, k, d, dtype, metric):
    x, codebook = launcher_inputs(n, k, d, dtype, metric, seed=7)
    indices, distances = forward(x, codebook, None, metric, "ieee")
    check_launcher_against_oracle(x, codebook, indices, distances, metric)
    check_against_reference(x, codebook, None, indices, distances, metric)


@launcher_test
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_triton_precision_and_given_sqnorm(precision):
    x, codebook = launcher_inputs(100, 37, 64, torch.float32, "l2", seed=3)
    indices, distances = forward(x, codebook, None, "l2", precision)
    check_launcher_against_oracle(x, codebook, indices, distances, "l2", precision)
    # A given sqnorm is used as is: shifting it changes the answer exactly like the reference's.
    sqnorm = codebook.float().pow(2).sum(1) + torch.linspace(0, 30, 37, device=DEVICE)
    indices, distances = forward(x, codebook, sqnorm, "l2", "ieee")
    check_against_reference(x, codebook, sqnorm, indices, distances, "l2")
    unshifted, _ = forward(x, codebook, None, "l2", "ieee")
    assert not torch.equal(indices, unshifted)  # the shift mattered


def make_exact_inputs(n, k, d, dtype, metric, seed=0):
    """Inputs whose scores are exact in float32 whatever the summation order (so equal codes
    tie exactly, also under the interpreter, whose np.matmul rounds identical columns
    differently): small integers for l2, four entries of +-1/2 (unit norm) for cosine."""
    generator = torch.Generator().manual_seed(seed)

    def rows(count):
        if metric == "l2":
            return torch.randint(-3, 4, (count, d), generator=generator).float()
        out = torch.zeros(count, d)
        for row in out:
            picked = torch.randperm(d, generator=generator)[:4]
            signs = torch.randint(0, 2, (4,), generator=generator).float() * 2 - 1
            row[picked] = 0.5 * signs
        return out

    return rows(n).to(DEVICE, dtype), rows(k).to(DEVICE, dtype)


@launcher_test
@pytest.mark.parametrize("dtype, metric, blocks", [
    *[(dtype, metric, "default") for dtype in GPU_DTYPES for metric in ("l2", "cosine")],
    (torch.float32, "l2", "small"), (torch.float32, "cosine", "small"),
    (torch.bfloat16, "l2", "small"),
], ids=str)
def test_triton_ties_go_to_lowest_index_across_tiles(request, dtype, metric, blocks):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    x, unique = make_exact_inputs(24, 5, 17, dtype, metric, seed=11)
    # Scores are exact, so the answer is the oracle's first minimum, index for index.
    for codebook in (
        unique[(torch.arange(40) % 5).to(DEVICE)],  # each code 8 times, over every 16-code tile
        make_exact_inputs(0, 37, 17, dtype, metric, seed=12)[1],  # distinct codes, equal scores
        unique[:1].expand(40, -1).contiguous(),  # one code: every row ties on all 40
    ):
        indices, distances = forward(x, codebook, None, metric, "ieee")
        oracle = reference.nearest_code_oracle(x.cpu(), codebook.cpu(), metric)
        best, first_best = oracle.min(dim=1)  # torch returns the first minimal index
        assert torch.equal(indices.cpu(), first_best), (
            f"ties must go to the lowest index: got {indices.tolist()}, "
            f"expected {first_best.tolist()}")
        torch.testing.assert_close(distances.cpu().double(), best, rtol=0, atol=1e-6)
    # Random duplicates: a code and its copies score bit-identically, so the first copy wins.
    x, unique = launcher_inputs(24, 5, 17, dtype, metric, seed=13)
    codebook = unique[(torch.arange(40) % 5).to(DEVICE)]
    indices, distances = forward(x, codebook, None, metric, "ieee")
    assert bool((indices < 5).all()), f"a tie went to a higher copy: {indices.tolist()}"
    check_launcher_against_oracle(x, codebook, indices, distances, metric)


@launcher_test
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, NaN
@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_triton_non_finite(request, blocks, dtype, metric):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    x, codebook = launcher_inputs(20, 37, 17, dtype, metric, seed=5)
    x[3] = float("nan")  # whole row non-finite: index 0, NaN distance
    x[4, 2] = float("nan")
    x[7] = codebook[0]  # its exact match is about to become a NaN code: must not be taken
    codebook[0, 1] = float("nan")  # never chosen while a row has a finite score
    codebook[20, 0] = float("inf")
    indices, distances = forward(x, codebook, None, metric, "ieee")
    ref_indices, ref_distances = launcher_reference(x, codebook, None, metric)
    assert bool(((indices >= 0) & (indices < 37)).all())
    assert int(indices[3]) == 0 and int(indices[4]) == 0
    assert bool(distances[3].isnan()) and bool(distances[4].isnan())
    finite_rows = [r for r in range(20) if r not in (3, 4)]
    assert not bool(((indices[finite_rows] == 0) | (indices[finite_rows] == 20)).any())
    if INTERPRET:  # the reference's float32 operations, in the same order: the same choice
        assert torch.equal(indices.cpu(), ref_indices.cpu())
    else:  # compiled: fma contraction and another summation order; near-ties may go either way
        clear = clear_rows(x, codebook, metric)
        assert torch.equal(indices.cpu()[clear], ref_indices.cpu()[clear])
    torch.testing.assert_close(distances.cpu(), ref_distances.cpu().float(), rtol=1e-4,
                               atol=1e-4, equal_nan=True)


@launcher_test
def test_triton_strided_inputs():
    x, codebook = launcher_inputs(30, 37, 34, torch.float32, "l2", seed=9)
    x_view, codebook_view = x[::2, ::2], codebook[:, 1::2]  # row and column strides != 1
    indices, distances = forward(x_view, codebook_view, None, "l2", "ieee")
    check_launcher_against_oracle(x_view, codebook_view, indices, distances, "l2")


@launcher_test
def test_triton_launcher_refuses_what_its_kernels_cannot_take():
    """The launcher checks only what no Triton kernel takes (float64, mixed dtypes); shapes and
    values are the public op's to check (test_bad_input.py)."""
    x, codebook = launcher_inputs(4, 3, 8, torch.float32, "l2")
    with pytest.raises(BackendUnavailableError, match=r"x .*float32/float16/bfloat16"):
        forward(x.double(), codebook.double(), None, "l2", "ieee")
    with pytest.raises(TypeError, match="codebook"):
        forward(x, codebook.half(), None, "l2", "ieee")
    empty_indices, empty_distances = forward(x[:0], codebook, None, "l2", "ieee")
    assert empty_indices.shape == (0,) and empty_indices.dtype == torch.int64
    assert empty_distances.shape == (0,) and empty_distances.dtype == torch.float32
    if "triton" in CPU_BACKENDS:  # and through the public op, before any kernel
        with pytest.raises(BackendUnavailableError, match="float64"):
            lgvq_kernels.nearest_code(x.double(), codebook.double(), backend="triton")


gpu_only = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                              reason="GPU-sized shapes: too slow for the interpreter")


@gpu_only
@launcher_test
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("n, k, d", [(1000, 511, 8), (5000, 511, 256), (1000, 1024, 100)])
def test_triton_gpu_larger_shapes(n, k, d, dtype, precision):
    if precision == "tf32" and dtype != torch.float32:
        pytest.skip("precision only changes float32 products")
    x, codebook = launcher_inputs(n, k, d, dtype, "l2", seed=21)
    indices, distances = forward(x, codebook, None, "l2", precision)
    check_launcher_against_oracle(x, codebook, indices, distances, "l2", precision)


@gpu_only
@launcher_test
def test_triton_gpu_autotuned(monkeypatch):
    monkeypatch.setattr(launcher(), "_AUTOTUNE", True)
    for metric in ("l2", "cosine"):
        x, codebook = launcher_inputs(1000, 511, 64, torch.float16, metric, seed=22)
        indices, distances = forward(x, codebook, None, metric, "ieee")
        check_launcher_against_oracle(x, codebook, indices, distances, metric)


# ------------------------------------------------------------------------------------------
# the codebook split: few rows, many codes (the interpreter counts 2 processors and splits
# down to one tile per range, so small shapes take the split and the merge)
# ------------------------------------------------------------------------------------------


def test_split_sizes_the_grid_for_few_rows():
    module = launcher()
    # N = 64 rows (one 64-row block), K = 262144 codes on 132 SMs: 264 programs, 64 at most
    assert module.num_splits(1, 262144, 132, tile=128) == 64
    assert module.num_splits(1000, 262144, 132) == 1  # rows alone fill the GPU
    assert module.num_splits(1, 100, 132, tile=128) == 1  # one tile: nothing to split


@launcher_test
@pytest.mark.skipif(not INTERPRET, reason="the interpreter's split rule (2 processors)")
@pytest.mark.parametrize("dtype, metric", [(torch.float32, "l2"), (torch.float32, "cosine"),
                                           (torch.bfloat16, "l2")], ids=str)
def test_triton_split_codebook_matches_reference(monkeypatch, dtype, metric):
    module = launcher()
    monkeypatch.setattr(module, "_interpreter_blocks", lambda n, k: (16, 16))
    assert module.num_splits(1, 70, 2, 16) == 4  # 5 tiles of 16 codes over 4 ranges: the split
    x, codebook = launcher_inputs(5, 70, 20, dtype, metric, seed=31)
    indices, distances = forward(x, codebook, None, metric, "ieee")
    check_launcher_against_oracle(x, codebook, indices, distances, metric)
    check_against_reference(x, codebook, None, indices, distances, metric)


@launcher_test
@pytest.mark.skipif(not INTERPRET, reason="the interpreter's split rule (2 processors)")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, NaN
def test_triton_split_ties_go_to_lowest_index_across_ranges(monkeypatch):
    monkeypatch.setattr(launcher(), "_interpreter_blocks", lambda n, k: (16, 16))
    x, unique = make_exact_inputs(6, 3, 17, torch.float32, "l2", seed=41)
    # code j and its copies at j + 3, j + 6, ...: every range holds copies of every code
    codebook = unique[(torch.arange(70) % 3).to(DEVICE)].contiguous()
    x[5] = float("nan")  # no finite score in any range: index 0
    indices, distances = forward(x, codebook, None, "l2", "ieee")
    oracle = reference.nearest_code_oracle(x.cpu(), codebook.cpu(), "l2")
    first_best = oracle[:5].min(dim=1).indices
    assert torch.equal(indices.cpu()[:5], first_best)
    assert bool((indices[:5] < 3).all())
    assert int(indices[5]) == 0 and bool(distances[5].isnan())
    ref_indices, ref_distances = reference.nearest_code(x, codebook, None, "l2", "ieee")
    assert torch.equal(indices.cpu(), ref_indices.cpu())
    torch.testing.assert_close(distances.cpu(), ref_distances.cpu().float(), equal_nan=True)


def test_autotune_cap_keeps_the_heuristic_config_first():
    import triton

    module = launcher()
    configs = [triton.Config({"BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"]},
                             num_warps=c["num_warps"], num_stages=c["num_stages"])
               for c in module.GPU_CONFIGS]
    preferred = module._heuristic_config(16384, 16384)
    capped = module.cap_configs(configs, preferred, 3)
    assert len(capped) == 3
    assert capped[0].kwargs == {"BLOCK_N": preferred["BLOCK_N"], "BLOCK_K": preferred["BLOCK_K"]}
    assert len(module.cap_configs(configs, preferred, 0)) == len(configs)
