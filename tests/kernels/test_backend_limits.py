"""backend="auto" never picks a backend that refuses the call: size limits of the kernels are
known to the registry (lgvq_kernels._backends.size_info), not found out at launch."""

import pytest
import torch

import lgvq_kernels
from lgvq_kernels._backends import TRITON_RELATION_MAX_WORDS, BackendUnavailableError
from tests.utils import usable_backends

OPS = ("relation_alignment_loss", "relation_alignment_loss_backward")
LONG = {"words": TRITON_RELATION_MAX_WORDS + 1}


@pytest.mark.skipif("triton" not in usable_backends("relation_alignment_loss", "cuda"),
                    reason="triton is not installed")
@pytest.mark.parametrize("op", OPS)
def test_auto_passes_over_triton_for_long_captions(monkeypatch, op):
    # Decided from the registry alone: no GPU needed.
    monkeypatch.delenv("LGVQ_BACKEND", raising=False)
    dtypes = (torch.float32,)
    short = {"words": TRITON_RELATION_MAX_WORDS}
    assert lgvq_kernels.resolve_backend("auto", "cuda", op, dtypes, short) == "triton"
    fallback = lgvq_kernels.resolve_backend("auto", "cuda", op, dtypes, LONG)
    native_cuda = lgvq_kernels.available_backends(op, "cuda")["native"].available
    assert fallback == ("native" if native_cuda else "reference")
    with pytest.raises(BackendUnavailableError, match=r"words has 129 tokens.*at most 128"):
        lgvq_kernels.resolve_backend("triton", "cuda", op, dtypes, LONG)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in usable_backends("relation_alignment_loss"),
                    reason="needs the Triton interpreter (TRITON_INTERPRET=1) on CPU")
def test_explicit_triton_refuses_long_captions_before_launch():
    words = torch.randn(1, TRITON_RELATION_MAX_WORDS + 1, 4)
    visual = torch.randn(1, 3, 4)
    mask = torch.ones(1, words.shape[1], dtype=torch.bool)
    with pytest.raises(BackendUnavailableError, match="backend 'triton' cannot serve"):
        lgvq_kernels.relation_alignment_loss(words, visual, visual.clone(), mask,
                                             backend="triton")
    # auto on the same call: a CPU backend that takes it
    result = lgvq_kernels.relation_alignment_loss(words, visual, visual.clone(), mask)
    assert result.chosen.shape == (1, words.shape[1])
