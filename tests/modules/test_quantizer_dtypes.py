"""Every quantizer moved with .half() / .bfloat16() / .double() runs in training and eval mode,
with and without in/out projections, and returns x's dtype."""

import pytest
import torch

import lgvq

DTYPES = [torch.float16, torch.bfloat16, torch.float64]

MODULES = {
    "vq": lambda: lgvq.VectorQuantizer(8, 16, backend="reference"),
    "vq-projected": lambda: lgvq.VectorQuantizer(8, 16, codebook_dim=4, backend="reference"),
    "vq-heads-projected": lambda: lgvq.VectorQuantizer(8, 16, codebook_dim=3, heads=2,
                                                       separate_codebook_per_head=True,
                                                       backend="reference"),
    "vq-cosine-projected": lambda: lgvq.VectorQuantizer(8, 16, codebook_dim=4,
                                                        use_cosine_sim=True,
                                                        backend="reference"),
    "vq-rotation-projected": lambda: lgvq.VectorQuantizer(8, 16, codebook_dim=4,
                                                          rotation_trick=True,
                                                          backend="reference"),
    "vq-learnable-projected": lambda: lgvq.VectorQuantizer(8, 16, codebook_dim=4,
                                                           learnable_codebook=True,
                                                           backend="reference"),
    "rvq": lambda: lgvq.ResidualVQ(8, 2, 16, backend="reference"),
    "rvq-projected": lambda: lgvq.ResidualVQ(8, 2, 16, codebook_dim=4, backend="reference"),
    "cvq": lambda: lgvq.ClusteredVectorQuantizer(8, 16, backend="reference"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_runs_in_every_dtype(name, dtype):
    torch.manual_seed(0)
    module = MODULES[name]().to(dtype)
    x = torch.randn(2, 5, 8, dtype=dtype, requires_grad=True)
    for training in (True, False):
        module.train(training)
        quantized, indices, loss = module(x)[:3]
        assert quantized.dtype == dtype and quantized.shape == x.shape
        assert indices.dtype == torch.int64
        assert torch.isfinite(loss).all()
    quantized.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype
    if hasattr(module, "get_output_from_indices"):
        output = module.get_output_from_indices(indices)
        assert output.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_taming_runs_in_every_dtype(dtype):
    torch.manual_seed(0)
    module = lgvq.TamingVectorQuantizer(16, 4, 0.25, backend="reference").to(dtype)
    z = torch.randn(2, 4, 3, 3, dtype=dtype, requires_grad=True)
    z_q, loss, _ = module(z)
    assert z_q.dtype == dtype and torch.isfinite(loss)
    z_q.float().sum().backward()
    assert z.grad.dtype == dtype
