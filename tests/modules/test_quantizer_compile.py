"""torch.compile(fullgraph=True) of a VectorQuantizer forward in eval mode (check_finite=False):
no graph break, the same outputs as eager."""

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
