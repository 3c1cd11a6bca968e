"""The Triton training kernels (straight-through quantizer forward/backward, codebook statistics,
EMA codebook update) against lgvq_kernels.reference and the float64 oracle.

Runs under TRITON_INTERPRET=1 on CPU tensors (set before the kernel modules are imported) or on
a CUDA device; skipped otherwise. Interpreted shapes stay small: ~0.5 ms per interpreted tl op,
and the segment-sum kernels run one program per code, so K = 37 appears in a few cases only.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1 (set before import)",
                allow_module_level=True)
pytest.importorskip("triton")

from lgvq_kernels import reference  # noqa: E402
from lgvq_kernels.triton import codebook_ema as triton_codebook_ema  # noqa: E402
from lgvq_kernels.triton import quantize as triton_quantize  # noqa: E402
from lgvq_kernels.triton.codebook_ema import (  # noqa: E402
    codebook_ema_update_forward_, codebook_statistics_forward)
from lgvq_kernels.triton.quantize import (  # noqa: E402
    quantize_straight_through_backward, quantize_straight_through_forward)

pytestmark = pytest.mark.triton

DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Kernel and reference both accumulate in fp32 and round once to the output dtype: they may
# differ by the fp32 summation order, i.e. by one ulp of the output dtype at most.
OUTPUT_TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-5),  # one ulp: 2^-10
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),  # one ulp: 2^-7
}
# fp32 results (squared error, statistics) against the float64 oracle: sums of <= 65 terms.
ORACLE_TOLERANCE = dict(rtol=1e-5, atol=1e-5)

# (N, K, D): every N in {0, 1, 7, 65}, K in {1, 3, 37}, D in {1, 3, 17, 64}; K = 37 sparingly
# (one interpreted program per code).
SHAPES = [(0, 3, 17), (1, 1, 1), (1, 37, 3), (7, 3, 3), (7, 37, 64), (65, 1, 17),
          (65, 3, 64), (65, 37, 1)]
SHAPE_IDS = [f"n{n}-k{k}-d{d}" for n, k, d in SHAPES]
# The segment-sum kernels (backward, statistics): every shape in float32, K = 37 in one masked
# bfloat16 case only for the low precisions (~1 s per interpreted call at K = 37).
SEGMENT_CASES = [
    pytest.param(n, k, d, dtype, masked,
                 id=f"n{n}-k{k}-d{d}-{str(dtype)[6:]}-{'mask' if masked else 'nomask'}")
    for n, k, d in SHAPES for dtype in DTYPES for masked in (False, True)
    if k < 37 or dtype == torch.float32 or (dtype == torch.bfloat16 and masked and n == 65)
]


def make_inputs(n, k, d, dtype, masked, seed=0):
    """x [n, d], codebook [k, d] in dtype; indices with duplicates and, for k >= 3, an empty
    code (1); mask [n] bool (about 70 % valid) or None."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    codebook = torch.randn(k, d, generator=generator)
    indices = torch.randint(0, max(k - 1, 1), (n,), generator=generator)
    if k >= 3:
        indices[indices >= 1] += 1  # code 1 gets no row
    mask = torch.rand(n, generator=generator) < 0.7 if masked else None
    to_device = (lambda t: None if t is None else t.to(DEVICE))
    return (x.to(DEVICE, dtype), codebook.to(DEVICE, dtype), to_device(indices),
            to_device(mask))


def assert_close(actual, expected, **tolerance):
    """Values within the given tolerance, by default the output tolerance of actual's dtype."""
    tolerance = tolerance or OUTPUT_TOLERANCE[actual.dtype]
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), **tolerance)


def oracle_inputs(*tensors):
    return [None if t is None or not t.is_floating_point() else t.double() for t in tensors]


@pytest.fixture
def small_blocks(monkeypatch):
    """16-wide tiles everywhere: several row programs and partials in the forward, several
    column programs, and several row tiles per code segment, on small shapes."""
    for module in (triton_quantize, triton_codebook_ema):
        monkeypatch.setattr(module, "_block_d", lambda dim: 16)
        monkeypatch.setattr(module, "segment_block_rows", lambda rows, codes: 16)
    monkeypatch.setattr(triton_quantize, "_forward_block_n", lambda rows: 16)
    monkeypatch.setattr(triton_codebook_ema, "_update_block_k", lambda block_d: 16)


