"""The Triton nearest-code launcher against the reference backend and the float64 oracle.

Runs under TRITON_INTERPRET=1 on CPU tensors (set before the kernel module is imported) or on a
CUDA device; skipped otherwise. Interpreted shapes stay small: ~0.5 ms per interpreted tl op.
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
from lgvq_kernels.triton import nearest_code as triton_nearest_code  # noqa: E402
from lgvq_kernels.triton.nearest_code import nearest_code_forward  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Allowed error of a score or distance against the float64 oracle, by dtype.
# l2: relative to |x|^2 + |c|^2 (fp32 accumulation of exact products; tf32 rounds inputs).
# cosine: absolute; the kernel takes the dtype-rounded unit vectors as they are while the oracle
# renormalises them, so the input rounding of the dtype (2^-11, 2^-8) enters.
L2_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
L2_TOLERANCE_TF32 = 2e-3
COSINE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CLEAR_GAP = 4.0  # top-2 gap, in tolerances, above which the index must equal the oracle's


def make_inputs(n, k, d, dtype, metric, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    codebook = torch.randn(k, d, generator=generator)
    if metric == "cosine":  # the op hands the backend unit rows in the input dtype
        x = torch.nn.functional.normalize(x, dim=-1)
        codebook = torch.nn.functional.normalize(codebook, dim=-1)
    return x.to(DEVICE, dtype), codebook.to(DEVICE, dtype)


def check_against_oracle(x, codebook, indices, distances, metric, precision="ieee"):
    """Chosen distance within tolerance of the oracle's minimum; exact index where the top-2
    gap is clear; reported distance close to the oracle's at the chosen index."""
    n, k = x.shape[0], codebook.shape[0]
    assert indices.shape == (n,) and indices.dtype == torch.int64
    assert distances.shape == (n,) and distances.dtype == torch.float32
    assert indices.device == x.device and distances.device == x.device
    if n == 0:
        return
    indices, distances = indices.cpu(), distances.cpu().double()
    assert bool(((indices >= 0) & (indices < k)).all()), f"index outside [0, {k}): {indices}"
    oracle = reference.nearest_code_oracle(x.cpu(), codebook.cpu(), metric)  # [N, K] float64
    if metric == "l2":
        tol = L2_TOLERANCE_TF32 if precision == "tf32" and x.dtype == torch.float32 \
            else L2_TOLERANCE[x.dtype]
        x_sq = x.cpu().double().pow(2).sum(1)
        c_sq = codebook.cpu().double().pow(2).sum(1)
        scale = tol * (1.0 + x_sq[:, None] + c_sq[None, :])  # [N, K]
    else:
        scale = torch.full((n, k), COSINE_TOLERANCE[x.dtype], dtype=torch.float64)
    rows = torch.arange(n)
    chosen = oracle[rows, indices]
    best, best_index = oracle.min(dim=1)
    allowed = scale[rows, indices]
    excess = chosen - best - allowed
    worst = int(excess.argmax())
    assert bool((excess <= 0).all()), (
        f"{int((excess > 0).sum())} row(s) chose a code worse than the oracle's best by more "
        f"than the tolerance; worst row {worst}: chose {int(indices[worst])} "
        f"({float(chosen[worst]):.6g}), best {int(best_index[worst])} ({float(best[worst]):.6g})")
    if k > 1:
        second = oracle.topk(2, dim=1, largest=False).values[:, 1]
        clear = (second - best) > CLEAR_GAP * scale[rows, best_index]
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


def check_against_reference(x, codebook, codebook_sqnorm, indices, distances, metric):
    """Same indices as the reference backend where the exact top-2 gap of the very scores both
    compute (no renormalisation, the given sqnorm) is clear; close distances."""
    ref_indices, ref_distances = reference.nearest_code(x, codebook, codebook_sqnorm, metric,
                                                        "ieee")
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


@pytest.fixture(autouse=True)
def one_config_per_shape(monkeypatch):
    """On a GPU the autotuner compiles and times up to 8 configs per new shape key; correctness
    tests take the heuristic config (test_gpu_autotuned covers the autotuner)."""
    monkeypatch.setattr(triton_nearest_code, "_AUTOTUNE", False)


