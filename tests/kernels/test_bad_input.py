"""The same bad input raises the same exception, with the same message, on every backend: the
public ops validate before any kernel runs. Wrong Python type or tensor dtype: TypeError; wrong
shape, value, out-of-range index or device mismatch: ValueError. (A backend that cannot serve a
valid call raises BackendUnavailableError: test_nearest_code.py, the registry tests.)

Every call here fails in validation, so the Triton interpreter costs nothing."""

import pytest
import torch

import lgvq_kernels
from tests.utils import usable_backends

def _nearest(x=None, codebook=None, **kwargs):
    x = torch.randn(4, 3) if x is None else x
    codebook = torch.randn(5, 3) if codebook is None else codebook
    return lambda backend: lgvq_kernels.nearest_code(x, codebook, backend=backend, **kwargs)


def _quantize(x=None, codebook=None, indices=None, **kwargs):
    x = torch.randn(4, 3) if x is None else x
    codebook = torch.randn(5, 3) if codebook is None else codebook
    indices = torch.zeros(4, dtype=torch.int64) if indices is None else indices
    return lambda backend: lgvq_kernels.quantize_straight_through(x, codebook, indices,
                                                                  backend=backend, **kwargs)


def _statistics(x=None, indices=None, num_codes=5, **kwargs):
    x = torch.randn(4, 3) if x is None else x
    indices = torch.zeros(4, dtype=torch.int64) if indices is None else indices
    return lambda backend: lgvq_kernels.codebook_statistics(x, indices, num_codes,
                                                            backend=backend, **kwargs)


def _ema(stats=None, cluster_size=None, embed_sum=None, codebook=None, decay=0.9, **kwargs):
    stats = torch.zeros(5, 4) if stats is None else stats
    cluster_size = torch.ones(5) if cluster_size is None else cluster_size
    embed_sum = torch.zeros(5, 3) if embed_sum is None else embed_sum
    codebook = torch.zeros(5, 3) if codebook is None else codebook
    return lambda backend: lgvq_kernels.codebook_ema_update_(
        stats, cluster_size, embed_sum, codebook, decay=decay, backend=backend, **kwargs)


def _relation(**tensors):
    args = dict(words=torch.randn(2, 4, 8), visual=torch.randn(2, 6, 8),
                codes=torch.randn(2, 6, 8), word_mask=torch.ones(2, 4, dtype=torch.bool))
    args.update(tensors)
    return lambda backend: lgvq_kernels.relation_alignment_loss(**args, backend=backend)


def _index(values):
    return torch.tensor(values, dtype=torch.int64)


META = "meta"  # a second device on any machine: tensors without data, never computed on

