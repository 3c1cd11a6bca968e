"""The training ops (quantize_straight_through and its backward, codebook_statistics,
codebook_ema_update_) on every backend.

First the public ops on every usable backend against a plain-autograd float64 oracle, with
gradcheck, opcheck, torch.compile and autocast. Then each backend's kernels called directly
(native on CPU tensors; Triton under TRITON_INTERPRET=1 on CPU tensors, or on a GPU) against
lgvq_kernels.reference, in float64 and on the same inputs: one test per property, each backend
with its own cases (interpreted shapes stay small: ~0.5 ms per interpreted tl op, and the
segment-sum kernels run one program per code, so K = 37 appears in a few Triton cases only).
Last what belongs to one backend: the native kernels' threads, schemas and own checks, the
Triton kernels' tiles. Bad input on every backend: test_bad_input.py.
"""

import itertools

import pytest
import torch

import lgvq_kernels
from lgvq_kernels import reference
from lgvq_kernels._backends import BackendUnavailableError, implementation
from lgvq_kernels.reference import compute_dtype
from tests.utils import (FLOAT32_ORACLE_TOLERANCE, FLOAT_DTYPES, GPU_DTYPES, LOSS_TOLERANCE,
                         LOW_PRECISION_GRAD_TOLERANCE, NATIVE_CHECK_ERRORS, OUTPUT_TOLERANCE,
                         SCALED_RTOL, assert_close, assert_within_scale, fast_backends,
                         float64_copies, kernel_device, skip_unsupported, usable_backends)

QUANTIZE_BACKENDS = usable_backends("quantize_straight_through")
STATS_BACKENDS = usable_backends("codebook_statistics")
EMA_BACKENDS = usable_backends("codebook_ema_update_")
THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _one_thread():
    """Oracle comparisons run on one thread: on a loaded 2-core machine each OpenMP region of the
    reference and of the kernels can wait for a time slice (measured 15-250 ms per small call
    instead of 0.05 ms). test_native_deterministic_across_runs_and_threads runs the threaded
    paths and demands the same bits as one thread."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(THREADS)


def make_inputs(n, k, d, dtype, masked=False, pattern="random", seed=0, device="cpu"):
    """x [n, d] and codebook [k, d] in dtype, indices [n] and mask [n] bool (about 70 % valid)
    or None. pattern: "random" codes; "skip_code_1": random, but code 1 gets no row when
    k >= 3; "one_code": every row to the last code; "skip_first": code 0 gets no row, the rest
    many duplicates."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    codebook = torch.randn(k, d, generator=g).to(dtype)
    if pattern == "random":
        indices = torch.randint(0, k, (n,), generator=g)
    elif pattern == "skip_code_1":
        indices = torch.randint(0, max(k - 1, 1), (n,), generator=g)
        if k >= 3:
            indices[indices >= 1] += 1
    elif pattern == "one_code":
        indices = torch.full((n,), k - 1, dtype=torch.int64)
    elif pattern == "skip_first":
        indices = torch.randint(min(1, k - 1), k, (n,), generator=g)
    else:
        raise ValueError(pattern)
    mask = (torch.rand(n, generator=g) < 0.7) if masked else None
    return (x.to(device), codebook.to(device), indices.to(device),
            None if mask is None else mask.to(device))


# ==========================================================================================
# the public ops on every backend
# ==========================================================================================

SHAPES = [(0, 3, 4), (1, 1, 1), (7, 3, 17), (300, 37, 64)]


def _small(backend, n):
    return backend == "triton" and n > 100  # the interpreter is slow


def oracle_quantize(x, codebook, indices, mask):
    """The straight-through quantizer written with plain autograd in float64."""
    e = codebook.index_select(0, indices)
    quantized = x + (e - x).detach()
    weight = torch.ones(x.shape[0], dtype=x.dtype) if mask is None else mask.to(x.dtype)
    denominator = max(float(weight.sum()) * x.shape[1], 1.0)
    commitment = (((x - e.detach()) ** 2).sum(1) * weight).sum() / denominator
    codebook_loss = (((x.detach() - e) ** 2).sum(1) * weight).sum() / denominator
    return quantized, commitment, codebook_loss


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_quantize_forward_and_backward_match_oracle(backend, dtype, with_mask, n, k, d):
    skip_unsupported(backend, dtype)
    if _small(backend, n):
        pytest.skip("large shape on the Triton interpreter")
    x, codebook, indices, mask = make_inputs(n, k, d, dtype, with_mask, seed=n + d)
    x.requires_grad_(True)
    codebook.requires_grad_(True)
    out = lgvq_kernels.quantize_straight_through(x, codebook, indices, mask=mask, backend=backend)
    assert out.quantized.dtype == dtype and out.quantized.shape == x.shape
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(n, d, generator=g).to(dtype)
    total = (out.quantized * upstream).sum() + 0.25 * out.commitment_loss + 1.5 * out.codebook_loss
    total.backward()

    xd = x.detach().double().requires_grad_(True)
    cd = codebook.detach().double().requires_grad_(True)
    q, commitment, codebook_loss = oracle_quantize(xd, cd, indices, mask)
    ((q * upstream.double()).sum() + 0.25 * commitment + 1.5 * codebook_loss).backward()

    assert torch.equal(out.quantized.detach(), codebook.detach()[indices])
    tol = LOSS_TOLERANCE[dtype]
    torch.testing.assert_close(out.commitment_loss.double(), commitment.detach(), rtol=tol,
                               atol=tol)
    torch.testing.assert_close(out.codebook_loss.double(), codebook_loss.detach(), rtol=tol,
                               atol=tol)
    # gradients are stored in x.dtype
    grad_tol = LOW_PRECISION_GRAD_TOLERANCE if dtype in (torch.float16, torch.bfloat16) else tol
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=grad_tol, atol=grad_tol)
    torch.testing.assert_close(codebook.grad.double(), cd.grad, rtol=grad_tol, atol=grad_tol)


@pytest.mark.parametrize("backend", fast_backends("quantize_straight_through"))
def test_quantize_gradcheck(backend):
    x, codebook, indices, mask = make_inputs(9, 4, 5, torch.float64, masked=True)
    x.requires_grad_(True)
    codebook.requires_grad_(True)
    # Each loss differentiates exactly with respect to the input that receives its gradient.
    assert torch.autograd.gradcheck(
        lambda x: lgvq_kernels.quantize_straight_through(
            x, codebook.detach(), indices, mask=mask, backend=backend).commitment_loss, (x,))
    assert torch.autograd.gradcheck(
        lambda c: lgvq_kernels.quantize_straight_through(
            x.detach(), c, indices, mask=mask, backend=backend).codebook_loss, (codebook,))
    # (quantized passes its gradient straight through: checked in the oracle test above)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_quantize_opcheck(backend):
    x, codebook, indices, mask = make_inputs(11, 5, 6, torch.float32, masked=True)
    for requires_grad in (False, True):
        args = (x.clone().requires_grad_(requires_grad),
                codebook.clone().requires_grad_(requires_grad), indices, mask, backend)
        torch.library.opcheck(torch.ops.lgvq.quantize_straight_through.default, args)
    grads = (torch.randn(11, 6), torch.tensor(0.5), torch.tensor(2.0))
    torch.library.opcheck(torch.ops.lgvq.quantize_straight_through_backward.default,
                          (*grads, x, codebook, indices, mask, backend))