# --------------------------------------------------------------------------------------------
# quantize with straight-through
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, k, d", SHAPES, ids=SHAPE_IDS)
def test_forward_matches_reference(n, k, d, dtype, masked):
    x, codebook, indices, mask = make_inputs(n, k, d, dtype, masked, seed=n * 1000 + k * 10 + d)
    quantized, squared_error = quantize_straight_through_forward(x, codebook, indices, mask)
    ref_quantized, ref_squared_error = reference.quantize_straight_through(
        x, codebook, indices, mask)
    assert quantized.dtype == dtype and quantized.shape == (n, d)
    assert torch.equal(quantized, ref_quantized), "quantized must be codebook[indices] exactly"
    assert squared_error.dtype == torch.float32 and squared_error.shape == ()
    assert_close(squared_error, ref_squared_error)
    _, oracle_squared_error = reference.quantize_straight_through(
        *oracle_inputs(x, codebook), indices, mask)
    assert_close(squared_error, oracle_squared_error, **ORACLE_TOLERANCE)


def run_backward(n, k, d, dtype, masked, with_grad_quantized=True, seed=0):
    x, codebook, indices, mask = make_inputs(n, k, d, dtype, masked, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    grad_quantized = torch.randn(n, d, generator=generator).to(DEVICE, dtype) \
        if with_grad_quantized else None
    grad_commitment = torch.tensor(0.75, device=DEVICE)
    grad_codebook_loss = torch.tensor(-1.5, device=DEVICE)
    args = (grad_quantized, grad_commitment, grad_codebook_loss, x, codebook, indices, mask)
    return args, quantize_straight_through_backward(*args)


@pytest.mark.parametrize("n, k, d, dtype, masked", SEGMENT_CASES)
def test_backward_matches_reference(n, k, d, dtype, masked):
    args, (grad_x, grad_codebook) = run_backward(n, k, d, dtype, masked,
                                                 with_grad_quantized=(n + d) % 2 == 0,
                                                 seed=n * 1000 + k * 10 + d)
    ref_grad_x, ref_grad_codebook = reference.quantize_straight_through_backward(*args)
    assert grad_x.dtype == dtype and grad_codebook.dtype == dtype
    assert_close(grad_x, ref_grad_x)
    assert_close(grad_codebook, ref_grad_codebook)
    if k >= 3:  # the code without rows gets an exact zero gradient
        assert bool((grad_codebook[1] == 0).all())


def test_backward_all_rows_masked():
    args, (grad_x, grad_codebook) = run_backward(7, 3, 17, torch.float32, masked=True)
    args = list(args)
    args[-1] = torch.zeros_like(args[-1])
    grad_x, grad_codebook = quantize_straight_through_backward(*args)
    _, squared_error = quantize_straight_through_forward(*args[3:])
    assert torch.equal(grad_x, args[0]), "no valid row: grad_x is grad_quantized"
    assert bool((grad_codebook == 0).all()) and float(squared_error) == 0.0


@pytest.mark.parametrize("with_grad_quantized", [True, False])
def test_out_of_range_rows_are_treated_as_on_cuda(with_grad_quantized):
    """An index outside [0, K) (no host-side check on GPU): the row's quantized output is zeros,
    it adds nothing to the loss, is not counted as valid (even holding NaN), and its grad_x is
    the straight-through gradient alone; the other rows are as if it were masked out."""
    args, _ = run_backward(9, 3, 17, torch.float32, masked=True,
                           with_grad_quantized=with_grad_quantized, seed=5)
    grad_quantized, grad_commitment, grad_codebook_loss, x, codebook, indices, mask = args
    bad = torch.tensor([2, 6], device=DEVICE)
    indices = indices.clone()
    indices[bad] = torch.tensor([-1, 3], device=DEVICE)
    x = x.clone()
    x[2] = float("nan")
    mask = torch.ones_like(mask) if mask is None else mask.clone()
    mask[bad] = True
    quantized, squared_error = quantize_straight_through_forward(x, codebook, indices, mask)
    grad_x, grad_codebook = quantize_straight_through_backward(
        grad_quantized, grad_commitment, grad_codebook_loss, x, codebook, indices, mask)

    # expected: the reference with those rows masked out and pointed at a valid code
    safe_x, safe_indices, safe_mask = x.clone(), indices.clone(), mask.clone()
    safe_x[bad], safe_indices[bad], safe_mask[bad] = 0.0, 0, False
    ref_quantized, ref_error = reference.quantize_straight_through(
        safe_x, codebook, safe_indices, safe_mask)
    ref_grad_x, ref_grad_codebook = reference.quantize_straight_through_backward(
        grad_quantized, grad_commitment, grad_codebook_loss, safe_x, codebook, safe_indices,
        safe_mask)
    keep = torch.ones(9, dtype=torch.bool, device=DEVICE)
    keep[bad] = False
    assert bool((quantized[bad] == 0).all())
    assert_close(quantized[keep], ref_quantized[keep])
    assert torch.isfinite(squared_error) and torch.isfinite(grad_codebook).all()
    assert_close(squared_error, ref_error)
    assert_close(grad_x[keep], ref_grad_x[keep])
    assert_close(grad_codebook, ref_grad_codebook)
    straight = grad_quantized[bad] if with_grad_quantized else torch.zeros(2, 17, device=DEVICE)
    assert torch.equal(grad_x[bad], straight)


# --------------------------------------------------------------------------------------------
# codebook statistics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, k, d, dtype, masked", SEGMENT_CASES)
def test_statistics_match_reference(n, k, d, dtype, masked):
    x, _, indices, mask = make_inputs(n, k, d, dtype, masked, seed=n * 1000 + k * 10 + d)
    stats = codebook_statistics_forward(x, indices, k, mask)
    assert stats.dtype == torch.float32 and stats.shape == (k, d + 1)
    ref_stats = reference.codebook_statistics(x, indices, k, mask)
    assert torch.equal(stats[:, d], ref_stats[:, d]), "counts must be exact"
    assert_close(stats, ref_stats)
    oracle_stats = reference.codebook_statistics(x.double(), indices, k, mask)
    assert_close(stats, oracle_stats, **ORACLE_TOLERANCE)
    if k >= 3:
        assert bool((stats[1] == 0).all()), "the code without rows has zero count and sum"


# --------------------------------------------------------------------------------------------
# several tiles, determinism, layout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, k, d, dtype", [(65, 3, 17, torch.float32),
                                           (65, 3, 17, torch.bfloat16),
                                           (40, 4, 64, torch.float16)],
                         ids=["n65-k3-d17-float32", "n65-k3-d17-bfloat16", "n40-k4-d64-float16"])
