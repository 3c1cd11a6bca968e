"""nearest_code on every backend against the float64 oracle, plus registration checks
(opcheck, gradcheck, torch.compile, autocast) and bad-input errors."""

import itertools
import math

import pytest
import torch

import lgvq_kernels
from lgvq_kernels import reference
from lgvq_kernels._backends import BackendUnavailableError

CPU_BACKENDS = [n for n, i in lgvq_kernels.available_backends("cpu").items() if i.available]
FAST_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "triton"]  # triton = interpreter on CPU
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
NS, KS, DS = (0, 1, 7, 1000), (1, 3, 511), (1, 3, 8, 17, 64, 256)


def _devices_backends():
    pairs = [("cpu", b) for b in CPU_BACKENDS]
    if torch.cuda.is_available():
        pairs += [pytest.param("cuda", b, marks=pytest.mark.cuda)
                  for b, i in lgvq_kernels.available_backends("cuda").items() if i.available]
    return pairs


def _supports(backend: str, dtype: torch.dtype) -> bool:
    return not (backend == "triton" and dtype == torch.float64)


def make_inputs(n, k, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype).to(device)
    codebook = torch.randn(k, d, generator=g).to(dtype).to(device)
    return x, codebook


def error_bound(x, codebook, metric):
    """Per-row bound on the float32-accumulation error of a distance: ~D ulps of the scale."""
    d = x.shape[1]
    if metric == "cosine":
        return torch.full((x.shape[0],), 8 * d * 2.0**-23 + 1e-6, dtype=torch.float64)
    xd, cd = x.double().cpu(), codebook.double().cpu()
    scale = (xd * xd).sum(1) + (cd * cd).sum(1).max()
    return 8 * d * 2.0**-23 * scale + 1e-6


def assert_matches_oracle(x, codebook, metric, indices, distances):
    """The chosen code is optimal within the error bound; where the top-2 gap is clear the index
    is exactly the oracle's; the reported distance is the oracle distance at that index."""
    n, k = x.shape[0], codebook.shape[0]
    assert indices.dtype == torch.int64 and indices.shape == (n,)
    assert distances.shape == (n,)
    if n == 0:
        return
    indices, distances = indices.cpu(), distances.cpu().double()
    assert int(indices.min()) >= 0 and int(indices.max()) < k
    oracle = reference.nearest_code_oracle(x.cpu(), codebook.cpu(), metric)
    bound = error_bound(x, codebook, metric)
    best, best_index = oracle.min(1)
    chosen = oracle.gather(1, indices[:, None]).squeeze(1)
    excess = chosen - best
    assert bool((excess <= bound).all()), f"suboptimal choice: max excess {excess.max():.3g}"
    assert torch.allclose(distances, chosen, rtol=0, atol=0) or bool(
        ((distances - chosen).abs() <= bound).all()), \
        f"distance error {(distances - chosen).abs().max():.3g} > bound"
    if k > 1:
        second = oracle.topk(2, dim=1, largest=False).values[:, 1]
        clear = (second - best) > 2 * bound
        assert torch.equal(indices[clear], best_index[clear])


GRID = [(n, k, d) for n, k, d in itertools.product(NS, KS, DS)]


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", GRID)
def test_oracle_grid_cpu(backend, dtype, metric, n, k, d):
    x, codebook = make_inputs(n, k, d, dtype, seed=n * 7 + k * 3 + d)
    result = lgvq_kernels.nearest_code(x, codebook, metric=metric, backend=backend)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert result.distances.dtype == expected_dtype
    assert_matches_oracle(x, codebook, metric, result.indices, result.distances)


TRITON_GRID = [(0, 3, 8), (1, 1, 1), (7, 3, 17), (33, 70, 64)]


@pytest.mark.triton
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter unavailable")
@pytest.mark.parametrize("dtype", DTYPES[:3], ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", TRITON_GRID)
def test_oracle_grid_triton_interpreter(dtype, metric, n, k, d):
    x, codebook = make_inputs(n, k, d, dtype, seed=n + k + d)
    result = lgvq_kernels.nearest_code(x, codebook, metric=metric, backend="triton")
    assert_matches_oracle(x, codebook, metric, result.indices, result.distances)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", DTYPES[:3], ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", [(0, 3, 8), (1, 1, 1), (7, 3, 17), (1000, 511, 256),
                                   (4099, 1024, 8), (513, 2049, 3)])
