"""relation_alignment_loss on every usable backend against a plain-autograd float64 oracle
written the way the paper's code does it (a loop over word positions), plus gradcheck,
opcheck, compile, autocast and the Triton kernels' word limit. Bad input on every backend:
test_bad_input.py."""

import pytest
import torch

import lgvq_kernels
from lgvq_kernels import reference
from lgvq_kernels._backends import BackendUnavailableError, implementation
from tests.utils import (LOSS_TOLERANCE, LOW_PRECISION_GRAD_TOLERANCE, fast_backends,
                         kernel_device, usable_backends)

BACKENDS = usable_backends("relation_alignment_loss")
FAST_BACKENDS = fast_backends("relation_alignment_loss")


def paper_loop_oracle(words, visual, codes, word_mask):
    """Per-sample, per-word Python loop with autograd, float64 (the public code's structure)."""
    return reference.relation_alignment_loss_loop(words, visual, codes, word_mask, torch.float64)


def make(batch, length, positions, width, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(batch, length, width, generator=g).to(dtype)
    visual = torch.randn(batch, positions, width, generator=g).to(dtype)
    codes = torch.randn(batch, positions, width, generator=g).to(dtype)
    mask = torch.rand(batch, length, generator=g) > 0.25
    return words, visual, codes, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 5, 7, 3), (3, 30, 64, 17), (2, 12, 256, 40)])
def test_matches_paper_loop(backend, dtype, shape):
    if backend == "triton" and (dtype == torch.float64 or shape[2] > 64):
        pytest.skip("Triton interpreter: float32/bf16 and small shapes only")
    words, visual, codes, mask = make(*shape, dtype=dtype, seed=sum(shape))
    codes.requires_grad_(True)
    result = lgvq_kernels.relation_alignment_loss(words, visual, codes, mask, backend=backend)
    result.loss.backward()
    oracle_codes = codes.detach().double().requires_grad_(True)
    expected = paper_loop_oracle(words, visual, oracle_codes, mask)
    expected.backward()
    tol = LOSS_TOLERANCE[dtype]
    torch.testing.assert_close(result.loss.double(), expected.detach(), rtol=tol, atol=tol)
    grad_tol = LOW_PRECISION_GRAD_TOLERANCE if dtype == torch.bfloat16 else tol * 10
    torch.testing.assert_close(codes.grad.double(), oracle_codes.grad, rtol=grad_tol, atol=grad_tol)
    assert result.chosen.shape == mask.shape and result.chosen.dtype == torch.int64
    assert int(result.chosen.min()) >= 0 and int(result.chosen.max()) < shape[2]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradcheck_and_opcheck(backend):
    words, visual, codes, mask = make(2, 4, 6, 5, dtype=torch.float64)
    codes.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda c: lgvq_kernels.relation_alignment_loss(words, visual, c, mask,
                                                       backend=backend).loss, (codes,))
    torch.library.opcheck(torch.ops.lgvq.relation_alignment_loss.default,
                          (words, visual, codes, mask, backend))
    torch.library.opcheck(torch.ops.lgvq.relation_alignment_loss_backward.default,
                          (torch.tensor(1.5, dtype=torch.float64), words, visual, codes.detach(),
                           mask, backend))  # first-order only: no double backward


