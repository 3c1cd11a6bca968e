"""The native CPU training ops (torch.ops.lgvq_C: quantize_straight_through and its backward,
codebook_statistics, codebook_ema_update_) against the float64 reference, plus determinism,
edge cases (empty codes, masks, dead codes) and bad-input errors."""

import itertools

import pytest
import torch

from lgvq_kernels import reference


def _native_available() -> bool:
    try:
        import lgvq_kernels._C  # noqa: F401
    except ImportError:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"lgvq_C::{name}", "CPU")
               for name in ("quantize_straight_through", "quantize_straight_through_backward",
                            "codebook_statistics", "codebook_ema_update_"))


pytestmark = pytest.mark.skipif(not _native_available(),
                                reason="native extension lgvq_kernels._C not built")

ops = torch.ops.lgvq_C
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
NS, KS, DS = (0, 1, 7, 1000), (1, 3, 511), (1, 3, 17, 256)
# Error bound relative to the largest oracle magnitude, keyed by the dtype of the output: low
# precision outputs are dominated by one final rounding, float32 by accumulation.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


# Every shape in float64 (the oracle's dtype) and float32, with the mask alternating between
# shapes in opposite phase, so every shape meets both paths; a spread of shapes, with and without
# the mask, in the 16-bit types.
FULL_SHAPES = list(itertools.product(NS, KS, DS))
HALF_SHAPES = [(0, 3, 17), (1, 1, 1), (7, 3, 3), (7, 511, 256), (1000, 1, 17), (1000, 511, 256),
               (1000, 3, 1)]
CASES = ([(n, k, d, torch.float64, i % 2 == 0) for i, (n, k, d) in enumerate(FULL_SHAPES)]
         + [(n, k, d, torch.float32, i % 2 == 1) for i, (n, k, d) in enumerate(FULL_SHAPES)]
         + [(n, k, d, dtype, masked) for dtype in (torch.float16, torch.bfloat16)
            for n, k, d in HALF_SHAPES for masked in (False, True)])
CASE_IDS = [f"{n}-{k}-{d}-{str(dtype)[6:]}-{'mask' if masked else 'nomask'}"
            for n, k, d, dtype, masked in CASES]
THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _one_thread():
    """Oracle comparisons run on one thread: on a loaded 2-core machine each OpenMP region of the
    reference and of the kernels can wait for a time slice (measured 15-250 ms per small call
    instead of 0.05 ms). test_deterministic_across_runs_and_threads runs the threaded paths and
    demands the same bits as one thread."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(THREADS)


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(n, k, d, dtype, masked=False, pattern="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    codebook = torch.randn(k, d, generator=g).to(dtype)
    if pattern == "random":
        indices = torch.randint(0, k, (n,), generator=g)
    elif pattern == "one_code":  # every row to the last code, all others empty
        indices = torch.full((n,), k - 1, dtype=torch.int64)
    elif pattern == "skip_first":  # code 0 gets no row, the rest many duplicates
        indices = torch.randint(min(1, k - 1), k, (n,), generator=g)
    else:
        raise ValueError(pattern)
    mask = (torch.rand(n, generator=g) < 0.6) if masked else None
    return x, codebook, indices, mask


def assert_close(out, oracle, dtype, what, rtol=None):
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(oracle.shape)}"
    if oracle.numel() == 0:
        return
    out64, ref64 = out.double(), oracle.double()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    rtol = RTOL[dtype] if rtol is None else rtol
    scale = max(ref64.abs().max().item(), 1e-30)
    err = (out64 - ref64).abs().max().item()
    # plus the spacing of subnormals: float16 gradients of large batches fall there
    bound = rtol * scale + torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (scale {scale:.3g})"


def oracle_args(*tensors):
    return [t.double() if t is not None and t.is_floating_point() else t for t in tensors]


# ----------------------------------------------------------------------------------------------
# quantize_straight_through (forward)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k,d,dtype,masked", CASES, ids=CASE_IDS)
def test_forward_matches_reference(n, k, d, dtype, masked):
    x, codebook, indices, mask = make_inputs(n, k, d, dtype, masked)
    quantized, squared_error = ops.quantize_straight_through(x, codebook, indices, mask)
    assert torch.equal(quantized, codebook[indices])  # a gather: exact in every dtype
    assert squared_error.shape == () and squared_error.dtype == compute_dtype(dtype)
    _, oracle = reference.quantize_straight_through(*oracle_args(x, codebook, indices, mask))
    assert_close(squared_error, oracle, compute_dtype(dtype), "squared_error")


@pytest.mark.parametrize("pattern", ["one_code", "skip_first"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_forward_duplicate_and_empty_codes(pattern, dtype):
    x, codebook, indices, mask = make_inputs(1000, 3, 17, dtype, True, pattern)
    quantized, squared_error = ops.quantize_straight_through(x, codebook, indices, mask)
    assert torch.equal(quantized, codebook[indices])
    _, oracle = reference.quantize_straight_through(*oracle_args(x, codebook, indices, mask))
    assert_close(squared_error, oracle, compute_dtype(dtype), "squared_error")


def test_forward_mask_all_false_gives_zero():
    x, codebook, indices, _ = make_inputs(7, 3, 17, torch.float32)
    mask = torch.zeros(7, dtype=torch.bool)
    quantized, squared_error = ops.quantize_straight_through(x, codebook, indices, mask)
    assert torch.equal(quantized, codebook[indices])
    assert squared_error.item() == 0.0


# ----------------------------------------------------------------------------------------------
# quantize_straight_through_backward
# ----------------------------------------------------------------------------------------------


def _backward_case(n, k, d, dtype, masked, with_grad, pattern="random"):
    x, codebook, indices, mask = make_inputs(n, k, d, dtype, masked, pattern)
    g = torch.Generator().manual_seed(1)
    grad_q = torch.randn(n, d, generator=g).to(dtype) if with_grad else None
    g_commit = torch.tensor(0.25, dtype=compute_dtype(dtype))
    g_codebook = torch.tensor(1.5, dtype=compute_dtype(dtype))
    args = (grad_q, g_commit, g_codebook, x, codebook, indices, mask)
    grad_x, grad_codebook = ops.quantize_straight_through_backward(*args)
    oracle_x, oracle_codebook = reference.quantize_straight_through_backward(*oracle_args(*args))
    assert_close(grad_x, oracle_x, dtype, "grad_x")
    assert_close(grad_codebook, oracle_codebook, dtype, "grad_codebook")
    return grad_x, grad_codebook


@pytest.mark.parametrize("n,k,d,dtype,masked", CASES, ids=CASE_IDS)
def test_backward_matches_reference(n, k, d, dtype, masked):
    _backward_case(n, k, d, dtype, masked, with_grad=(n + k + d) % 2 == 0)


@pytest.mark.parametrize("pattern", ["one_code", "skip_first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_grad", [False, True], ids=["nograd", "grad"])
def test_backward_duplicate_and_empty_codes(pattern, dtype, with_grad):
    _, grad_codebook = _backward_case(1000, 3, 256, dtype, True, with_grad, pattern)
    if pattern == "skip_first":
        assert (grad_codebook[0] == 0).all()
    else:
        assert (grad_codebook[:2] == 0).all()


@pytest.mark.parametrize("with_grad", [False, True], ids=["nograd", "grad"])
def test_backward_mask_all_false(with_grad):
    x, codebook, indices, _ = make_inputs(7, 3, 17, torch.float32)
    mask = torch.zeros(7, dtype=torch.bool)
    grad_q = torch.randn(7, 17) if with_grad else None
    grad_x, grad_codebook = ops.quantize_straight_through_backward(
        grad_q, torch.tensor(1.0), torch.tensor(1.0), x, codebook, indices, mask)
    assert torch.equal(grad_x, grad_q if with_grad else torch.zeros(7, 17))
    assert torch.equal(grad_codebook, torch.zeros(3, 17))


def test_backward_grad_quantized_other_dtype_is_converted():
    x, codebook, indices, _ = make_inputs(7, 3, 17, torch.float32)
    grad_q = torch.randn(7, 17, dtype=torch.float64)
    args = (grad_q, torch.tensor(0.5), torch.tensor(2.0), x, codebook, indices, None)
    grad_x, _ = ops.quantize_straight_through_backward(*args)
    oracle_x, _ = reference.quantize_straight_through_backward(*oracle_args(*args))
    assert_close(grad_x, oracle_x, torch.float32, "grad_x")


# ----------------------------------------------------------------------------------------------
# codebook_statistics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k,d,dtype,masked", CASES, ids=CASE_IDS)
def test_statistics_matches_reference(n, k, d, dtype, masked):
    x, _, indices, mask = make_inputs(n, k, d, dtype, masked)
    stats = ops.codebook_statistics(x, indices, k, mask)
    oracle = reference.codebook_statistics(x.double(), indices, k, mask)
    assert stats.shape == (k, d + 1)
    assert torch.equal(stats[:, d].double(), oracle[:, d])  # counts are exact
    assert_close(stats[:, :d], oracle[:, :d], compute_dtype(dtype), "sums")


@pytest.mark.parametrize("pattern", ["one_code", "skip_first"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_statistics_duplicate_and_empty_codes(pattern, dtype):
    x, _, indices, mask = make_inputs(1000, 511, 17, dtype, True, pattern)
    stats = ops.codebook_statistics(x, indices, 511, mask)
    oracle = reference.codebook_statistics(x.double(), indices, 511, mask)
    assert torch.equal(stats[:, 17].double(), oracle[:, 17])
    assert_close(stats[:, :17], oracle[:, :17], compute_dtype(dtype), "sums")


def test_statistics_more_codes_than_used():
    x, _, indices, _ = make_inputs(7, 3, 5, torch.float32)
    stats = ops.codebook_statistics(x, indices, 10, None)
    assert stats.shape == (10, 6)
    assert (stats[3:] == 0).all()
    assert stats[:, 5].sum().item() == 7


# ----------------------------------------------------------------------------------------------
# codebook_ema_update_
# ----------------------------------------------------------------------------------------------


def _ema_state(k, d, state_dtype, codebook_dtype, seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    indices = torch.randint(0, k, (n,), generator=g)
    stats = reference.codebook_statistics(x.to(state_dtype), indices, k, None)
    cluster_size = torch.rand(k, generator=g).to(state_dtype) * 2
    cluster_size[::3] = 0.0  # some codes never counted
    # a consistent state: a code's EMA sum is about its EMA size times its vector
    embed_sum = (cluster_size[:, None] * torch.randn(k, d, generator=g)).to(state_dtype)
    codebook = torch.randn(k, d, generator=g).to(codebook_dtype)
    replacement = torch.randn(k, d, generator=g).to(codebook_dtype)
    return stats, cluster_size, embed_sum, codebook, replacement


def _run_ema(fn, state, decay, eps, threshold, use_replacement):
    stats, cluster_size, embed_sum, codebook, replacement = (t.clone() for t in state)
    dead = fn(stats, cluster_size, embed_sum, codebook, decay, eps, threshold,
              replacement if use_replacement else None)
    return dead, cluster_size, embed_sum, codebook


@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("codebook_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,d", list(itertools.product(KS, DS)))
@pytest.mark.parametrize("dead_codes", [False, True], ids=["keep", "replace"])
def test_ema_matches_reference(state_dtype, codebook_dtype, k, d, dead_codes):
    state = _ema_state(k, d, state_dtype, codebook_dtype)
    threshold = 0.5 if dead_codes else 0.0
    native = _run_ema(ops.codebook_ema_update_, state, 0.8, 1e-5, threshold, dead_codes)
    oracle = _run_ema(reference.codebook_ema_update_, state, 0.8, 1e-5, threshold, dead_codes)
    assert native[0].dtype == torch.bool and torch.equal(native[0], oracle[0])
    assert_close(native[1], oracle[1], state_dtype, "cluster_size")
    assert_close(native[2], oracle[2], state_dtype, "embed_sum")
    # the codebook is a quotient of state values, then rounded to its own dtype
    looser = max(RTOL[codebook_dtype], RTOL[state_dtype])
    assert_close(native[3], oracle[3], codebook_dtype, "codebook", rtol=looser)


def test_ema_dead_code_replacement():
    stats, cluster_size, embed_sum, codebook, replacement = _ema_state(5, 4, torch.float32,
                                                                       torch.float32)
    stats.zero_()  # nothing counted in this batch: every code decays
    cluster_size.copy_(torch.tensor([3.0, 0.1, 2.0, 0.0, 0.4]))
    dead = ops.codebook_ema_update_(stats, cluster_size, embed_sum, codebook, 0.5, 1e-5, 0.5,
                                    replacement)
    assert dead.tolist() == [False, True, False, True, True]
    assert cluster_size[dead].eq(1).all()
    assert torch.equal(embed_sum[dead], replacement[dead])
    total = cluster_size.sum()
    smoothed = (cluster_size + 1e-5) / (total + 5e-5) * total
    torch.testing.assert_close(codebook, embed_sum / smoothed[:, None])


def test_ema_no_replacement_without_threshold_or_tensor():
    state = _ema_state(6, 3, torch.float32, torch.float32)
    for threshold, use in ((0.0, True), (10.0, False)):
        dead, *_ = _run_ema(ops.codebook_ema_update_, state, 0.9, 1e-5, threshold, use)
        assert not dead.any()


def test_ema_total_zero_keeps_codebook_and_no_nan():
    k, d = 4, 3
    stats = torch.zeros(k, d + 1)
    cluster_size, embed_sum = torch.zeros(k), torch.zeros(k, d)
    codebook = torch.randn(k, d)
    before = codebook.clone()
    ops.codebook_ema_update_(stats, cluster_size, embed_sum, codebook, 0.99, 1e-5, 0.0, None)
    assert torch.equal(codebook, before)
    assert torch.isfinite(cluster_size).all() and torch.isfinite(embed_sum).all()


def test_ema_empty_code_no_nan_even_without_eps():
    k, d = 4, 3
    stats = torch.zeros(k, d + 1)
    stats[0, :d], stats[0, d] = torch.tensor([1.0, 2.0, 3.0]), 1.0  # only code 0 gets a row
    cluster_size, embed_sum = torch.zeros(k), torch.zeros(k, d)
    codebook = torch.randn(k, d)
    before = codebook.clone()
    # eps = 0: the empty codes have smoothed size 0 and keep their value
    ops.codebook_ema_update_(stats, cluster_size, embed_sum, codebook, 0.5, 0.0, 0.0, None)
    assert torch.isfinite(codebook).all() and torch.equal(codebook[1:], before[1:])
    # eps > 0: they are pulled to embed_sum / smoothed = 0, still finite
    ops.codebook_ema_update_(stats, cluster_size, embed_sum, codebook, 0.5, 1e-5, 0.0, None)
    assert torch.isfinite(codebook).all() and (codebook[1:] == 0).all()
    torch.testing.assert_close(codebook[0], embed_sum[0] / cluster_size[0], rtol=1e-4, atol=0)


def test_ema_non_contiguous_state_is_updated_in_place():
    stats, cluster_size, embed_sum, codebook, replacement = _ema_state(7, 5, torch.float32,
                                                                       torch.float32)
    expected = _run_ema(reference.codebook_ema_update_,
                        (stats, cluster_size, embed_sum, codebook, replacement), 0.8, 1e-5, 0.5,
                        True)
    embed_t = embed_sum.t().contiguous().t()  # same values, column-major
    codebook_t = codebook.t().contiguous().t()
    dead = ops.codebook_ema_update_(stats, cluster_size, embed_t, codebook_t, 0.8, 1e-5, 0.5,
                                    replacement)
    assert torch.equal(dead, expected[0])
    torch.testing.assert_close(embed_t, expected[2])
    torch.testing.assert_close(codebook_t, expected[3])


# ----------------------------------------------------------------------------------------------
# determinism (run to run, and whatever the number of threads) and layouts
# ----------------------------------------------------------------------------------------------


def _all_outputs(dtype):
    x, codebook, indices, mask = make_inputs(5000, 64, 33, dtype, True, seed=3)
    indices[:2000] = 7  # one heavy code
    grad_q = torch.randn(5000, 33, generator=torch.Generator().manual_seed(4)).to(dtype)
    forward = ops.quantize_straight_through(x, codebook, indices, mask)
    backward = ops.quantize_straight_through_backward(grad_q, torch.tensor(0.3),
                                                      torch.tensor(1.1), x, codebook, indices,
                                                      mask)
    stats = ops.codebook_statistics(x, indices, 64, mask)
    state = _ema_state(64, 33, torch.float32, dtype)
    ema = _run_ema(ops.codebook_ema_update_, (stats.float(),) + tuple(state[1:]), 0.9, 1e-5, 0.5,
                   True)
    return [*forward, *backward, stats, *ema]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_across_runs_and_threads(dtype):
    torch.set_num_threads(max(THREADS, 2))
    first = _all_outputs(dtype)
    second = _all_outputs(dtype)
    torch.set_num_threads(1)
    single = _all_outputs(dtype)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_non_contiguous_inputs():
    x, codebook, indices, mask = make_inputs(9, 4, 6, torch.float32, True)
    xt = x.t().contiguous().t()
    indices_strided = torch.stack([indices, indices], 1)[:, 0]
    mask_strided = torch.stack([mask, mask], 1)[:, 0]
    q, se = ops.quantize_straight_through(xt, codebook, indices_strided, mask_strided)
    q0, se0 = ops.quantize_straight_through(x, codebook, indices, mask)
    assert torch.equal(q, q0) and torch.equal(se, se0)
    s = ops.codebook_statistics(xt, indices_strided, 4, mask_strided)
    assert torch.equal(s, ops.codebook_statistics(x, indices, 4, mask))


def test_schemas_match_behaviour():
    x, codebook, indices, mask = make_inputs(7, 3, 5, torch.float32, True)
    state = _ema_state(3, 5, torch.float32, torch.float32)
    cases = [
        (ops.quantize_straight_through.default, (x, codebook, indices, mask)),
        (ops.quantize_straight_through_backward.default,
         (torch.randn(7, 5), torch.tensor(1.0), torch.tensor(1.0), x, codebook, indices, mask)),
        (ops.codebook_statistics.default, (x, indices, 3, mask)),
        (ops.codebook_ema_update_.default, (*state[:4], 0.9, 1e-5, 0.5, state[4])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema",))


# ----------------------------------------------------------------------------------------------
# bad inputs: a ValueError naming the argument, never a crash
# ----------------------------------------------------------------------------------------------

X, CB = torch.randn(6, 4), torch.randn(3, 4)
IDX = torch.tensor([0, 1, 2, 2, 1, 0])
G1 = torch.tensor(1.0)


def _forward(x=X, codebook=CB, indices=IDX, mask=None):
    return ops.quantize_straight_through(x, codebook, indices, mask)


def _backward(grad_q=None, g_commit=G1, g_codebook=G1, x=X, codebook=CB, indices=IDX, mask=None):
    return ops.quantize_straight_through_backward(grad_q, g_commit, g_codebook, x, codebook,
                                                  indices, mask)


def _stats(x=X, indices=IDX, num_codes=3, mask=None):
    return ops.codebook_statistics(x, indices, num_codes, mask)


def _ema(stats=None, cluster_size=None, embed_sum=None, codebook=None, replacement=None,
         threshold=0.5):
    stats = torch.zeros(3, 5) if stats is None else stats
    cluster_size = torch.zeros(3) if cluster_size is None else cluster_size
    embed_sum = torch.zeros(3, 4) if embed_sum is None else embed_sum
    codebook = torch.zeros(3, 4) if codebook is None else codebook
    return ops.codebook_ema_update_(stats, cluster_size, embed_sum, codebook, 0.9, 1e-5,
                                    threshold, replacement)


BAD_INPUTS = [
    (lambda: _forward(x=X[0]), "x must be \\[N, D\\]"),
    (lambda: _forward(codebook=CB[None]), "codebook must be \\[K, D\\]"),
    (lambda: _forward(codebook=torch.randn(3, 5)), "D must match"),
    (lambda: _forward(codebook=CB.double()), "same dtype"),
    (lambda: _forward(x=X.int(), codebook=CB.int()), "x must be float"),
    (lambda: _forward(indices=IDX.int()), "indices must be int64"),
    (lambda: _forward(indices=IDX[:5]), "indices must be \\[N\\]"),
    (lambda: _forward(mask=torch.ones(5, dtype=torch.bool)), "mask must be \\[N\\]"),
    (lambda: _forward(mask=torch.ones(6)), "mask must be bool"),
    (lambda: _forward(indices=torch.tensor([0, 1, 2, 3, 1, 0])), "indices\\[3\\] = 3"),
    (lambda: _forward(indices=torch.tensor([0, -1, 2, 2, 1, 0])), "indices\\[1\\] = -1"),
    (lambda: _backward(grad_q=torch.randn(6, 5)), "grad_quantized must have x's shape"),
    (lambda: _backward(g_commit=torch.ones(2)), "grad_commitment must be a scalar"),
    (lambda: _backward(g_codebook=torch.tensor(1)), "grad_codebook_loss must be a float"),
    (lambda: _backward(codebook=CB.half()), "same dtype"),
    (lambda: _backward(indices=torch.tensor([0, 1, 2, 2**40, 1, 0])),
     "indices\\[3\\] = 1099511627776"),
    (lambda: _stats(num_codes=-1), "num_codes must be >= 0"),
    (lambda: _stats(num_codes=2), "indices\\[2\\] = 2"),
    (lambda: _stats(indices=IDX.float()), "indices must be int64"),
    (lambda: _stats(x=X.long()), "x must be float"),
    (lambda: _ema(stats=torch.zeros(3, 4)), "stats must be \\[K, D \\+ 1\\]"),
    (lambda: _ema(stats=torch.zeros(3, 5, dtype=torch.int32)), "stats must be float32 or float64"),
    (lambda: _ema(cluster_size=torch.zeros(4)), "cluster_size must be \\[K\\]"),
    (lambda: _ema(cluster_size=torch.zeros(3, dtype=torch.float16)),
     "cluster_size must be float32"),
    (lambda: _ema(embed_sum=torch.zeros(3, 4, dtype=torch.float64)), "embed_sum .* dtype"),
    (lambda: _ema(embed_sum=torch.zeros(3, 5)), "embed_sum must be \\[K, D\\]"),
    (lambda: _ema(codebook=torch.zeros(3, 4, 1)), "codebook must be \\[K, D\\]"),
    (lambda: _ema(replacement=torch.zeros(2, 4)), "replacement must be \\[K, D\\]"),
]


@pytest.mark.parametrize("call,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