def test_oracle_grid_cuda(backend, dtype, metric, n, k, d):
    x, codebook = make_inputs(n, k, d, dtype, device="cuda", seed=n + k + d)
    result = lgvq_kernels.nearest_code(x, codebook, metric=metric, backend=backend)
    assert result.indices.device.type == "cuda"
    assert_matches_oracle(x, codebook, metric, result.indices, result.distances)


@pytest.mark.parametrize("device,backend", _devices_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_go_to_lowest_index(device, backend, dtype):
    if not _supports(backend, dtype):
        pytest.skip("float64 is not a Triton dtype")
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


@pytest.mark.parametrize("device,backend", _devices_backends())
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


@pytest.mark.parametrize("device,backend", _devices_backends())
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


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_native_agrees_with_reference_on_large_random_problem(backend):
    # Exercises the multi-tile paths (K > one GEMM tile, N > one row block) of the native kernel.
    for d in (8, 40, 130):
        x, codebook = make_inputs(1500, 2500, d, torch.float32, seed=d)
        result = lgvq_kernels.nearest_code(x, codebook, backend=backend)
        assert_matches_oracle(x, codebook, "l2", result.indices, result.distances)


# ------------------------------------------------------------------------------------------
# registration: opcheck, gradcheck, compile, autocast
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_opcheck(backend, metric):
    x, codebook = make_inputs(9, 5, 16, torch.float32)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=-1)
        codebook = torch.nn.functional.normalize(codebook, dim=-1)
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


@pytest.mark.parametrize("backend", [b for b in FAST_CPU_BACKENDS])
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
# backends and bad input
# ------------------------------------------------------------------------------------------


def test_available_backends_explains_every_backend():
    info = lgvq_kernels.available_backends("cpu")
    assert set(info) == {"reference", "native", "triton"}
    assert info["reference"].available
    for name, entry in info.items():
        assert entry.available or entry.reason, f"{name} unavailable without a reason"


def test_auto_never_picks_the_triton_interpreter(monkeypatch):
    monkeypatch.delenv("LGVQ_BACKEND", raising=False)
    assert lgvq_kernels.resolve_backend("auto", "cpu") in ("native", "reference")


def test_env_override_and_unavailable_backend(monkeypatch):
    monkeypatch.setenv("LGVQ_BACKEND", "reference")
    assert lgvq_kernels.resolve_backend("auto", "cpu") == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="triton.*TRITON_INTERPRET"):
        lgvq_kernels.resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        lgvq_kernels.nearest_code(torch.randn(2, 3), torch.randn(4, 3), backend="fastest")


@pytest.mark.parametrize(
    "x,codebook,kwargs,error,pattern",
    [
        (torch.randn(4, 3), torch.randn(5, 3, 1), {}, ValueError, "codebook must have 2 dim"),
        (torch.randn(4, 3), torch.randn(5, 2), {}, ValueError, "last dimension 3.*D=2"),
        (torch.randn(4, 3), torch.randn(0, 3), {}, ValueError, "at least one code"),
        (torch.randn(()), torch.randn(5, 3), {}, ValueError, "x must have at least 1"),
        (torch.ones(4, 3, dtype=torch.int64), torch.randn(5, 3), {}, TypeError, "x must have dtype"),
        (torch.randn(4, 3), torch.ones(5, 3, dtype=torch.int32), {}, TypeError,
         "codebook must have dtype"),
        ([[1.0, 2.0]], torch.randn(5, 2), {}, TypeError, "x must be a torch.Tensor"),
        (torch.randn(4, 3), torch.randn(5, 3), {"metric": "dot"}, ValueError, "metric must be"),
        (torch.randn(4, 3), torch.randn(5, 3), {"precision": "fp8"}, ValueError, "precision"),
        (torch.randn(4, 3), torch.randn(5, 3), {"codebook_sqnorm": torch.randn(4)}, ValueError,
         r"codebook_sqnorm must have shape \[5\]"),
        (torch.randn(4, 3), torch.randn(5, 3),
         {"metric": "cosine", "codebook_sqnorm": torch.randn(5)}, ValueError, "l2"),
        (torch.randn(4, 3), torch.randn(5, 3, device="meta"), {}, ValueError, "one device"),
    ],
)
def test_bad_input_raises_named_errors(x, codebook, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        lgvq_kernels.nearest_code(x, codebook, **kwargs)


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
    with pytest.raises(ValueError, match="same dtype"):
        torch.ops.lgvq_C.nearest_code(torch.randn(3, 4), torch.randn(2, 4).double(), None, False)
    with pytest.raises(ValueError, match="codebook_sqnorm must be"):
        torch.ops.lgvq_C.nearest_code(torch.randn(3, 4), torch.randn(2, 4), torch.randn(3), False)