def test_small_blocks_merge_tiles(small_blocks, n, k, d, dtype):
    """Segments longer than a row tile, D over several column programs and forward loops."""
    args, (grad_x, grad_codebook) = run_backward(n, k, d, dtype, masked=True, seed=3)
    ref_grad_x, ref_grad_codebook = reference.quantize_straight_through_backward(*args)
    assert_close(grad_x, ref_grad_x)
    assert_close(grad_codebook, ref_grad_codebook)
    x, codebook, indices, mask = args[3:]
    quantized, squared_error = quantize_straight_through_forward(x, codebook, indices, mask)
    ref_quantized, ref_squared_error = reference.quantize_straight_through(
        x, codebook, indices, mask)
    assert torch.equal(quantized, ref_quantized)
    assert_close(squared_error, ref_squared_error)
    stats = codebook_statistics_forward(x, indices, k, mask)
    assert_close(stats, reference.codebook_statistics(x, indices, k, mask))


@pytest.mark.parametrize("blocks", ["default", "small"])
def test_deterministic(request, blocks):
    """Two runs give the same bits (many duplicates: 65 rows on 3 codes, one empty)."""
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    runs = []
    for _ in range(2):
        args, grads = run_backward(65, 3, 17, torch.float32, masked=True, seed=5)
        x, codebook, indices, mask = args[3:]
        forward = quantize_straight_through_forward(x, codebook, indices, mask)
        stats = codebook_statistics_forward(x, indices, 3, mask)
        runs.append((*forward, *grads, stats))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_strided_inputs():
    x, codebook, indices, mask = make_inputs(30, 3, 34, torch.float32, masked=True, seed=9)
    x_view, codebook_view = x[::2, ::2], codebook[:, 1::2]  # row and column strides != 1
    indices, mask = indices[::2], mask[::2]
    grad_quantized = torch.randn(15, 34, device=DEVICE)[:, ::2]
    quantized, squared_error = quantize_straight_through_forward(x_view, codebook_view, indices,
                                                                 mask)
    ref_quantized, ref_squared_error = reference.quantize_straight_through(
        x_view, codebook_view, indices, mask)
    assert torch.equal(quantized, ref_quantized)
    assert_close(squared_error, ref_squared_error)
    args = (grad_quantized, torch.tensor(1.0, device=DEVICE), torch.tensor(0.5, device=DEVICE),
            x_view, codebook_view, indices, mask)
    for got, expected in zip(quantize_straight_through_backward(*args),
                             reference.quantize_straight_through_backward(*args)):
        assert_close(got, expected)
    assert_close(codebook_statistics_forward(x_view, indices, 3, mask),
                 reference.codebook_statistics(x_view, indices, 3, mask))