def test_negative_best_similarity_flips_the_code():
    # One word, one position, anti-aligned: s < 0 so c_hat = -normalize(c); with one word the
    # Gram matrices are 1x1 and equal (both 1): loss 0 whatever the sign.
    words = torch.tensor([[[1.0, 0.0]]])
    visual = torch.tensor([[[-1.0, 0.0]]])
    codes = torch.tensor([[[0.0, 3.0]]])
    result = lgvq_kernels.relation_alignment_loss(words, visual, codes,
                                                  torch.ones(1, 1, dtype=torch.bool))
    assert float(result.loss) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_compile_and_autocast(backend):
    torch._dynamo.reset()
    words, visual, codes, mask = make(2, 6, 9, 8)

    def f(codes):
        return lgvq_kernels.relation_alignment_loss(words, visual, codes, mask,
                                                    backend=backend).loss

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    c1 = codes.clone().requires_grad_(True)
    c2 = codes.clone().requires_grad_(True)
    f(c1).backward()
    compiled(c2).backward()
    torch.testing.assert_close(c2.grad, c1.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lgvq_kernels.relation_alignment_loss(words.bfloat16(), visual, codes, mask,
                                                    backend=backend).loss
    assert loss.dtype == torch.float32


def _tied(dtype=torch.float32):
    """Visual token 1 repeated at positions 4 and 6; words 0, 2 and 3 point along it (ties
    between the copies; three words share one position), word 1 along token 5 (scaled)."""
    words, visual, codes, mask = make(2, 5, 8, 24, dtype=torch.float32, seed=3)
    visual[:, 4] = visual[:, 1]
    visual[:, 6] = visual[:, 1]
    words[:, 0] = 3 * visual[:, 1]
    words[:, 2] = 0.5 * visual[:, 1]
    words[:, 3] = visual[:, 1]
    words[:, 1] = 2 * visual[:, 5]
    mask[:] = True
    return words.to(dtype), visual.to(dtype), codes.to(dtype), mask


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_ties_go_to_the_first_position_and_shared_positions_sum(backend, dtype):
    words, visual, codes, mask = _tied(dtype)
    codes.requires_grad_(True)
    result = lgvq_kernels.relation_alignment_loss(words, visual, codes, mask, backend=backend)
    assert result.chosen[:, [0, 2, 3]].eq(1).all() and result.chosen[:, 1].eq(5).all()
    result.loss.backward()
    oracle_codes = codes.detach().double().requires_grad_(True)
    expected = paper_loop_oracle(words, visual, oracle_codes, mask)
    expected.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(result.loss.double(), expected.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(codes.grad.double(), oracle_codes.grad, rtol=tol, atol=tol)
    assert codes.grad[:, [4, 6]].eq(0).all()  # the later copies get nothing


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_deterministic(backend):
    words, visual, codes, mask = make(5, 9, 33, 20, seed=11)
    grad_loss = torch.tensor(0.7)
    backward = torch.ops.lgvq.relation_alignment_loss_backward
    first = backward(grad_loss, words, visual, codes, mask, backend)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the native per-sample split must not change the bits
        second = backward(grad_loss, words, visual, codes, mask, backend)
        loss_one_thread = torch.ops.lgvq.relation_alignment_loss(words, visual, codes, mask,
                                                                 backend)[0]
    finally:
        torch.set_num_threads(threads)
    loss = torch.ops.lgvq.relation_alignment_loss(words, visual, codes, mask, backend)[0]
    assert torch.equal(first, second) and torch.equal(loss, loss_one_thread)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_input_dtypes_compute_like_codes(backend):
    # Outside autocast the inputs may differ in dtype: everything computes in codes' type.
    words, visual, codes, mask = make(2, 6, 9, 8, seed=5)
    loss = lgvq_kernels.relation_alignment_loss(words.bfloat16(), visual.half(), codes, mask,
                                                backend=backend).loss
    expected = paper_loop_oracle(words.bfloat16().float(), visual.half().float(), codes, mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 30, 64, 17), (32, 30, 256, 384)])
def test_cuda_matches_cpu_reference(backend, shape):
    words, visual, codes, mask = make(*shape, seed=sum(shape))
    codes_cuda = codes.cuda().requires_grad_(True)
    got = lgvq_kernels.relation_alignment_loss(words.cuda(), visual.cuda(), codes_cuda,
                                               mask.cuda(), backend=backend)
    got.loss.backward()
    codes_cpu = codes.clone().requires_grad_(True)
    want = lgvq_kernels.relation_alignment_loss(words, visual, codes_cpu, mask,
                                                backend="reference")
    want.loss.backward()
    torch.testing.assert_close(got.loss.cpu(), want.loss, rtol=1e-4, atol=1e-6)
    # The GPU rounds the normalisation and the dots differently (approximate division and square
    # root in Triton, fma contraction): a word may take another position only at a near-tie of
    # its similarities (within 1e-5, float64); the code gradient is compared where none did.
    similarity = torch.einsum("blc,bmc->blm", torch.nn.functional.normalize(words.double(), dim=2),
                              torch.nn.functional.normalize(visual.double(), dim=2))
    got_chosen = got.chosen.cpu()
    differs = got_chosen != want.chosen
    gaps = (similarity.gather(2, want.chosen[..., None])
            - similarity.gather(2, got_chosen[..., None]))[..., 0]
    assert bool((gaps[differs].abs() <= 1e-5).all()), "a word moved without a near-tie"
    if not bool(differs.any()):
        torch.testing.assert_close(codes_cuda.grad.cpu(), codes_cpu.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in usable_backends("relation_alignment_loss",
                                                     kernel_device("triton")),
                    reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1")
def test_triton_word_limit_is_a_backend_limit():
    """More words per sample than the shipped tiles take (L = 256 needs 288 KiB of shared
    memory): the triton backend cannot serve the call (the native and reference backends can);
    nothing is launched."""
    words, visual, codes, mask = (t.to(kernel_device("triton")) for t in make(1, 129, 1, 16))
    with pytest.raises(BackendUnavailableError, match="129 tokens.*at most 128"):
        implementation("relation_alignment_loss", "triton")(words, visual, codes, mask)
