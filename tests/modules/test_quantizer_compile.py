"""torch.compile(fullgraph=True) of a VectorQuantizer forward in eval mode (check_finite=False):
no graph break, the same outputs as eager."""

import copy

import pytest
import torch

import lgvq

BACKENDS = ["reference", "auto"]


def compile_fullgraph(module):
    return torch.compile(module, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_eval_forward_matches_eager(backend):
    torch.manual_seed(0)
    torch._dynamo.reset()
    quantizer = lgvq.VectorQuantizer(8, 16, codebook_dim=4, heads=2, use_cosine_sim=True,
                                     check_finite=False, backend=backend).eval()
    compiled = compile_fullgraph(quantizer)
    x = torch.randn(2, 5, 8)
    mask = torch.rand(2, 5) > 0.3
    for args in ((x,), (x, mask)):
        try:
            quantized, indices, loss = compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as error:
            if "_check_index_range" in str(error):  # a kernel-layer check, not this module
                pytest.xfail("lgvq_kernels.functional._check_index_range reads the indices back "
                             "(int(indices.min())), which fullgraph tracing cannot do; it needs "
                             "`if torch.compiler.is_compiling(): return`")
            raise
        eager_quantized, eager_indices, eager_loss = quantizer(*args)
        assert torch.equal(indices, eager_indices)
        torch.testing.assert_close(quantized, eager_quantized, rtol=0, atol=0)
        torch.testing.assert_close(loss, eager_loss)


def train_step(module, x):
    """One training forward and backward; returns the input gradient and the new codebook."""
    x = x.clone().requires_grad_(True)
    quantized, _, loss = module(x)
    (quantized.square().sum() + loss.sum()).backward()
    return x.grad


def test_compiled_training_uses_the_codebook_before_the_ema_update():
    # inductor once saved the codebook buffer for the backward instead of the forward's copy,
    # so the commitment gradient saw the codes after this step's EMA update (error 4.4e-3)
    torch.manual_seed(0)
    torch._dynamo.reset()
    eager = lgvq.VectorQuantizer(8, 16, check_finite=False, backend="reference")
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)  # inductor
    x = torch.randn(4, 6, 8)
    for _ in range(2):
        expected = train_step(eager, x)
        torch.testing.assert_close(train_step(compiled, x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_module.codebooks, eager.codebooks, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["vq", "rvq"])
def test_fullgraph_training_with_kmeans_and_dead_codes_matches_eager(kind):
    # aot_eager: the whole training forward and backward traced as one graph (k-means init,
    # EMA, dead-code replacement) and run with eager's kernels and random draws; inductor took
    # 35 s per case here (its random numbers also differ from eager's)
    torch._dynamo.reset()
    options = dict(kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=2.0,
                   check_finite=False, backend="reference")
    torch.manual_seed(0)
    if kind == "vq":
        eager = lgvq.VectorQuantizer(8, 16, codebook_dim=4, heads=2, **options)
    else:
        eager = lgvq.ResidualVQ(8, 2, 16, codebook_dim=4, **options)
    compiled_module = copy.deepcopy(eager)
    compiled = compile_fullgraph(compiled_module)
    inputs = torch.randn(3, 2, 12, 8)
    for step, x in enumerate(inputs):
        state = torch.get_rng_state()
        expected = train_step(eager, x)
        torch.set_rng_state(state)
        got = train_step(compiled, x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        for name, buffer in eager.named_buffers():
            torch.testing.assert_close(compiled_module.get_buffer(name), buffer, rtol=1e-5,
                                       atol=1e-5, msg=f"{name} at step {step}")