def test_empty_and_bad_inputs():
    x, codebook, indices, mask = make_inputs(4, 3, 8, torch.float32, masked=True)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64"):
        quantize_straight_through_forward(x.double(), codebook.double(), indices, mask)
    with pytest.raises(TypeError, match="codebook"):
        quantize_straight_through_forward(x, codebook.double(), indices, mask)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64"):
        codebook_statistics_forward(x.double(), indices, 3, mask)
    with pytest.raises(ValueError, match="indices"):
        codebook_statistics_forward(x, indices.int(), 3, mask)
    grads = (torch.tensor(1.0, device=DEVICE), torch.tensor(1.0, device=DEVICE))
    with pytest.raises(TypeError, match="codebook"):
        quantize_straight_through_backward(None, *grads, x, codebook.half(), indices, None)
    # N = 0: right shapes, nothing launched
    quantized, squared_error = quantize_straight_through_forward(x[:0], codebook, indices[:0],
                                                                 None)
    assert quantized.shape == (0, 8) and float(squared_error) == 0.0
    grad_x, grad_codebook = quantize_straight_through_backward(None, *grads, x[:0], codebook,
                                                               indices[:0], None)
    assert grad_x.shape == (0, 8) and torch.equal(grad_codebook, torch.zeros_like(codebook))
    assert torch.equal(codebook_statistics_forward(x[:0], indices[:0], 3, None),
                       torch.zeros(3, 9, device=DEVICE))


# --------------------------------------------------------------------------------------------
# EMA codebook update
# --------------------------------------------------------------------------------------------


def make_ema_state(k, d, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * k, d, generator=generator).to(DEVICE, dtype)
    indices = torch.randint(0, k, (3 * k,), generator=generator).to(DEVICE)
    stats = reference.codebook_statistics(x, indices, k, None)
    cluster_size = (torch.rand(k, generator=generator) * 4).to(DEVICE)
    embed_sum = torch.randn(k, d, generator=generator).to(DEVICE)
    codebook = torch.randn(k, d, generator=generator).to(DEVICE, dtype)
    replacement = torch.randn(k, d, generator=generator).to(DEVICE, dtype)
    return stats, cluster_size, embed_sum, codebook, replacement


def run_ema_both(stats, cluster_size, embed_sum, codebook, decay, eps, dead_threshold,
                 replacement):
    """(triton state, triton dead), (reference state, reference dead) from the same inputs."""
    ours = [cluster_size.clone(), embed_sum.clone(), codebook.clone()]
    theirs = [cluster_size.clone(), embed_sum.clone(), codebook.clone()]
    dead = codebook_ema_update_forward_(stats, *ours, decay, eps, dead_threshold, replacement)
    ref_dead = reference.codebook_ema_update_(stats, *theirs, decay, eps, dead_threshold,
                                              replacement)
    return (ours, dead), (theirs, ref_dead)