@pytest.mark.parametrize("backend", STATS_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_statistics_match_oracle_and_are_deterministic(backend, dtype, with_mask, n, k, d):
    skip_unsupported(backend, dtype)
    if _small(backend, n):
        pytest.skip("large shape on the Triton interpreter")
    x, _, indices, mask = make_inputs(n, k, d, dtype, with_mask, seed=k + d)
    stats = lgvq_kernels.codebook_statistics(x, indices, k, mask=mask, backend=backend)
    assert stats.shape == (k, d + 1)
    weight = torch.ones(n, dtype=torch.float64) if mask is None else mask.double()
    one_hot = torch.nn.functional.one_hot(indices, k).double() * weight[:, None]
    expected = torch.cat([one_hot.t() @ x.double(), one_hot.sum(0)[:, None]], 1)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(stats.double(), expected, rtol=tol, atol=tol)
    again = lgvq_kernels.codebook_statistics(x, indices, k, mask=mask, backend=backend)
    assert torch.equal(stats, again), "statistics differ between two identical runs"


def oracle_ema(stats, cluster_size, embed_sum, codebook, decay, eps, threshold, replacement):
    d = codebook.shape[1]
    cluster_size = decay * cluster_size + (1 - decay) * stats[:, d]
    embed_sum = decay * embed_sum + (1 - decay) * stats[:, :d]
    dead = torch.zeros_like(cluster_size, dtype=torch.bool)
    if replacement is not None and threshold > 0:
        dead = cluster_size < threshold
        embed_sum = torch.where(dead[:, None], replacement, embed_sum)
        cluster_size = torch.where(dead, torch.ones_like(cluster_size), cluster_size)
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + len(cluster_size) * eps) * total
    return cluster_size, embed_sum, embed_sum / smoothed[:, None], dead


@pytest.mark.parametrize("backend", EMA_BACKENDS)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dead_threshold", [0.0, 0.5])
def test_ema_update_matches_oracle(backend, state_dtype, dead_threshold):
    skip_unsupported(backend, state_dtype)
    k, d = 13, 7
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, d, generator=g)
    indices = torch.randint(0, 5, (40,), generator=g)  # codes 5..12 receive nothing
    stats = lgvq_kernels.codebook_statistics(x, indices, k, backend="reference").to(state_dtype)
    cluster_size = torch.rand(k, generator=g, dtype=state_dtype)
    embed_sum = torch.randn(k, d, generator=g, dtype=state_dtype)
    codebook = torch.randn(k, d, generator=g)
    replacement = torch.randn(k, d, generator=g)
    expected = oracle_ema(stats.double(), cluster_size.double(), embed_sum.double(), codebook,
                          0.8, 1e-5, dead_threshold, replacement.double())
    dead = lgvq_kernels.codebook_ema_update_(
        stats, cluster_size, embed_sum, codebook, decay=0.8, eps=1e-5,
        dead_threshold=dead_threshold, replacement=replacement, backend=backend)
    tol = 1e-5
    torch.testing.assert_close(cluster_size.double(), expected[0], rtol=tol, atol=tol)
    torch.testing.assert_close(embed_sum.double(), expected[1], rtol=tol, atol=tol)
    torch.testing.assert_close(codebook.double(), expected[2], rtol=tol, atol=tol)
    assert torch.equal(dead, expected[3])
    assert bool(dead[5:].any()) == (dead_threshold > 0)


@pytest.mark.parametrize("backend", EMA_BACKENDS)
def test_ema_never_nan_for_unused_codes_or_empty_batches(backend):
    k, d = 6, 4
    codebook = torch.randn(k, d)
    before = codebook.clone()
    cluster_size = torch.zeros(k)
    embed_sum = torch.zeros(k, d)
    empty = lgvq_kernels.codebook_statistics(torch.zeros(0, d), torch.zeros(0, dtype=torch.int64),
                                             k, backend=backend)
    for _ in range(3):  # total stays 0: the codebook must keep its values, not become 0/0
        lgvq_kernels.codebook_ema_update_(empty, cluster_size, embed_sum, codebook, decay=0.9,
                                          backend=backend)
    assert torch.equal(codebook, before)
    x = torch.randn(10, d)
    stats = lgvq_kernels.codebook_statistics(x, torch.zeros(10, dtype=torch.int64), k,
                                             backend=backend)
    for _ in range(50):  # codes 1..5 never receive a vector
        lgvq_kernels.codebook_ema_update_(stats, cluster_size, embed_sum, codebook, decay=0.9,
                                          backend=backend)
    assert bool(torch.isfinite(codebook).all()) and bool(torch.isfinite(cluster_size).all())


@pytest.mark.parametrize("backend", fast_backends("codebook_ema_update_"))
def test_statistics_and_ema_opcheck(backend):
    x, _, indices, mask = make_inputs(12, 5, 3, torch.float32, masked=True)
    torch.library.opcheck(torch.ops.lgvq.codebook_statistics.default,
                          (x, indices, 5, mask, backend))
    stats = lgvq_kernels.codebook_statistics(x, indices, 5, backend=backend)
    args = (stats, torch.ones(5), torch.randn(5, 3), torch.randn(5, 3), 0.9, 1e-5, 0.5,
            torch.randn(5, 3), backend)
    torch.library.opcheck(torch.ops.lgvq.codebook_ema_update_.default, args)


@pytest.mark.parametrize("backend", fast_backends("quantize_straight_through"))
def test_compiled_training_step_matches_eager(backend):
    torch._dynamo.reset()

    def step(x, codebook, cluster_size, embed_sum, ema_codebook):
        found = lgvq_kernels.nearest_code(x, codebook, backend=backend)
        out = lgvq_kernels.quantize_straight_through(x, codebook, found.indices, backend=backend)
        stats = lgvq_kernels.codebook_statistics(x.detach(), found.indices, codebook.shape[0],
                                                 backend=backend)
        lgvq_kernels.codebook_ema_update_(stats, cluster_size, embed_sum, ema_codebook,
                                          decay=0.9, backend=backend)
        return (out.quantized ** 2).sum() + 0.25 * out.commitment_loss

    x, codebook, _, _ = make_inputs(40, 9, 8, torch.float32)
    states = [(torch.ones(9), codebook.clone(), codebook.clone()) for _ in range(2)]
    results = []
    for fn, state in zip((step, torch.compile(step, fullgraph=True, backend="aot_eager")), states):
        xi = x.clone().requires_grad_(True)
        loss = fn(xi, codebook, *state)
        loss.backward()
        results.append((loss.detach(), xi.grad, *state))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("backend", fast_backends("quantize_straight_through"))
