"""torch.library registration of lgvq's ops: custom ops, fake (meta) impls, autograd, autocast.

Each op here takes already-validated, laid-out tensors (see lgvq_kernels.functional) and a
resolved backend name, and forwards to that backend's implementation. The compiled kernels
live in their own namespace (``torch.ops.lgvq_C``) so that Triton and CUDA can both serve
CUDA tensors behind the one ``torch.ops.lgvq`` op.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from lgvq_kernels import reference
from lgvq_kernels._backends import _native_module

# --------------------------------------------------------------------------------------------
# backend implementations of each op, looked up by (op, backend)
# --------------------------------------------------------------------------------------------


def _native_nearest_code(x, codebook, codebook_sqnorm, metric, precision):
    _native_module()  # loads the extension (registers torch.ops.lgvq_C) on first use
    return torch.ops.lgvq_C.nearest_code(x, codebook, codebook_sqnorm, metric == "cosine")


def _triton_nearest_code(x, codebook, codebook_sqnorm, metric, precision):
    from lgvq_kernels.triton.nearest_code import nearest_code_forward

    return nearest_code_forward(x, codebook, codebook_sqnorm, metric, precision)


_IMPLS: dict[tuple[str, str], Callable] = {
    ("nearest_code", "reference"): reference.nearest_code,
    ("nearest_code", "native"): _native_nearest_code,
    ("nearest_code", "triton"): _triton_nearest_code,
}


def register_impl(op: str, backend: str, fn: Callable) -> None:
    """Register (or replace) the implementation of ``op`` on ``backend``."""
    _IMPLS[(op, backend)] = fn


def impl(op: str, backend: str) -> Callable:
    try:
        return _IMPLS[(op, backend)]
    except KeyError:
        raise NotImplementedError(f"op {op!r} has no {backend!r} implementation") from None


# --------------------------------------------------------------------------------------------
# nearest code
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("lgvq::nearest_code", mutates_args=())
def nearest_code(x: Tensor, codebook: Tensor, codebook_sqnorm: Optional[Tensor], metric: str,
                 precision: str, backend: str) -> tuple[Tensor, Tensor]:
    """x [N, D] contiguous, codebook [K, D] contiguous, same dtype → (indices [N] int64,
    distances [N] float32, or float64 for float64 inputs)."""
    indices, distances = impl("nearest_code", backend)(x, codebook, codebook_sqnorm, metric,
                                                       precision)
    return indices, distances


@nearest_code.register_fake
def _(x, codebook, codebook_sqnorm, metric, precision, backend):
    n = x.shape[0]
    return (x.new_empty(n, dtype=torch.int64),
            x.new_empty(n, dtype=reference.compute_dtype(x.dtype)))


def _nearest_code_setup_context(ctx, inputs, output):
    x, codebook, codebook_sqnorm, metric, _, _ = inputs
    indices, _ = output
    ctx.metric = metric
    ctx.has_sqnorm = codebook_sqnorm is not None
    ctx.save_for_backward(x, codebook, indices)
    ctx.mark_non_differentiable(indices)


def _nearest_code_backward(ctx, grad_indices, grad_distances):
    # Gradient of the distance at the chosen code (the choice itself is piecewise constant).
    # Plain torch ops, so it runs on every device and is itself differentiable.
    x, codebook, indices = ctx.saved_tensors
    dtype = reference.compute_dtype(x.dtype)
    g = grad_distances.to(dtype)[:, None]
    xf, chosen = x.to(dtype), codebook.to(dtype).index_select(0, indices)
    grad_sqnorm = None
    if ctx.metric == "cosine":  # d = 1 - x.c with unit inputs
        grad_x, grad_chosen = -chosen * g, -xf * g
    elif ctx.has_sqnorm:  # d = |x|^2 - 2 x.c + sqnorm[k]: sqnorm is an independent input
        grad_x, grad_chosen = 2.0 * (xf - chosen) * g, -2.0 * xf * g
        grad_sqnorm = torch.zeros(codebook.shape[0], dtype=dtype, device=x.device)
        grad_sqnorm = grad_sqnorm.index_add(0, indices, g[:, 0])
    else:  # d = |x - c|^2
        grad_x = 2.0 * (xf - chosen) * g
        grad_chosen = -grad_x
    grad_codebook = torch.zeros(codebook.shape, dtype=dtype, device=x.device)
    grad_codebook = grad_codebook.index_add(0, indices, grad_chosen)
    return grad_x.to(x.dtype), grad_codebook.to(codebook.dtype), grad_sqnorm, None, None, None


nearest_code.register_autograd(_nearest_code_backward, setup_context=_nearest_code_setup_context)

# Under autocast the search runs in float32: low-precision distances lose codes
# (vector-quantize-pytorch#114). Call it outside autocast with fp16/bf16 tensors to opt in.
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("lgvq::nearest_code", _device_type, torch.float32)