@pytest.mark.parametrize("replace", [False, True], ids=["keep", "replace"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k, d", [(1, 3), (37, 17), (3, 64)], ids=["k1-d3", "k37-d17", "k3-d64"])
def test_ema_update_matches_reference(k, d, dtype, replace):
    stats, cluster_size, embed_sum, codebook, replacement = make_ema_state(k, d, dtype, seed=k)
    (ours, dead), (theirs, ref_dead) = run_ema_both(
        stats, cluster_size, embed_sum, codebook, 0.8, 1e-5, 1.0,
        replacement if replace else None)
    assert dead.dtype == torch.bool and dead.shape == (k,)
    assert torch.equal(dead, ref_dead)
    assert_close(ours[0], theirs[0])
    assert_close(ours[1], theirs[1])
    assert_close(ours[2], theirs[2])
    assert ours[2].dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ema_dead_code_replacement(small_blocks, dtype):
    k, d = 37, 17
    stats, cluster_size, embed_sum, codebook, replacement = make_ema_state(k, d, dtype, seed=4)
    cluster_size.fill_(10.0)  # alive ...
    cluster_size[::3] = 0.0  # ... except these: with no new rows they end below the threshold
    stats[::3] = 0.0
    embed_sum[::3] = 0.0  # (kept alive below, a tiny cluster would overflow fp16 otherwise)
    (ours, dead), (theirs, ref_dead) = run_ema_both(
        stats, cluster_size, embed_sum, codebook, 0.9, 1e-5, 0.5, replacement)
    expected_dead = torch.zeros(k, dtype=torch.bool, device=DEVICE)
    expected_dead[::3] = True
    assert torch.equal(dead, expected_dead) and torch.equal(ref_dead, expected_dead)
    assert bool((ours[0][dead] == 1.0).all()), "a replaced code restarts with cluster_size 1"
    assert torch.equal(ours[1][dead], replacement[dead].float())
    for got, expected in zip(ours, theirs):
        assert_close(got, expected)
    # dead_threshold = 0 or no replacement: nothing is dead, however small the cluster
    for threshold, candidates in ((0.0, replacement), (0.5, None)):
        (ours, dead), (theirs, _) = run_ema_both(stats, cluster_size, embed_sum, codebook,
                                                 0.9, 1e-5, threshold, candidates)
        assert not bool(dead.any())
        for got, expected in zip(ours, theirs):
            assert_close(got, expected)


@pytest.mark.parametrize("eps", [1e-5, 0.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ema_total_zero_keeps_codebook(dtype, eps):
    """No vector ever counted: no NaN, the codebook stays as it is."""
    k, d = 3, 17
    _, _, _, codebook, _ = make_ema_state(k, d, dtype, seed=6)
    zeros = torch.zeros(k, d + 1, device=DEVICE)
    cluster_size = torch.zeros(k, device=DEVICE)
    embed_sum = torch.zeros(k, d, device=DEVICE)
    original = codebook.clone()
    dead = codebook_ema_update_forward_(zeros, cluster_size, embed_sum, codebook, 0.99, eps, 0.0,
                                        None)
    assert not bool(dead.any())
    assert torch.equal(codebook, original)
    assert bool((cluster_size == 0).all()) and bool((embed_sum == 0).all())


def test_ema_deterministic_and_bad_inputs():
    stats, cluster_size, embed_sum, codebook, replacement = make_ema_state(37, 17,
                                                                           torch.float32, seed=8)
    results = []
    for _ in range(2):
        state = [cluster_size.clone(), embed_sum.clone(), codebook.clone()]
        dead = codebook_ema_update_forward_(stats, *state, 0.9, 1e-5, 1.0, replacement)
        results.append((*state, dead))
    for first, second in zip(*results):
        assert torch.equal(first, second)
    with pytest.raises(TypeError, match="embed_sum"):
        codebook_ema_update_forward_(stats, cluster_size, embed_sum.double(), codebook, 0.9,
                                     1e-5, 0.0, None)
    with pytest.raises(TypeError, match="codebook"):
        codebook_ema_update_forward_(stats, cluster_size, embed_sum, codebook.double(), 0.9,
                                     1e-5, 0.0, None)
    with pytest.raises(ValueError, match="stats"):
        codebook_ema_update_forward_(stats[:, :-1], cluster_size, embed_sum, codebook, 0.9,
                                     1e-5, 0.0, None)
