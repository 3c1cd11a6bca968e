"""reference.segment_sum: the deterministic segment sum behind the nearest-code distance backward
and the reference backend's statistics, quantize backward and relation backward (index_add and
scatter_add use float atomics on CUDA: bits that change run to run)."""

import pytest
import torch

import lgvq_kernels
from lgvq_kernels import reference


def serial_sums(values, indices, num_segments):
    out = torch.zeros((num_segments, *values.shape[1:]), dtype=values.dtype)
    for row, index in enumerate(indices.tolist()):
        if 0 <= index < num_segments:
            out[index] = out[index] + values[row]  # ascending row order, one add at a time
    return out


@pytest.mark.parametrize("shape", [(200,), (200, 5)])
def test_segment_sum_is_the_ascending_serial_sum(shape):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(shape, generator=generator) * 1e3
    indices = torch.randint(-2, 12, (shape[0],), generator=generator)  # out of range: dropped
    got = reference.segment_sum(values, indices, 10)
    assert torch.equal(got, serial_sums(values, indices, 10))
    assert torch.equal(reference.segment_sum(values[:0], indices[:0], 10), torch.zeros(
        (10, *shape[1:])))
    assert reference.segment_sum(values, indices, 0).shape == (0, *shape[1:])


def test_segment_sum_gradients():
    values = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([2, 0, 2, 4, 4, 4, 1, 0, 7])  # 7: out of range for 5 segments

    def f(v):
        return reference.segment_sum(v, indices, 5)

    assert torch.autograd.gradcheck(f, (values,))
    assert torch.autograd.gradgradcheck(f, (values,))


def _forbid(*args, **kwargs):
    raise AssertionError("a float atomic scatter (index_add/scatter_add) was used")


def test_no_atomic_scatters_on_the_deterministic_paths(monkeypatch):
    for name in ("index_add", "index_add_", "scatter_add", "scatter_add_"):
        monkeypatch.setattr(torch.Tensor, name, _forbid)
    monkeypatch.setattr(torch, "index_add", _forbid)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=generator, requires_grad=True)
    codebook = torch.randn(6, 4, generator=generator, requires_grad=True)
    # nearest-code distance backward (every backend shares it)
    found = lgvq_kernels.nearest_code(x, codebook, backend="reference")
    found.distances.sum().backward()
    sqnorm = codebook.detach().pow(2).sum(1).requires_grad_(True)
    lgvq_kernels.nearest_code(x, codebook, codebook_sqnorm=sqnorm,
                              backend="reference").distances.sum().backward()
    # the reference statistics and quantize backward
    indices = found.indices
    lgvq_kernels.codebook_statistics(x.detach(), indices, 6, backend="reference")
    out = lgvq_kernels.quantize_straight_through(x, codebook, indices, backend="reference")
    (out.commitment_loss + out.codebook_loss).backward()
    # the reference relation backward
    codes = torch.randn(2, 5, 4, generator=generator, requires_grad=True)
    words, visual = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 5, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    lgvq_kernels.relation_alignment_loss(words, visual, codes, mask,
                                         backend="reference").loss.backward()
    assert codes.grad is not None and codebook.grad is not None