# (op, call for a backend, exception, message pattern), by kind of mistake
MISTAKES = {
    # nearest_code
    "nearest/x-not-a-tensor": ("nearest_code", _nearest(x=[[1.0, 2.0, 3.0]]), TypeError,
                               "x must be a torch.Tensor"),
    "nearest/x-dtype": ("nearest_code", _nearest(x=torch.ones(4, 3, dtype=torch.int64)),
                        TypeError, "x must have dtype"),
    "nearest/codebook-dtype": ("nearest_code",
                               _nearest(codebook=torch.ones(5, 3, dtype=torch.int32)),
                               TypeError, "codebook must have dtype"),
    "nearest/sqnorm-dtype": ("nearest_code",
                             _nearest(codebook_sqnorm=torch.ones(5, dtype=torch.int64)),
                             TypeError, "codebook_sqnorm must have dtype"),
    "nearest/x-shape": ("nearest_code", _nearest(x=torch.randn(())), ValueError,
                        "x must have at least 1"),
    "nearest/codebook-shape": ("nearest_code", _nearest(codebook=torch.randn(5, 3, 1)),
                               ValueError, "codebook must have 2 dim"),
    "nearest/D-mismatch": ("nearest_code", _nearest(codebook=torch.randn(5, 2)), ValueError,
                           "last dimension 3.*D=2"),
    "nearest/empty-codebook": ("nearest_code", _nearest(codebook=torch.randn(0, 3)), ValueError,
                               "at least one code"),
    "nearest/metric": ("nearest_code", _nearest(metric="dot"), ValueError, "metric must be"),
    "nearest/metric-type": ("nearest_code", _nearest(metric=2), TypeError,
                            "metric must be a str"),
    "nearest/precision": ("nearest_code", _nearest(precision="fp8"), ValueError, "precision"),
    "nearest/sqnorm-shape": ("nearest_code", _nearest(codebook_sqnorm=torch.randn(4)),
                             ValueError, r"codebook_sqnorm must have shape \[5\]"),
    "nearest/sqnorm-with-cosine": ("nearest_code",
                                   _nearest(metric="cosine", codebook_sqnorm=torch.randn(5)),
                                   ValueError, "l2"),
    "nearest/device": ("nearest_code", _nearest(codebook=torch.randn(5, 3, device=META)),
                       ValueError, "codebook is on meta.*one device"),
    "nearest/sqnorm-device": ("nearest_code",
                              _nearest(codebook_sqnorm=torch.ones(5, device=META)),
                              ValueError, "codebook_sqnorm is on meta.*one device"),
    "nearest/backend-name": ("nearest_code", lambda backend: lgvq_kernels.nearest_code(
        torch.randn(2, 3), torch.randn(4, 3), backend="fastest"), ValueError,
        "backend must be one of"),
    "nearest/backend-type": ("nearest_code", lambda backend: lgvq_kernels.nearest_code(
        torch.randn(2, 3), torch.randn(4, 3), backend=3), TypeError, "backend must be a str"),
    # quantize_straight_through
    "quantize/x-dtype": ("quantize_straight_through",
                         _quantize(x=torch.ones(4, 3, dtype=torch.int32)), TypeError,
                         "x must have dtype"),
    "quantize/indices-dtype": ("quantize_straight_through",
                               _quantize(indices=torch.zeros(4, dtype=torch.int32)), TypeError,
                               "indices must have dtype"),
    "quantize/indices-shape": ("quantize_straight_through",
                               _quantize(indices=torch.zeros(3, dtype=torch.int64)),
                               ValueError, r"indices must have shape \(4,\)"),
    "quantize/D-mismatch": ("quantize_straight_through", _quantize(codebook=torch.randn(5, 2)),
                            ValueError, "same D"),
    "quantize/mask-dtype": ("quantize_straight_through", _quantize(mask=torch.ones(4)),
                            TypeError, "mask must have dtype"),
    "quantize/mask-shape": ("quantize_straight_through",
                            _quantize(mask=torch.ones(3, dtype=torch.bool)), ValueError,
                            r"mask must have shape \(4,\)"),
    "quantize/index-too-large": ("quantize_straight_through", _quantize(
        indices=_index([0, 1, 5, 2])), ValueError, r"indices must lie in \[0, 5\), found 5"),
    "quantize/index-negative": ("quantize_straight_through", _quantize(
        indices=_index([0, 1, -1, 2])), ValueError, r"indices must lie in \[0, 5\), found -1"),
    "quantize/device": ("quantize_straight_through",
                        _quantize(indices=torch.zeros(4, dtype=torch.int64, device=META)),
                        ValueError, "indices is on meta"),
    # codebook_statistics
    "statistics/num-codes": ("codebook_statistics", _statistics(num_codes=0), ValueError,
                             "num_codes must be a positive"),
    "statistics/num-codes-type": ("codebook_statistics", _statistics(num_codes="5"), TypeError,
                                  "num_codes must be an int"),
    "statistics/indices-dtype": ("codebook_statistics", _statistics(indices=torch.zeros(4)),
                                 TypeError, "indices must have dtype"),
    "statistics/index-too-large": ("codebook_statistics", _statistics(
        indices=_index([0, 1, 5, 2])), ValueError, r"indices must lie in \[0, 5\), found 5"),
    "statistics/index-negative": ("codebook_statistics", _statistics(
        indices=_index([0, 1, -1, 2])), ValueError, r"indices must lie in \[0, 5\), found -1"),
    "statistics/mask-device": ("codebook_statistics",
                               _statistics(mask=torch.ones(4, dtype=torch.bool, device=META)),
                               ValueError, "mask is on meta"),
    # codebook_ema_update_
    "ema/decay": ("codebook_ema_update_", _ema(decay=1.5), ValueError,
                  r"decay must be in \[0, 1\]"),
    "ema/decay-type": ("codebook_ema_update_", _ema(decay="0.9"), TypeError,
                       "decay must be a float"),
    "ema/eps": ("codebook_ema_update_", _ema(eps=0.0), ValueError, "eps must be > 0"),
    "ema/stats-shape": ("codebook_ema_update_", _ema(stats=torch.zeros(5, 3)), ValueError,
                        r"stats must have shape \(5, 4\)"),
    "ema/stats-dtype": ("codebook_ema_update_", _ema(stats=torch.zeros(5, 4, dtype=torch.int32)),
                        TypeError, "stats must have dtype"),
    "ema/state-dtype": ("codebook_ema_update_",
                        _ema(cluster_size=torch.ones(5, dtype=torch.float16)), TypeError,
                        "cluster_size must have dtype"),
    "ema/embed-sum-dtype": ("codebook_ema_update_",
                            _ema(embed_sum=torch.zeros(5, 3, dtype=torch.float64)), TypeError,
                            "embed_sum must have dtype"),
    "ema/not-contiguous": ("codebook_ema_update_", _ema(codebook=torch.zeros(3, 5).t()),
                           ValueError, "codebook must be contiguous"),
    "ema/replacement-shape": ("codebook_ema_update_", _ema(replacement=torch.zeros(4, 3)),
                              ValueError, r"replacement must have shape \(5, 3\)"),
    "ema/device": ("codebook_ema_update_", _ema(stats=torch.zeros(5, 4, device=META)),
                   ValueError, "one device"),
    # relation_alignment_loss
    "relation/words-shape": ("relation_alignment_loss", _relation(words=torch.randn(2, 4)),
                             ValueError, "words must have 3 dimensions"),
    "relation/visual-shape": ("relation_alignment_loss", _relation(visual=torch.randn(2, 6, 9)),
                              ValueError, r"visual must be \[2, M, 8\]"),
    "relation/codes-shape": ("relation_alignment_loss", _relation(codes=torch.randn(2, 5, 8)),
                             ValueError, "codes must have the shape of visual"),
    "relation/mask-dtype": ("relation_alignment_loss", _relation(word_mask=torch.ones(2, 4)),
                            TypeError, "word_mask must have dtype"),
    "relation/mask-shape": ("relation_alignment_loss",
                            _relation(word_mask=torch.ones(2, 3, dtype=torch.bool)), ValueError,
                            r"word_mask must have shape \(2, 4\)"),
    "relation/no-position": ("relation_alignment_loss", _relation(
        visual=torch.randn(2, 0, 8), codes=torch.randn(2, 0, 8)), ValueError,
        "at least one position"),
    "relation/words-dtype": ("relation_alignment_loss",
                             _relation(words=torch.ones(2, 4, 8, dtype=torch.int64)), TypeError,
                             "words must have dtype"),
    "relation/device": ("relation_alignment_loss", _relation(visual=torch.randn(2, 6, 8,
                                                                                device=META)),
                        ValueError, "one device"),
}


@pytest.mark.parametrize("backend", lgvq_kernels.BACKENDS)
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_same_mistake_same_exception_on_every_backend(mistake, backend):
    op, call, error, pattern = MISTAKES[mistake]
    if backend not in usable_backends(op):
        pytest.skip(f"{backend} cannot run {op} here")
    with pytest.raises(error, match=pattern):
        call(backend)

