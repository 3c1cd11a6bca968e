"""quantize_straight_through, codebook_statistics and codebook_ema_update_ through the public
API on every usable backend: against a plain-autograd float64 oracle, gradcheck, opcheck,
torch.compile, autocast, determinism and bad input."""

import pytest
import torch

import lgvq_kernels

OPS = ("quantize_straight_through", "codebook_statistics", "codebook_ema_update_")


def _backends(op, device="cpu"):
    names = []
    for name in lgvq_kernels.BACKENDS:
        try:
            lgvq_kernels.resolve_backend(name, device, op)
        except lgvq_kernels.BackendUnavailableError:
            continue
        names.append(name)
    return names


QUANTIZE_BACKENDS = _backends("quantize_straight_through")
STATS_BACKENDS = _backends("codebook_statistics")
EMA_BACKENDS = _backends("codebook_ema_update_")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(0, 3, 4), (1, 1, 1), (7, 3, 17), (300, 37, 64)]


def _small(backend, n):
    return backend == "triton" and n > 100  # the interpreter is slow


def _skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 is not a Triton dtype")


def make_problem(n, k, d, dtype, seed=0, with_mask=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    codebook = torch.randn(k, d, generator=g).to(dtype)
    indices = torch.randint(0, k, (n,), generator=g)
    mask = (torch.rand(n, generator=g) > 0.3) if with_mask else None
    return x, codebook, indices, mask


def oracle_quantize(x, codebook, indices, mask):
    """The straight-through quantizer written with plain autograd in float64."""
    e = codebook.index_select(0, indices)
    quantized = x + (e - x).detach()
    weight = torch.ones(x.shape[0], dtype=x.dtype) if mask is None else mask.to(x.dtype)
    denominator = max(float(weight.sum()) * x.shape[1], 1.0)
    commitment = (((x - e.detach()) ** 2).sum(1) * weight).sum() / denominator
    codebook_loss = (((x.detach() - e) ** 2).sum(1) * weight).sum() / denominator
    return quantized, commitment, codebook_loss


def tolerance(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5,
            torch.bfloat16: 1e-5}[dtype]  # accumulation is float32 whatever the input dtype


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_quantize_forward_and_backward_match_oracle(backend, dtype, with_mask, n, k, d):
    _skip_unsupported(backend, dtype)
    if _small(backend, n):
        pytest.skip("large shape on the Triton interpreter")
    x, codebook, indices, mask = make_problem(n, k, d, dtype, seed=n + d, with_mask=with_mask)
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
    tol = tolerance(dtype)
    torch.testing.assert_close(out.commitment_loss.double(), commitment.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(out.codebook_loss.double(), codebook_loss.detach(), rtol=tol,
                               atol=tol)
    grad_tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else tol  # grads are stored in x.dtype
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=grad_tol, atol=grad_tol)
    torch.testing.assert_close(codebook.grad.double(), cd.grad, rtol=grad_tol, atol=grad_tol)


@pytest.mark.parametrize("backend", [b for b in QUANTIZE_BACKENDS if b != "triton"])
def test_quantize_gradcheck(backend):
    x, codebook, indices, mask = make_problem(9, 4, 5, torch.float64, with_mask=True)
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
    x, codebook, indices, mask = make_problem(11, 5, 6, torch.float32, with_mask=True)
    for requires_grad in (False, True):
        args = (x.clone().requires_grad_(requires_grad),
                codebook.clone().requires_grad_(requires_grad), indices, mask, backend)
        torch.library.opcheck(torch.ops.lgvq.quantize_straight_through.default, args)
    grads = (torch.randn(11, 6), torch.tensor(0.5), torch.tensor(2.0))
    torch.library.opcheck(torch.ops.lgvq.quantize_straight_through_backward.default,
                          (*grads, x, codebook, indices, mask, backend))


@pytest.mark.parametrize("backend", STATS_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_statistics_match_oracle_and_are_deterministic(backend, dtype, with_mask, n, k, d):
    _skip_unsupported(backend, dtype)
    if _small(backend, n):
        pytest.skip("large shape on the Triton interpreter")
    x, _, indices, mask = make_problem(n, k, d, dtype, seed=k + d, with_mask=with_mask)
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
    if backend == "triton" and state_dtype == torch.float64:
        pytest.skip("float64 is not a Triton dtype")
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


@pytest.mark.parametrize("backend", [b for b in EMA_BACKENDS if b != "triton"])
def test_statistics_and_ema_opcheck(backend):
    x, _, indices, mask = make_problem(12, 5, 3, torch.float32, with_mask=True)
    torch.library.opcheck(torch.ops.lgvq.codebook_statistics.default,
                          (x, indices, 5, mask, backend))
    stats = lgvq_kernels.codebook_statistics(x, indices, 5, backend=backend)
    args = (stats, torch.ones(5), torch.randn(5, 3), torch.randn(5, 3), 0.9, 1e-5, 0.5,
            torch.randn(5, 3), backend)
    torch.library.opcheck(torch.ops.lgvq.codebook_ema_update_.default, args)


@pytest.mark.parametrize("backend", [b for b in QUANTIZE_BACKENDS if b != "triton"])
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

    x, codebook, _, _ = make_problem(40, 9, 8, torch.float32)
    states = [(torch.ones(9), codebook.clone(), codebook.clone()) for _ in range(2)]
    results = []
    for fn, state in zip((step, torch.compile(step, fullgraph=True, backend="aot_eager")), states):
        xi = x.clone().requires_grad_(True)
        loss = fn(xi, codebook, *state)
        loss.backward()
        results.append((loss.detach(), xi.grad, *state))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("backend", [b for b in QUANTIZE_BACKENDS if b != "triton"])
def test_quantize_under_autocast_accumulates_in_float32(backend):
    x, codebook, indices, _ = make_problem(20, 6, 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lgvq_kernels.quantize_straight_through(x.bfloat16(), codebook, indices,
                                                     backend=backend)
    assert out.commitment_loss.dtype == torch.float32
    expected = ((x.bfloat16().float() - codebook[indices]) ** 2).mean()
    torch.testing.assert_close(out.commitment_loss, expected)


@pytest.mark.parametrize("call,error,pattern", [
    (lambda: lgvq_kernels.quantize_straight_through(torch.randn(4, 3), torch.randn(5, 3),
                                                    torch.zeros(4, dtype=torch.int32)),
     TypeError, "indices must have dtype"),
    (lambda: lgvq_kernels.quantize_straight_through(torch.randn(4, 3), torch.randn(5, 3),
                                                    torch.zeros(3, dtype=torch.int64)),
     ValueError, r"indices must have shape \(4,\)"),
    (lambda: lgvq_kernels.quantize_straight_through(torch.randn(4, 3), torch.randn(5, 2),
                                                    torch.zeros(4, dtype=torch.int64)),
     ValueError, "same D"),
    (lambda: lgvq_kernels.quantize_straight_through(torch.randn(4, 3), torch.randn(5, 3),
                                                    torch.zeros(4, dtype=torch.int64),
                                                    mask=torch.ones(4)),
     TypeError, "mask must have dtype"),
    (lambda: lgvq_kernels.codebook_statistics(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64),
                                              0), ValueError, "num_codes must be a positive"),
    (lambda: lgvq_kernels.codebook_ema_update_(torch.zeros(5, 4), torch.ones(5), torch.zeros(5, 3),
                                               torch.zeros(5, 3), decay=1.5),
     ValueError, r"decay must be in \[0, 1\]"),
    (lambda: lgvq_kernels.codebook_ema_update_(torch.zeros(5, 3), torch.ones(5), torch.zeros(5, 3),
                                               torch.zeros(5, 3), decay=0.9),
     ValueError, r"stats must have shape \(5, 4\)"),
    (lambda: lgvq_kernels.codebook_ema_update_(torch.zeros(5, 4), torch.ones(5), torch.zeros(5, 3),
                                               torch.zeros(3, 5).t(), decay=0.9),
     ValueError, "codebook must be contiguous"),
])
def test_bad_input(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_out_of_range_indices_raise_instead_of_reading_out_of_bounds(backend):
    x, codebook = torch.randn(4, 3), torch.randn(5, 3)
    for bad in (5, -1):
        indices = torch.tensor([0, 1, bad, 2])
        with pytest.raises(ValueError, match=rf"indices must lie in \[0, 5\), found {bad}"):
            lgvq_kernels.quantize_straight_through(x, codebook, indices, backend=backend)
        with pytest.raises(ValueError, match=rf"indices must lie in \[0, 5\), found {bad}"):
            lgvq_kernels.codebook_statistics(x, indices, 5, backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (300, 37, 64), (4099, 1024, 256)])
def test_training_ops_on_cuda_match_the_cpu_reference(backend, dtype, n, k, d):
    x, codebook, indices, mask = make_problem(n, k, d, dtype, seed=n + k, with_mask=True)
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