@pytest.fixture
def small_blocks(monkeypatch):
    """16 x 16 x 16 tiles: several row programs, several codebook tiles (the running-min merge)
    and the chunked-D loop on small shapes."""
    monkeypatch.setattr(triton_nearest_code, "_block_d", lambda dim, fma_dot: 16)
    monkeypatch.setattr(triton_nearest_code, "_interpreter_blocks", lambda n, k: (16, 16))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 3, 17, 64])
@pytest.mark.parametrize("k", [1, 3, 37])
@pytest.mark.parametrize("n", [0, 1, 7, 100])
def test_matches_oracle(n, k, d, dtype, metric):
    x, codebook = make_inputs(n, k, d, dtype, metric, seed=n * 1000 + k * 10 + d)
    indices, distances = nearest_code_forward(x, codebook, None, metric, "ieee")
    check_against_oracle(x, codebook, indices, distances, metric)
    check_against_reference(x, codebook, None, indices, distances, metric)


# Several programs and tiles cost ~1 s each interpreted: every shape in float32, one in 16-bit.
@pytest.mark.parametrize("dtype, n, k, d", [
    (torch.float32, 7, 37, 17), (torch.float32, 40, 37, 40), (torch.float32, 33, 50, 3),
    (torch.float16, 40, 37, 40), (torch.bfloat16, 40, 37, 40),
], ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_small_blocks_merge_tiles(small_blocks, n, k, d, dtype, metric):
    x, codebook = make_inputs(n, k, d, dtype, metric, seed=7)
    indices, distances = nearest_code_forward(x, codebook, None, metric, "ieee")
    check_against_oracle(x, codebook, indices, distances, metric)
    check_against_reference(x, codebook, None, indices, distances, metric)


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_precision_and_given_sqnorm(precision):
    x, codebook = make_inputs(100, 37, 64, torch.float32, "l2", seed=3)
    indices, distances = nearest_code_forward(x, codebook, None, "l2", precision)
    check_against_oracle(x, codebook, indices, distances, "l2", precision)
    # A given sqnorm is used as is: shifting it changes the answer exactly like the reference's.
    sqnorm = codebook.float().pow(2).sum(1) + torch.linspace(0, 30, 37, device=DEVICE)
    indices, distances = nearest_code_forward(x, codebook, sqnorm, "l2", "ieee")
    check_against_reference(x, codebook, sqnorm, indices, distances, "l2")
    unshifted, _ = nearest_code_forward(x, codebook, None, "l2", "ieee")
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


@pytest.mark.parametrize("dtype, metric, blocks", [
    *[(dtype, metric, "default") for dtype in DTYPES for metric in ("l2", "cosine")],
    (torch.float32, "l2", "small"), (torch.float32, "cosine", "small"),
    (torch.bfloat16, "l2", "small"),
], ids=str)
def test_ties_go_to_lowest_index(request, dtype, metric, blocks):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    x, unique = make_exact_inputs(24, 5, 17, dtype, metric, seed=11)
    # Scores are exact, so the answer is the oracle's first minimum, index for index.
    for codebook in (
        unique[(torch.arange(40) % 5).to(DEVICE)],  # each code 8 times, over every 16-code tile
        make_exact_inputs(0, 37, 17, dtype, metric, seed=12)[1],  # distinct codes, equal scores
        unique[:1].expand(40, -1).contiguous(),  # one code: every row ties on all 40
    ):
        indices, distances = nearest_code_forward(x, codebook, None, metric, "ieee")
        oracle = reference.nearest_code_oracle(x.cpu(), codebook.cpu(), metric)
        best, first_best = oracle.min(dim=1)  # torch returns the first minimal index
        assert torch.equal(indices.cpu(), first_best), (
            f"ties must go to the lowest index: got {indices.tolist()}, "
            f"expected {first_best.tolist()}")
        torch.testing.assert_close(distances.cpu().double(), best, rtol=0, atol=1e-6)
    # Random duplicates: a code and its copies score bit-identically, so the first copy wins.
    x, unique = make_inputs(24, 5, 17, dtype, metric, seed=13)
    codebook = unique[(torch.arange(40) % 5).to(DEVICE)]
    indices, distances = nearest_code_forward(x, codebook, None, metric, "ieee")
    assert bool((indices < 5).all()), f"a tie went to a higher copy: {indices.tolist()}"
    check_against_oracle(x, codebook, indices, distances, metric)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, NaN
@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite(request, blocks, dtype, metric):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    x, codebook = make_inputs(20, 37, 17, dtype, metric, seed=5)
    x[3] = float("nan")  # whole row non-finite: index 0, NaN distance
    x[4, 2] = float("nan")
    x[7] = codebook[0]  # its exact match is about to become a NaN code: must not be taken
    codebook[0, 1] = float("nan")  # never chosen while a row has a finite score
    codebook[20, 0] = float("inf")
    indices, distances = nearest_code_forward(x, codebook, None, metric, "ieee")
    ref_indices, ref_distances = reference.nearest_code(x, codebook, None, metric, "ieee")
    assert bool(((indices >= 0) & (indices < 37)).all())
    assert int(indices[3]) == 0 and int(indices[4]) == 0
    assert bool(distances[3].isnan()) and bool(distances[4].isnan())
    finite_rows = [r for r in range(20) if r not in (3, 4)]
    assert not bool(((indices[finite_rows] == 0) | (indices[finite_rows] == 20)).any())
    assert torch.equal(indices.cpu(), ref_indices.cpu())
    torch.testing.assert_close(distances.cpu(), ref_distances.cpu().float(), rtol=1e-4,
                               atol=1e-4, equal_nan=True)


def test_strided_inputs():
    x, codebook = make_inputs(30, 37, 34, torch.float32, "l2", seed=9)
    x_view, codebook_view = x[::2, ::2], codebook[:, 1::2]  # row and column strides != 1
    indices, distances = nearest_code_forward(x_view, codebook_view, None, "l2", "ieee")
    check_against_oracle(x_view, codebook_view, indices, distances, "l2")


def test_bad_inputs():
    x, codebook = make_inputs(4, 3, 8, torch.float32, "l2")
    with pytest.raises(TypeError, match=r"x .*float32/float16/bfloat16"):
        nearest_code_forward(x.double(), codebook.double(), None, "l2", "ieee")
    with pytest.raises(TypeError, match="codebook"):
        nearest_code_forward(x, codebook.half(), None, "l2", "ieee")
    with pytest.raises(ValueError, match="codebook_sqnorm"):
        nearest_code_forward(x, codebook, torch.ones(4, device=DEVICE), "l2", "ieee")
    empty_indices, empty_distances = nearest_code_forward(x[:0], codebook, None, "l2", "ieee")
    assert empty_indices.shape == (0,) and empty_indices.dtype == torch.int64
    assert empty_distances.shape == (0,) and empty_distances.dtype == torch.float32


gpu_only = pytest.mark.skipif(INTERPRET, reason="GPU-sized shapes: too slow for the interpreter")


@gpu_only
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, k, d", [(1000, 511, 8), (5000, 511, 256), (1000, 1024, 100)])
def test_gpu_larger_shapes(n, k, d, dtype, precision):
    if precision == "tf32" and dtype != torch.float32:
        pytest.skip("precision only changes float32 products")
    x, codebook = make_inputs(n, k, d, dtype, "l2", seed=21)
    indices, distances = nearest_code_forward(x, codebook, None, "l2", precision)
    check_against_oracle(x, codebook, indices, distances, "l2", precision)


@gpu_only
def test_gpu_autotuned(monkeypatch):
    monkeypatch.setattr(triton_nearest_code, "_AUTOTUNE", True)
    for metric in ("l2", "cosine"):
        x, codebook = make_inputs(1000, 511, 64, torch.float16, metric, seed=22)
        indices, distances = nearest_code_forward(x, codebook, None, metric, "ieee")
        check_against_oracle(x, codebook, indices, distances, metric)