def test_quantize_under_autocast_accumulates_in_float32(backend):
    x, codebook, indices, _ = make_inputs(20, 6, 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lgvq_kernels.quantize_straight_through(x.bfloat16(), codebook, indices,
                                                     backend=backend)
    assert out.commitment_loss.dtype == torch.float32
    expected = ((x.bfloat16().float() - codebook[indices]) ** 2).mean()
    torch.testing.assert_close(out.commitment_loss, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (300, 37, 64), (4099, 1024, 256)])
def test_training_ops_on_cuda_match_the_cpu_reference(backend, dtype, n, k, d):
    x, codebook, indices, mask = make_inputs(n, k, d, dtype, masked=True, seed=n + k)
    xc = x.cuda().requires_grad_(True)
    cc = codebook.cuda().requires_grad_(True)
    out = lgvq_kernels.quantize_straight_through(xc, cc, indices.cuda(), mask=mask.cuda(),
                                                 backend=backend)
    (out.quantized.float().sum() + 0.3 * out.commitment_loss + out.codebook_loss).backward()
    xr = x.clone().requires_grad_(True)
    cr = codebook.clone().requires_grad_(True)
    ref = lgvq_kernels.quantize_straight_through(xr, cr, indices, mask=mask, backend="reference")
    (ref.quantized.float().sum() + 0.3 * ref.commitment_loss + ref.codebook_loss).backward()
    torch.testing.assert_close(out.commitment_loss.cpu(), ref.commitment_loss, rtol=1e-4,
                               atol=1e-5)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(xc.grad.cpu().float(), xr.grad.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(cc.grad.cpu().float(), cr.grad.float(), rtol=tol, atol=tol)
    stats = lgvq_kernels.codebook_statistics(x.cuda(), indices.cuda(), k, backend=backend)
    again = lgvq_kernels.codebook_statistics(x.cuda(), indices.cuda(), k, backend=backend)
    assert torch.equal(stats, again), "CUDA statistics are not deterministic"
    expected = lgvq_kernels.codebook_statistics(x, indices, k, backend="reference")
    torch.testing.assert_close(stats.cpu(), expected, rtol=1e-4, atol=1e-3)
    state = [torch.ones(k), codebook.float().clone(), codebook.float().clone()]
    gpu_state = [t.cuda() for t in state]
    lgvq_kernels.codebook_ema_update_(expected, *state, decay=0.9, backend="reference")
    lgvq_kernels.codebook_ema_update_(stats, *gpu_state, decay=0.9, backend=backend)
    for got, want in zip(gpu_state, state):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


# ==========================================================================================
# each backend's kernels against the reference
# ==========================================================================================

KERNEL_OPS = ("quantize_straight_through", "quantize_straight_through_backward",
              "codebook_statistics", "codebook_ema_update_")
KERNEL_BACKENDS = [name for name in ("native", "triton")
                   if all(name in usable_backends(op, kernel_device(name)) for op in KERNEL_OPS)]


def kernel(op, backend):
    return implementation(op, backend)


def kernel_cases(native=(), triton=(), ids=None):
    """pytest params (backend, *case) for each usable kernel backend, each with its own cases."""
    params = []
    for backend, cases in (("native", native), ("triton", triton)):
        if backend not in KERNEL_BACKENDS:
            continue
        marks = [pytest.mark.triton] if backend == "triton" else []
        for case in cases:
            name = "-".join((backend, *(ids(*case) if ids else map(str, case))))
            params.append(pytest.param(backend, *case, id=name, marks=marks))
    return params


# the backends alone, for tests with one case each
EACH_KERNEL_BACKEND = kernel_cases([()], [()])


def row_case_id(n, k, d, dtype, masked):
    return (f"{n}-{k}-{d}", str(dtype)[6:], "mask" if masked else "nomask")


def kernel_inputs(backend, n, k, d, dtype, masked, pattern="skip_code_1", seed=None):
    seed = n * 1000 + k * 10 + d if seed is None else seed
    return make_inputs(n, k, d, dtype, masked, pattern, seed, kernel_device(backend))


# Native: every shape of the grid in float64 (the oracle's dtype) and float32, with the mask
# alternating between shapes in opposite phase, so every shape meets both paths; a spread of
# shapes, with and without the mask, in the 16-bit types.
NS, KS, DS = (0, 1, 7, 1000), (1, 3, 511), (1, 3, 17, 256)
FULL_SHAPES = list(itertools.product(NS, KS, DS))
HALF_SHAPES = [(0, 3, 17), (1, 1, 1), (7, 3, 3), (7, 511, 256), (1000, 1, 17), (1000, 511, 256),
               (1000, 3, 1)]
NATIVE_ROWS = ([(n, k, d, torch.float64, i % 2 == 0) for i, (n, k, d) in enumerate(FULL_SHAPES)]
               + [(n, k, d, torch.float32, i % 2 == 1) for i, (n, k, d) in enumerate(FULL_SHAPES)]
               + [(n, k, d, dtype, masked) for dtype in (torch.float16, torch.bfloat16)
                  for n, k, d in HALF_SHAPES for masked in (False, True)])
# Triton: every N in {0, 1, 7, 65}, K in {1, 3, 37}, D in {1, 3, 17, 64}; K = 37 sparingly
# (one interpreted program per code).
TRITON_SHAPES = [(0, 3, 17), (1, 1, 1), (1, 37, 3), (7, 3, 3), (7, 37, 64), (65, 1, 17),
                 (65, 3, 64), (65, 37, 1)]
TRITON_ROWS = [(n, k, d, dtype, masked) for n, k, d in TRITON_SHAPES for dtype in GPU_DTYPES
               for masked in (False, True)]
# The segment-sum kernels (backward, statistics): every shape in float32, K = 37 in one masked
# bfloat16 case only for the low precisions (~1 s per interpreted call at K = 37).
TRITON_SEGMENT_ROWS = [(n, k, d, dtype, masked) for n, k, d, dtype, masked in TRITON_ROWS
                       if k < 37 or dtype == torch.float32
                       or (dtype == torch.bfloat16 and masked and n == 65)]


@pytest.mark.parametrize("backend, n, k, d, dtype, masked",
                         kernel_cases(NATIVE_ROWS, TRITON_ROWS, ids=row_case_id))
def test_kernel_forward_matches_reference(backend, n, k, d, dtype, masked):
    x, codebook, indices, mask = kernel_inputs(backend, n, k, d, dtype, masked)
    quantized, squared_error = kernel("quantize_straight_through", backend)(x, codebook, indices,
                                                                            mask)
    assert quantized.dtype == dtype and quantized.shape == (n, d)
    assert torch.equal(quantized, codebook[indices]), "quantized must be codebook[indices] exactly"
    assert squared_error.shape == () and squared_error.dtype == compute_dtype(dtype)
    _, same_inputs = reference.quantize_straight_through(x, codebook, indices, mask)
    assert_close(squared_error, same_inputs)
    _, oracle = reference.quantize_straight_through(*float64_copies(x, codebook), indices, mask)
    assert_within_scale(squared_error, oracle, compute_dtype(dtype), "squared_error")
    assert_close(squared_error, oracle, **FLOAT32_ORACLE_TOLERANCE)


def run_backward(backend, n, k, d, dtype, masked, with_grad_quantized, pattern="skip_code_1",
                 seed=None):
    seed = n * 1000 + k * 10 + d if seed is None else seed
    x, codebook, indices, mask = kernel_inputs(backend, n, k, d, dtype, masked, pattern, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    grad_quantized = (torch.randn(n, d, generator=generator).to(x.device, dtype)
                      if with_grad_quantized else None)
    grad_commitment = torch.tensor(0.75, dtype=compute_dtype(dtype), device=x.device)
    grad_codebook_loss = torch.tensor(-1.5, dtype=compute_dtype(dtype), device=x.device)
    args = (grad_quantized, grad_commitment, grad_codebook_loss, x, codebook, indices, mask)
    return args, kernel("quantize_straight_through_backward", backend)(*args)


def check_backward(args, grad_x, grad_codebook, dtype):
    """Against the reference on the same inputs (element by element) and in float64 (within
    the scale); a code without rows gets an exact zero gradient."""
    ref_grad_x, ref_grad_codebook = reference.quantize_straight_through_backward(*args)
    oracle_x, oracle_codebook = reference.quantize_straight_through_backward(
        *float64_copies(*args))
    assert grad_x.dtype == dtype and grad_codebook.dtype == dtype
    assert_close(grad_x, ref_grad_x)
    assert_close(grad_codebook, ref_grad_codebook)
    assert_within_scale(grad_x, oracle_x, dtype, "grad_x")
    assert_within_scale(grad_codebook, oracle_codebook, dtype, "grad_codebook")


@pytest.mark.parametrize("backend, n, k, d, dtype, masked",
                         kernel_cases(NATIVE_ROWS, TRITON_SEGMENT_ROWS, ids=row_case_id))
def test_kernel_backward_matches_reference(backend, n, k, d, dtype, masked):
    args, (grad_x, grad_codebook) = run_backward(backend, n, k, d, dtype, masked,
                                                 with_grad_quantized=(n + d) % 2 == 0)
    check_backward(args, grad_x, grad_codebook, dtype)
    if k >= 3:  # the code without rows gets an exact zero gradient
        assert bool((grad_codebook[1] == 0).all())


@pytest.mark.parametrize("backend, n, k, d, dtype, masked",
                         kernel_cases(NATIVE_ROWS, TRITON_SEGMENT_ROWS, ids=row_case_id))
def test_kernel_statistics_match_reference(backend, n, k, d, dtype, masked):
    x, _, indices, mask = kernel_inputs(backend, n, k, d, dtype, masked)
    stats = kernel("codebook_statistics", backend)(x, indices, k, mask)
    assert stats.dtype == compute_dtype(dtype) and stats.shape == (k, d + 1)
    same_inputs = reference.codebook_statistics(x, indices, k, mask)
    oracle = reference.codebook_statistics(x.double(), indices, k, mask)
    assert torch.equal(stats[:, d], same_inputs[:, d]), "counts must be exact"
    assert torch.equal(stats[:, d].double(), oracle[:, d])
    assert_close(stats, same_inputs)
    if n <= 65:  # element by element holds for short sums; longer ones are held to the scale
        assert_close(stats, oracle, **FLOAT32_ORACLE_TOLERANCE)
    assert_within_scale(stats[:, :d], oracle[:, :d], compute_dtype(dtype), "sums")
    if k >= 3:
        assert bool((stats[1] == 0).all()), "the code without rows has zero count and sum"


# Patterns of many duplicates and empty codes at N = 1000: native only (interpreter time).
@pytest.mark.parametrize("backend, pattern, dtype", kernel_cases(
    native=[(p, t) for p in ("one_code", "skip_first")
            for t in (torch.float64, torch.float32, torch.bfloat16)], ids=lambda p, t: (p, str(t))))
def test_kernel_forward_duplicate_and_empty_codes(backend, pattern, dtype):
    x, codebook, indices, mask = kernel_inputs(backend, 1000, 3, 17, dtype, True, pattern, 0)
    quantized, squared_error = kernel("quantize_straight_through", backend)(x, codebook, indices,
                                                                            mask)
    assert torch.equal(quantized, codebook[indices])
    _, oracle = reference.quantize_straight_through(*float64_copies(x, codebook, indices, mask))
    assert_within_scale(squared_error, oracle, compute_dtype(dtype), "squared_error")


@pytest.mark.parametrize("backend, pattern, dtype, with_grad", kernel_cases(
    native=[(p, t, g) for p in ("one_code", "skip_first") for t in FLOAT_DTYPES
            for g in (False, True)], ids=lambda p, t, g: (p, str(t), "grad" if g else "nograd")))
def test_kernel_backward_duplicate_and_empty_codes(backend, pattern, dtype, with_grad):
    args, (grad_x, grad_codebook) = run_backward(backend, 1000, 3, 256, dtype, True, with_grad,
                                                 pattern, seed=0)
    check_backward(args, grad_x, grad_codebook, dtype)
    if pattern == "skip_first":
        assert (grad_codebook[0] == 0).all()
    else:
        assert (grad_codebook[:2] == 0).all()


@pytest.mark.parametrize("backend, pattern, dtype", kernel_cases(
    native=[(p, t) for p in ("one_code", "skip_first")
            for t in (torch.float64, torch.float32, torch.float16)], ids=lambda p, t: (p, str(t))))
def test_kernel_statistics_duplicate_and_empty_codes(backend, pattern, dtype):
    x, _, indices, mask = kernel_inputs(backend, 1000, 511, 17, dtype, True, pattern, 0)
    stats = kernel("codebook_statistics", backend)(x, indices, 511, mask)
    oracle = reference.codebook_statistics(x.double(), indices, 511, mask)
    assert torch.equal(stats[:, 17].double(), oracle[:, 17])
    assert_within_scale(stats[:, :17], oracle[:, :17], compute_dtype(dtype), "sums")


@pytest.mark.parametrize("backend, with_grad", kernel_cases(
    [(False,), (True,)], [(False,), (True,)], ids=lambda g: ("grad" if g else "nograd",)))
def test_kernel_all_rows_masked(backend, with_grad):
    """No valid row: the loss is 0, grad_x is grad_quantized (zeros without one), the codebook
    gradient is zero."""
    args, _ = run_backward(backend, 7, 3, 17, torch.float32, True, with_grad, seed=0)
    args = list(args)
    args[-1] = torch.zeros_like(args[-1])
    grad_q, x, codebook, indices, mask = args[0], *args[3:]
    quantized, squared_error = kernel("quantize_straight_through", backend)(x, codebook, indices,
                                                                            mask)
    assert torch.equal(quantized, codebook[indices])
    assert float(squared_error) == 0.0
    grad_x, grad_codebook = kernel("quantize_straight_through_backward", backend)(*args)
    assert torch.equal(grad_x, grad_q if with_grad else torch.zeros_like(x)), \
        "no valid row: grad_x is grad_quantized"
    assert torch.equal(grad_codebook, torch.zeros_like(codebook))


@pytest.mark.parametrize("backend", EACH_KERNEL_BACKEND)
def test_kernel_backward_grad_quantized_other_dtype_is_converted(backend):
    x, codebook, indices, _ = kernel_inputs(backend, 7, 3, 17, torch.float32, False, seed=0)
    grad_q = torch.randn(7, 17, dtype=torch.float64, device=x.device)
    args = (grad_q, torch.tensor(0.5, device=x.device), torch.tensor(2.0, device=x.device), x,
            codebook, indices, None)
    grad_x, _ = kernel("quantize_straight_through_backward", backend)(*args)
    oracle_x, _ = reference.quantize_straight_through_backward(*float64_copies(*args))
    assert_within_scale(grad_x, oracle_x, torch.float32, "grad_x")


@pytest.mark.parametrize("backend", EACH_KERNEL_BACKEND)
def test_kernel_statistics_more_codes_than_used(backend):
    x, _, indices, _ = kernel_inputs(backend, 7, 3, 5, torch.float32, False, "random", 0)
    stats = kernel("codebook_statistics", backend)(x, indices, 10, None)
    assert stats.shape == (10, 6)
    assert (stats[3:] == 0).all()
    assert stats[:, 5].sum().item() == 7


@pytest.mark.parametrize("backend", EACH_KERNEL_BACKEND)
def test_kernel_strided_inputs(backend):
    """Row and column strides != 1 everywhere: the same bits as on contiguous copies, and the
    reference's values."""
    x, codebook, indices, mask = kernel_inputs(backend, 30, 3, 34, torch.float32, True, seed=9)
    x_view, codebook_view = x[::2, ::2], codebook[:, 1::2]
    indices, mask = indices[::2], mask[::2]
    grad_quantized = torch.randn(15, 34, device=x.device)[:, ::2]
    forward = kernel("quantize_straight_through", backend)
    quantized, squared_error = forward(x_view, codebook_view, indices, mask)
    ref_quantized, ref_squared_error = reference.quantize_straight_through(
        x_view, codebook_view, indices, mask)
    assert torch.equal(quantized, ref_quantized)
    assert_close(squared_error, ref_squared_error)
    contiguous = forward(x_view.contiguous(), codebook_view.contiguous(), indices.contiguous(),
                         mask.contiguous())
    assert torch.equal(quantized, contiguous[0]) and torch.equal(squared_error, contiguous[1])
    grads = (torch.tensor(1.0, device=x.device), torch.tensor(0.5, device=x.device))
    args = (grad_quantized, *grads, x_view, codebook_view, indices, mask)
    for got, expected in zip(kernel("quantize_straight_through_backward", backend)(*args),
                             reference.quantize_straight_through_backward(*args)):
        assert_close(got, expected)
    column_major = x_view.t().contiguous().t()
    assert torch.equal(forward(column_major, codebook_view, indices, mask)[1], squared_error)
    statistics = kernel("codebook_statistics", backend)
    stats = statistics(x_view, indices, 3, mask)
    assert_close(stats, reference.codebook_statistics(x_view, indices, 3, mask))
    assert torch.equal(stats, statistics(x_view.contiguous(), indices.contiguous(), 3,
                                         mask.contiguous()))
    assert torch.equal(stats, statistics(column_major, indices, 3, mask))


# --------------------------------------------------------------------------------------------
# EMA codebook update
# --------------------------------------------------------------------------------------------


def ema_state(k, d, state_dtype, codebook_dtype, seed=0, n=64, device="cpu"):
    """stats from n random rows, a consistent EMA state (a code's sum about its size times its
    vector; every third code never counted), a codebook and replacement candidates."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    indices = torch.randint(0, k, (n,), generator=g)
    stats = reference.codebook_statistics(x.to(state_dtype), indices, k, None)
    cluster_size = torch.rand(k, generator=g).to(state_dtype) * 2
    cluster_size[::3] = 0.0
    embed_sum = (cluster_size[:, None] * torch.randn(k, d, generator=g)).to(state_dtype)
    codebook = torch.randn(k, d, generator=g).to(codebook_dtype)
    replacement = torch.randn(k, d, generator=g).to(codebook_dtype)
    return tuple(t.to(device) for t in (stats, cluster_size, embed_sum, codebook, replacement))


def run_ema(fn, state, decay, eps, threshold, use_replacement):
    """fn on copies of the state: (dead, cluster_size, embed_sum, codebook)."""
    stats, cluster_size, embed_sum, codebook, replacement = (t.clone() for t in state)
    dead = fn(stats, cluster_size, embed_sum, codebook, decay, eps, threshold,
              replacement if use_replacement else None)
    return dead, cluster_size, embed_sum, codebook


EMA_SHAPES_NATIVE = list(itertools.product(KS, DS))
NATIVE_EMA = [(s, c, k, d, r) for s in (torch.float64, torch.float32) for c in FLOAT_DTYPES
              for k, d in EMA_SHAPES_NATIVE for r in (False, True)]
TRITON_EMA = [(torch.float32, c, k, d, r) for c in GPU_DTYPES
              for k, d in ((1, 3), (37, 17), (3, 64)) for r in (False, True)]


@pytest.mark.parametrize("backend, state_dtype, codebook_dtype, k, d, replace", kernel_cases(
    NATIVE_EMA, TRITON_EMA,
    ids=lambda s, c, k, d, r: (str(s)[6:], str(c)[6:], f"k{k}-d{d}", "replace" if r else "keep")))
def test_kernel_ema_matches_reference(backend, state_dtype, codebook_dtype, k, d, replace):
    state = ema_state(k, d, state_dtype, codebook_dtype, seed=k, device=kernel_device(backend))
    threshold = 0.5 if replace else 0.0
    ours = run_ema(kernel("codebook_ema_update_", backend), state, 0.8, 1e-5, threshold, replace)
    theirs = run_ema(reference.codebook_ema_update_, state, 0.8, 1e-5, threshold, replace)
    assert ours[0].dtype == torch.bool and ours[0].shape == (k,)
    assert torch.equal(ours[0], theirs[0])
    assert ours[3].dtype == codebook_dtype
    assert_close(ours[1], theirs[1])
    assert_close(ours[2], theirs[2])
    assert_within_scale(ours[1], theirs[1], state_dtype, "cluster_size")
    assert_within_scale(ours[2], theirs[2], state_dtype, "embed_sum")
    # the codebook is a quotient of state values, then rounded to its own dtype: it carries the
    # error of the less precise of the two
    looser = max(codebook_dtype, state_dtype, key=SCALED_RTOL.get)
    assert_close(ours[3], theirs[3], **OUTPUT_TOLERANCE[looser])
    assert_within_scale(ours[3], theirs[3], codebook_dtype, "codebook", rtol=SCALED_RTOL[looser])


@pytest.mark.parametrize("backend", EACH_KERNEL_BACKEND)
def test_kernel_ema_dead_code_replacement(backend):
    stats, cluster_size, embed_sum, codebook, replacement = ema_state(
        5, 4, torch.float32, torch.float32, device=kernel_device(backend))
    stats.zero_()  # nothing counted in this batch: every code decays
    cluster_size.copy_(torch.tensor([3.0, 0.1, 2.0, 0.0, 0.4]))
    dead = kernel("codebook_ema_update_", backend)(stats, cluster_size, embed_sum, codebook, 0.5,
                                                   1e-5, 0.5, replacement)
    assert dead.tolist() == [False, True, False, True, True]
    assert cluster_size[dead].eq(1).all()
    assert torch.equal(embed_sum[dead], replacement[dead])
    total = cluster_size.sum()
    smoothed = (cluster_size + 1e-5) / (total + 5e-5) * total
    torch.testing.assert_close(codebook, embed_sum / smoothed[:, None])


@pytest.mark.parametrize("backend", EACH_KERNEL_BACKEND)
def test_kernel_ema_no_replacement_without_threshold_or_tensor(backend):
    state = ema_state(6, 3, torch.float32, torch.float32, device=kernel_device(backend))
    for threshold, use in ((0.0, True), (10.0, False)):
        dead, *_ = run_ema(kernel("codebook_ema_update_", backend), state, 0.9, 1e-5, threshold,
                           use)
        assert not dead.any()


EPS_CASES = [(dtype, eps) for eps in (1e-5, 0.0) for dtype in GPU_DTYPES]


@pytest.mark.parametrize("backend, dtype, eps", kernel_cases(
    EPS_CASES, EPS_CASES, ids=lambda dtype, eps: (str(dtype)[6:], f"eps{eps}")))
def test_kernel_ema_total_zero_keeps_codebook(backend, dtype, eps):
    """No vector ever counted: no NaN, the codebook stays as it is."""
    device = kernel_device(backend)
    k, d = 3, 17
    codebook = ema_state(k, d, torch.float32, dtype, seed=6, device=device)[3]
    zeros = torch.zeros(k, d + 1, device=device)
    cluster_size = torch.zeros(k, device=device)
    embed_sum = torch.zeros(k, d, device=device)
    original = codebook.clone()
    dead = kernel("codebook_ema_update_", backend)(zeros, cluster_size, embed_sum, codebook, 0.99,
                                                   eps, 0.0, None)
    assert not bool(dead.any())
    assert torch.equal(codebook, original)
    assert bool((cluster_size == 0).all()) and bool((embed_sum == 0).all())


@pytest.mark.parametrize("backend", EACH_KERNEL_BACKEND)
def test_kernel_ema_empty_code_no_nan_even_without_eps(backend):
    device = kernel_device(backend)
    k, d = 4, 3
    stats = torch.zeros(k, d + 1, device=device)
    stats[0, :d] = torch.tensor([1.0, 2.0, 3.0], device=device)  # only code 0 gets a row
    stats[0, d] = 1.0
    cluster_size, embed_sum = torch.zeros(k, device=device), torch.zeros(k, d, device=device)
    codebook = torch.randn(k, d, device=device)
    before = codebook.clone()
    update = kernel("codebook_ema_update_", backend)
    # eps = 0: the empty codes have smoothed size 0 and keep their value
    update(stats, cluster_size, embed_sum, codebook, 0.5, 0.0, 0.0, None)
    assert torch.isfinite(codebook).all() and torch.equal(codebook[1:], before[1:])
    # eps > 0: they are pulled to embed_sum / smoothed = 0, still finite
    update(stats, cluster_size, embed_sum, codebook, 0.5, 1e-5, 0.0, None)
    assert torch.isfinite(codebook).all() and (codebook[1:] == 0).all()
    torch.testing.assert_close(codebook[0], embed_sum[0] / cluster_size[0], rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", EACH_KERNEL_BACKEND)
def test_kernel_ema_non_contiguous_state_is_updated_in_place(backend):
    state = ema_state(7, 5, torch.float32, torch.float32, device=kernel_device(backend))
    stats, cluster_size, embed_sum, codebook, replacement = state
    expected = run_ema(reference.codebook_ema_update_, state, 0.8, 1e-5, 0.5, True)
    embed_t = embed_sum.t().contiguous().t()  # same values, column-major
    codebook_t = codebook.t().contiguous().t()
    dead = kernel("codebook_ema_update_", backend)(stats, cluster_size, embed_t, codebook_t, 0.8,
                                                   1e-5, 0.5, replacement)
    assert torch.equal(dead, expected[0])
    torch.testing.assert_close(embed_t, expected[2])
    torch.testing.assert_close(codebook_t, expected[3])


@pytest.mark.parametrize("backend", EACH_KERNEL_BACKEND)
def test_kernel_ema_deterministic(backend):
    state = ema_state(37, 17, torch.float32, torch.float32, seed=8, device=kernel_device(backend))
    update = kernel("codebook_ema_update_", backend)
    first, second = (run_ema(update, state, 0.9, 1e-5, 1.0, True) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ==========================================================================================
# the native kernels: threads, schemas, their own checks
# ==========================================================================================

native_only = pytest.mark.skipif("native" not in KERNEL_BACKENDS,
                                 reason="native extension lgvq_kernels._C not built")
ops = torch.ops.lgvq_C


def _all_native_outputs(dtype):
    x, codebook, indices, mask = make_inputs(5000, 64, 33, dtype, True, seed=3)
    indices[:2000] = 7  # one heavy code
    grad_q = torch.randn(5000, 33, generator=torch.Generator().manual_seed(4)).to(dtype)
    forward = ops.quantize_straight_through(x, codebook, indices, mask)
    backward = ops.quantize_straight_through_backward(grad_q, torch.tensor(0.3),
                                                      torch.tensor(1.1), x, codebook, indices,
                                                      mask)
    stats = ops.codebook_statistics(x, indices, 64, mask)
    state = ema_state(64, 33, torch.float32, dtype)
    ema = run_ema(ops.codebook_ema_update_, (stats.float(),) + tuple(state[1:]), 0.9, 1e-5, 0.5,
                  True)
    return [*forward, *backward, stats, *ema]


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_deterministic_across_runs_and_threads(dtype):
    torch.set_num_threads(max(THREADS, 2))
    first = _all_native_outputs(dtype)
    second = _all_native_outputs(dtype)
    torch.set_num_threads(1)
    single = _all_native_outputs(dtype)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


@native_only
def test_native_schemas_match_behaviour():
    x, codebook, indices, mask = make_inputs(7, 3, 5, torch.float32, True)
    state = ema_state(3, 5, torch.float32, torch.float32)
    cases = [
        (ops.quantize_straight_through.default, (x, codebook, indices, mask)),
        (ops.quantize_straight_through_backward.default,
         (torch.randn(7, 5), torch.tensor(1.0), torch.tensor(1.0), x, codebook, indices, mask)),
        (ops.codebook_statistics.default, (x, indices, 3, mask)),
        (ops.codebook_ema_update_.default, (*state[:4], 0.9, 1e-5, 0.5, state[4])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema",))


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


# Direct calls into the compiled ops, past the public ops' validation (torch.compile skips the
# data-dependent index check there): a clean error naming the argument, never a crash.
NATIVE_BAD_INPUTS = [
    (lambda: _forward(x=X[0]), "value", "x must be \\[N, D\\]"),
    (lambda: _forward(codebook=CB[None]), "value", "codebook must be \\[K, D\\]"),
    (lambda: _forward(codebook=torch.randn(3, 5)), "value", "D must match"),
    (lambda: _forward(codebook=CB.double()), "dtype", "same dtype"),
    (lambda: _forward(x=X.int(), codebook=CB.int()), "dtype", "x must be float"),
    (lambda: _forward(indices=IDX.int()), "dtype", "indices must be int64"),
    (lambda: _forward(indices=IDX[:5]), "value", "indices must be \\[N\\]"),
    (lambda: _forward(mask=torch.ones(5, dtype=torch.bool)), "value", "mask must be \\[N\\]"),
    (lambda: _forward(mask=torch.ones(6)), "dtype", "mask must be bool"),
    (lambda: _forward(indices=torch.tensor([0, 1, 2, 3, 1, 0])), "value",
     "indices\\[3\\] = 3"),
    (lambda: _forward(indices=torch.tensor([0, -1, 2, 2, 1, 0])), "value",
     "indices\\[1\\] = -1"),
    (lambda: _backward(grad_q=torch.randn(6, 5)), "value", "grad_quantized must have x's shape"),
    (lambda: _backward(g_commit=torch.ones(2)), "value", "grad_commitment must be a scalar"),
    (lambda: _backward(g_codebook=torch.tensor(1)), "dtype",
     "grad_codebook_loss must be a float"),
    (lambda: _backward(codebook=CB.half()), "dtype", "same dtype"),
    (lambda: _backward(indices=torch.tensor([0, 1, 2, 2**40, 1, 0])), "value",
     "indices\\[3\\] = 1099511627776"),
    (lambda: _stats(num_codes=-1), "value", "num_codes must be >= 0"),
    (lambda: _stats(num_codes=2), "value", "indices\\[2\\] = 2"),
    (lambda: _stats(indices=IDX.float()), "dtype", "indices must be int64"),
    (lambda: _stats(x=X.long()), "dtype", "x must be float"),
    (lambda: _ema(stats=torch.zeros(3, 4)), "value", "stats must be \\[K, D \\+ 1\\]"),
    (lambda: _ema(stats=torch.zeros(3, 5, dtype=torch.int32)), "dtype",
     "stats must be float32 or float64"),
    (lambda: _ema(cluster_size=torch.zeros(4)), "value", "cluster_size must be \\[K\\]"),
    (lambda: _ema(cluster_size=torch.zeros(3, dtype=torch.float16)), "dtype",
     "cluster_size must be float32"),
    (lambda: _ema(embed_sum=torch.zeros(3, 4, dtype=torch.float64)), "dtype",
     "embed_sum .* dtype"),
    (lambda: _ema(embed_sum=torch.zeros(3, 5)), "value", "embed_sum must be \\[K, D\\]"),
    (lambda: _ema(codebook=torch.zeros(3, 4, 1)), "value", "codebook must be \\[K, D\\]"),
    (lambda: _ema(replacement=torch.zeros(2, 4)), "value", "replacement must be \\[K, D\\]"),
]


@native_only
@pytest.mark.parametrize("call,kind,message", NATIVE_BAD_INPUTS,
                         ids=[m for _, _, m in NATIVE_BAD_INPUTS])
def test_native_ops_check_their_own_inputs(call, kind, message):
    with pytest.raises(NATIVE_CHECK_ERRORS[kind], match=message):
        call()


# ==========================================================================================
# the Triton kernels: tiles, rows outside the codebook, what the launchers refuse
# ==========================================================================================

triton_only = pytest.mark.skipif("triton" not in KERNEL_BACKENDS,
                                 reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1 "
                                        "(set before import)")
DEVICE = kernel_device("triton")


def triton_modules():
    from lgvq_kernels.triton import codebook_ema, quantize

    return quantize, codebook_ema


@pytest.fixture
def small_blocks(monkeypatch):
    """16-wide tiles everywhere: several row programs and partials in the forward, several
    column programs, and several row tiles per code segment, on small shapes."""
    quantize, codebook_ema = triton_modules()
    for module in (quantize, codebook_ema):
        monkeypatch.setattr(module, "_block_d", lambda dim: 16)
        monkeypatch.setattr(module, "segment_block_rows", lambda rows, codes: 16)
    monkeypatch.setattr(quantize, "_forward_block_n", lambda rows: 16)
    monkeypatch.setattr(codebook_ema, "_update_block_k", lambda block_d: 16)


@triton_only
@pytest.mark.triton
@pytest.mark.parametrize("with_grad_quantized", [True, False])
def test_triton_out_of_range_rows_are_treated_as_on_cuda(with_grad_quantized):
    """An index outside [0, K) (no host-side check on GPU): the row's quantized output is zeros,
    it adds nothing to the loss, is not counted as valid (even holding NaN), and its grad_x is
    the straight-through gradient alone; the other rows are as if it were masked out."""
    args, _ = run_backward("triton", 9, 3, 17, torch.float32, True, with_grad_quantized, seed=5)
    grad_quantized, grad_commitment, grad_codebook_loss, x, codebook, indices, mask = args
    bad = torch.tensor([2, 6], device=DEVICE)
    indices = indices.clone()
    indices[bad] = torch.tensor([-1, 3], device=DEVICE)
    x = x.clone()
    x[2] = float("nan")
    mask = mask.clone()
    mask[bad] = True
    quantized, squared_error = kernel("quantize_straight_through", "triton")(x, codebook, indices,
                                                                             mask)
    grad_x, grad_codebook = kernel("quantize_straight_through_backward", "triton")(
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


@triton_only
@pytest.mark.triton
@pytest.mark.parametrize("n, k, d, dtype", [(65, 3, 17, torch.float32),
                                           (65, 3, 17, torch.bfloat16),
                                           (40, 4, 64, torch.float16)],
                         ids=["n65-k3-d17-float32", "n65-k3-d17-bfloat16", "n40-k4-d64-float16"])
def test_triton_small_blocks_merge_tiles(small_blocks, n, k, d, dtype):
    """Segments longer than a row tile, D over several column programs and forward loops."""
    args, (grad_x, grad_codebook) = run_backward("triton", n, k, d, dtype, True, True, seed=3)
    ref_grad_x, ref_grad_codebook = reference.quantize_straight_through_backward(*args)
    assert_close(grad_x, ref_grad_x)
    assert_close(grad_codebook, ref_grad_codebook)
    x, codebook, indices, mask = args[3:]
    quantized, squared_error = kernel("quantize_straight_through", "triton")(x, codebook, indices,
                                                                             mask)
    ref_quantized, ref_squared_error = reference.quantize_straight_through(
        x, codebook, indices, mask)
    assert torch.equal(quantized, ref_quantized)
    assert_close(squared_error, ref_squared_error)
    stats = kernel("codebook_statistics", "triton")(x, indices, k, mask)
    assert_close(stats, reference.codebook_statistics(x, indices, k, mask))


@triton_only
@pytest.mark.triton
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_triton_deterministic(request, blocks):
    """Two runs give the same bits (many duplicates: 65 rows on 3 codes, one empty)."""
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    runs = []
    for _ in range(2):
        args, grads = run_backward("triton", 65, 3, 17, torch.float32, True, True, seed=5)
        x, codebook, indices, mask = args[3:]
        forward = kernel("quantize_straight_through", "triton")(x, codebook, indices, mask)
        stats = kernel("codebook_statistics", "triton")(x, indices, 3, mask)
        runs.append((*forward, *grads, stats))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@triton_only
@pytest.mark.triton
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_triton_ema_dead_codes_across_tiles(small_blocks, dtype):
    k, d = 37, 17
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3 * k, d, generator=generator).to(DEVICE, dtype)
    indices = torch.randint(0, k, (3 * k,), generator=generator).to(DEVICE)
    stats = reference.codebook_statistics(x, indices, k, None)
    cluster_size = (torch.rand(k, generator=generator) * 4).to(DEVICE)
    embed_sum = torch.randn(k, d, generator=generator).to(DEVICE)
    codebook = torch.randn(k, d, generator=generator).to(DEVICE, dtype)
    replacement = torch.randn(k, d, generator=generator).to(DEVICE, dtype)
    cluster_size.fill_(10.0)  # alive ...
    cluster_size[::3] = 0.0  # ... except these: with no new rows they end below the threshold
    stats[::3] = 0.0
    embed_sum[::3] = 0.0  # (kept alive below, a tiny cluster would overflow fp16 otherwise)
    state = (stats, cluster_size, embed_sum, codebook, replacement)
    update = kernel("codebook_ema_update_", "triton")
    ours = run_ema(update, state, 0.9, 1e-5, 0.5, True)
    theirs = run_ema(reference.codebook_ema_update_, state, 0.9, 1e-5, 0.5, True)
    expected_dead = torch.zeros(k, dtype=torch.bool, device=DEVICE)
    expected_dead[::3] = True
    assert torch.equal(ours[0], expected_dead) and torch.equal(theirs[0], expected_dead)
    assert bool((ours[1][expected_dead] == 1.0).all()), "a replaced code restarts with size 1"
    assert torch.equal(ours[2][expected_dead], replacement[expected_dead].float())
    for got, expected in zip(ours[1:], theirs[1:]):
        assert_close(got, expected)
    # dead_threshold = 0 or no replacement: nothing is dead, however small the cluster
    for threshold, use in ((0.0, True), (0.5, False)):
        ours = run_ema(update, state, 0.9, 1e-5, threshold, use)
        theirs = run_ema(reference.codebook_ema_update_, state, 0.9, 1e-5, threshold, use)
        assert not bool(ours[0].any())
        for got, expected in zip(ours[1:], theirs[1:]):
            assert_close(got, expected)


@triton_only
@pytest.mark.triton
def test_triton_launchers_refuse_what_their_kernels_cannot_take():
    """Only float64 (BackendUnavailableError) and mixed row dtypes (TypeError); shapes and
    values are the public ops' to check (test_bad_input.py). N = 0 launches nothing."""
    x, codebook, indices, mask = make_inputs(4, 3, 8, torch.float32, True, device=DEVICE)
    quantize = kernel("quantize_straight_through", "triton")
    backward = kernel("quantize_straight_through_backward", "triton")
    statistics = kernel("codebook_statistics", "triton")
    update = kernel("codebook_ema_update_", "triton")
    with pytest.raises(BackendUnavailableError, match=r"x has dtype torch.float64"):
        quantize(x.double(), codebook.double(), indices, mask)
    with pytest.raises(TypeError, match="codebook"):
        quantize(x, codebook.double(), indices, mask)
    with pytest.raises(BackendUnavailableError, match=r"x has dtype torch.float64"):
        statistics(x.double(), indices, 3, mask)
    grads = (torch.tensor(1.0, device=DEVICE), torch.tensor(1.0, device=DEVICE))
    with pytest.raises(TypeError, match="codebook"):
        backward(None, *grads, x, codebook.half(), indices, None)
    state = ema_state(37, 17, torch.float32, torch.float32, seed=8, device=DEVICE)
    stats, cluster_size, embed_sum, ema_codebook, _ = state
    with pytest.raises(BackendUnavailableError, match="embed_sum"):
        update(stats, cluster_size, embed_sum.double(), ema_codebook, 0.9, 1e-5, 0.0, None)
    with pytest.raises(BackendUnavailableError, match="codebook"):
        update(stats, cluster_size, embed_sum, ema_codebook.double(), 0.9, 1e-5, 0.0, None)
    # N = 0: right shapes, nothing launched
    quantized, squared_error = quantize(x[:0], codebook, indices[:0], None)
    assert quantized.shape == (0, 8) and float(squared_error) == 0.0
    grad_x, grad_codebook = backward(None, *grads, x[:0], codebook, indices[:0], None)
    assert grad_x.shape == (0, 8) and torch.equal(grad_codebook, torch.zeros_like(codebook))
    assert torch.equal(statistics(x[:0], indices[:0], 3, None), torch.zeros(3, 9, device=DEVICE))
