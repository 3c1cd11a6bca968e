"""Public ops of lgvq_kernels. Every argument's shape and dtype is given here; the functions
validate their inputs before any kernel runs, so that a mistake raises the same exception on
every backend and device (errors name the argument): a wrong Python type or tensor dtype
raises ``TypeError``; a wrong shape, value, out-of-range index (checked on CPU tensors) or a
device mismatch raises ``ValueError``; a valid call that the chosen backend cannot serve
raises ``BackendUnavailableError``. They lay the inputs out once, resolve the backend and call
the registered ``torch.ops.lgvq`` op. Modules call these and never a kernel directly.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
from torch import Tensor

from lgvq_kernels import _library  # noqa: F401  (registers torch.ops.lgvq.*)
from lgvq_kernels._backends import implementation, resolve_backend
from lgvq_kernels.reference import METRICS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PRECISIONS = ("ieee", "tf32")


class NearestCode(NamedTuple):
    indices: Tensor  # int64 [...], in [0, K)
    distances: Tensor  # float32 [...] (float64 for float64 inputs)


# --------------------------------------------------------------------------------------------
# validation helpers: messages name the argument, the expectation and what was received
# --------------------------------------------------------------------------------------------


def check_tensor(name: str, value, *, dims: int | None = None, min_dims: int | None = None,
                 dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {value.dtype}")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(value.shape)}")
    if min_dims is not None and value.dim() < min_dims:
        raise ValueError(f"{name} must have at least {min_dims} dimension(s), "
                         f"got shape {tuple(value.shape)}")


def check_same_device(**tensors: Tensor | None) -> None:
    first_name = first = None
    for name, value in tensors.items():  # (no intermediate list: this runs on every call)
        if value is None:
            continue
        if first is None:
            first_name, first = name, value
        elif value.device != first.device:
            raise ValueError(f"{name} is on {value.device} but {first_name} is on {first.device}; "
                             "all tensors must be on one device")


def check_all_finite(name: str, value: Tensor) -> None:
    """Raise if ``value`` holds NaN or Inf (one host synchronisation)."""
    if value.numel() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf); "
                         "pass check_finite=False to skip this check")


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {tuple(choices)}; got "
                        f"{type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_real(name: str, value) -> None:
    # (torch.compile may hand a float or int argument over as a symbolic number)
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymInt,
                                                         torch.SymFloat)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")


@functools.lru_cache(maxsize=1024)
def _resolve_cached(backend: str, environment: tuple, device: torch.device, op: str,
                    dtypes: tuple, words: int) -> str:
    return resolve_backend(backend, device, op, dtypes, {"words": words} if words else None)


def _constant_to_compilers(fn):
    """``torch.compiler.assume_constant_result`` without its import of torch._dynamo (1.2 s of
    every process's ``import lgvq_kernels`` on the 2-core EPYC): that decorator sets this one
    flag, which dynamo reads when it traces a call (tests/kernels/test_imports.py pins it)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_to_compilers
def _resolve(backend: str, device: torch.device, op: str, *dtypes: torch.dtype,
             words: int = 0) -> str:
    """The backend that serves ``op`` on ``device`` for floating inputs of ``dtypes`` (and, for
    the relation op, ``words`` tokens per sample): a constant to torch.compile (the choice
    depends on nothing a graph computes). Remembered per arguments and the environment
    variables the choice reads (the extension's kernels do not change once loaded): 12 us of
    registry look-ups per call become ~1 us. Errors are not remembered (they raise again)."""
    environment = (os.environ.get("LGVQ_BACKEND"), os.environ.get("TRITON_INTERPRET"))
    return _resolve_cached(backend, environment, device, op, dtypes, words)


def _eager_call(*tensors: Tensor | None) -> bool:
    """Whether an op call may skip the torch.ops dispatcher and run its backend directly: plain
    tensors in eager mode with nothing that needs the registered op (its autograd formula, its
    autocast rule, a compiler, a tensor subclass or mode). The public call measured 57-63 us
    with the dispatcher, 25-27 us without (kernel 8.5 us; 2-core EPYC, 1 thread, 4x8 inputs)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() \
            or torch._C._is_torch_function_mode_enabled() \
            or torch.is_autocast_enabled(tensors[0].device.type):  # (one device: checked)
        return False
    grad = torch.is_grad_enabled()
    for tensor in tensors:  # (a loop: a generator in all() cost ~1 us of a ~25 us call)
        if tensor is not None and (type(tensor) is not Tensor or (grad and tensor.requires_grad)):
            return False
    return True


# --------------------------------------------------------------------------------------------
# nearest code
# --------------------------------------------------------------------------------------------


def nearest_code(x: Tensor, codebook: Tensor, *, metric: str = "l2",
                 codebook_sqnorm: Tensor | None = None, precision: str = "ieee",
                 backend: str = "auto", check_finite: bool = False) -> NearestCode:
    """Nearest codebook entry of every vector, without forming the N x K distance matrix.

    Args:
      x: ``[..., D]`` float32/float16/bfloat16/float64, any strides.
      codebook: ``[K, D]`` floating, K >= 1, on x's device. A dtype different from x's is
        promoted with x's to their common dtype.
      metric: ``"l2"`` (squared Euclidean distance) or ``"cosine"`` (1 - cosine similarity, in
        float32 (float64 for float64) with norms clamped at 1e-12 as ``F.normalize`` does; a
        zero row has similarity 0 with every code).
      codebook_sqnorm: optional ``[K]`` precomputed ``(codebook ** 2).sum(-1)`` (l2 only).
      precision: ``"ieee"`` exact float32 products (default) or ``"tf32"`` (CUDA only; faster,
        ~1e-3 relative error in the cross term).
      backend: ``"auto"``, ``"reference"``, ``"native"`` or ``"triton"``.
      check_finite: raise ``ValueError`` if x or codebook holds NaN/Inf (one host sync).

    Returns:
      ``NearestCode(indices, distances)``: indices int64 ``[...]`` in ``[0, K)``, ties to the
      lowest index; distances ``[...]`` float32 (float64 for float64 inputs), accumulated in
      float32 whatever the input dtype. Non-finite scores are never chosen unless a whole row is
      non-finite, where index 0 is returned. Differentiable in ``distances`` (w.r.t. x, codebook
      and codebook_sqnorm); under autocast the search runs in float32.
    """
    check_tensor("x", x, min_dims=1)
    check_tensor("codebook", codebook, dims=2)
    if codebook_sqnorm is not None:
        check_tensor("codebook_sqnorm", codebook_sqnorm, dims=1)
    check_same_device(x=x, codebook=codebook, codebook_sqnorm=codebook_sqnorm)
    check_choice("metric", metric, METRICS)
    check_choice("precision", precision, PRECISIONS)
    num_codes, dim = codebook.shape
    if num_codes == 0:
        raise ValueError("codebook must hold at least one code (K >= 1), got shape "
                         f"{tuple(codebook.shape)}")
    if dim == 0 or x.shape[-1] != dim:
        raise ValueError(f"x has last dimension {x.shape[-1]} but codebook has D={dim}; "
                         f"x must be [..., {dim}] with D >= 1")
    if codebook_sqnorm is not None:
        if metric != "l2":
            raise ValueError("codebook_sqnorm applies to metric='l2' only")
        if codebook_sqnorm.shape[0] != num_codes:
            raise ValueError(f"codebook_sqnorm must have shape [{num_codes}], got "
                             f"{tuple(codebook_sqnorm.shape)}")
    if check_finite:
        check_all_finite("x", x)
        check_all_finite("codebook", codebook)
    lead_shape = x.shape[:-1]
    dtype = torch.promote_types(x.dtype, codebook.dtype)
    resolved = _resolve(backend, x.device, "nearest_code", dtype)
    # (each of reshape, .to and .contiguous is a dispatcher call, ~1-3 us even where it has
    # nothing to do: skipped then)
    flat = x if x.dim() == 2 else x.reshape(-1, dim)
    if flat.dtype != dtype:
        flat = flat.to(dtype)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    codes = codebook if codebook.dtype == dtype else codebook.to(dtype)
    if not codes.is_contiguous():
        codes = codes.contiguous()
    if metric == "cosine":  # in float32 (at least): rounding unit rows back to fp16/bf16
        # would cost ~2^-11 relative error in every similarity. Nothing is normalised here:
        # the op takes x and codes of any norm (the C++ CPU kernels and the reference fold
        # the norms into the search, no N x D or K x D copy; the GPU backends normalise
        # first, _backends.py).
        work = torch.promote_types(dtype, torch.float32)
        flat = flat.to(work)
        codes = codes.to(work)
    if codebook_sqnorm is not None:
        codebook_sqnorm = codebook_sqnorm.contiguous()
    op = implementation("nearest_code", resolved) \
        if _eager_call(flat, codes, codebook_sqnorm) else \
        functools.partial(torch.ops.lgvq.nearest_code, backend=resolved)
    indices, distances = op(flat, codes, codebook_sqnorm, metric, precision)
    if x.dim() == 2:
        return NearestCode(indices, distances)
    return NearestCode(indices.reshape(lead_shape), distances.reshape(lead_shape))


# --------------------------------------------------------------------------------------------
# quantize with straight-through
# --------------------------------------------------------------------------------------------


class Quantized(NamedTuple):
    quantized: Tensor  # [..., D], x.dtype: the chosen codes, gradient straight through to x
    commitment_loss: Tensor  # 0-d: mean |x - sg(e)|^2, gradient to x only
    codebook_loss: Tensor  # 0-d: mean |sg(x) - e|^2, gradient to the codebook only


def _check_indices(name: str, indices, shape, device) -> None:
    check_tensor(name, indices, dtypes=(torch.int64,))
    if tuple(indices.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(indices.shape)}")
    if indices.device != device:
        raise ValueError(f"{name} is on {indices.device} but x is on {device}")


def _check_index_range(name: str, indices: Tensor, num_codes: int) -> None:
    """Raise if an index is outside [0, num_codes). Checked on CPU tensors only, where it costs
    no device synchronisation; GPU kernels guard their loads instead (an out-of-range row reads
    zeros and contributes nothing)."""
    if torch.compiler.is_compiling() or indices.device.type != "cpu" or indices.numel() == 0:
        return  # (a data-dependent host read cannot be traced; compiled callers skip it)
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= num_codes:
        bad = low if low < 0 else high
        raise ValueError(f"{name} must lie in [0, {num_codes}), found {bad}")


def _check_mask(mask, shape, device) -> None:
    if mask is None:
        return
    check_tensor("mask", mask, dtypes=(torch.bool,))
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but x is on {device}")


def quantize_straight_through(x: Tensor, codebook: Tensor, indices: Tensor, *,
                              mask: Tensor | None = None, backend: str = "auto") -> Quantized:
    """Gather the chosen codes, with the straight-through estimator and both VQ losses, fused.

    Args:
      x: ``[..., D]`` float32/float16/bfloat16/float64.
      codebook: ``[K, D]`` same dtype as x (promoted otherwise).
      indices: int64 ``x.shape[:-1]``, in ``[0, K)`` (e.g. from :func:`nearest_code`);
        checked on CPU (ValueError), guarded on GPU (an out-of-range row reads zeros).
      mask: optional bool ``x.shape[:-1]``: rows with False are ignored by both losses.
      backend: ``"auto"``, ``"reference"``, ``"native"`` or ``"triton"``.

    Returns ``Quantized(quantized, commitment_loss, codebook_loss)``: ``quantized`` has the
    value ``codebook[indices]`` and passes its gradient straight through to ``x``; both losses
    are the mean over valid rows and D of ``(x - codebook[indices])^2`` (float32, 0 with no
    valid row); the commitment loss sends gradient to ``x``, the codebook loss to ``codebook``
    (a deterministic segment sum). Weight them as you like: ``beta * commitment + codebook``.
    """
    check_tensor("x", x, min_dims=1)
    check_tensor("codebook", codebook, dims=2)
    check_same_device(x=x, codebook=codebook)
    if x.shape[-1] != codebook.shape[1] or codebook.shape[0] == 0:
        raise ValueError(f"x must be [..., D] and codebook [K >= 1, D] with the same D, got "
                         f"{tuple(x.shape)} and {tuple(codebook.shape)}")
    _check_indices("indices", indices, x.shape[:-1], x.device)
    _check_index_range("indices", indices, codebook.shape[0])
    _check_mask(mask, x.shape[:-1], x.device)
    dtype = torch.promote_types(x.dtype, codebook.dtype)
    resolved = _resolve(backend, x.device, "quantize_straight_through", dtype)
    dim = codebook.shape[1]
    flat = x.reshape(-1, dim).to(dtype).contiguous()
    quantized, commitment, codebook_loss = torch.ops.lgvq.quantize_straight_through(
        flat, codebook.to(dtype).contiguous(), indices.reshape(-1).contiguous(),
        None if mask is None else mask.reshape(-1).contiguous(), resolved)
    return Quantized(quantized.reshape(x.shape), commitment, codebook_loss)


# --------------------------------------------------------------------------------------------
# codebook statistics and EMA update
# --------------------------------------------------------------------------------------------


def codebook_statistics(x: Tensor, indices: Tensor, num_codes: int, *,
                        mask: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Per-code sums and counts of the assigned vectors, packed for one all-reduce.

    x ``[..., D]`` floating, indices int64 ``x.shape[:-1]`` in ``[0, num_codes)``, mask optional
    bool ``x.shape[:-1]``. Returns float32 ``[num_codes, D + 1]`` (float64 for float64 x):
    ``[:, :D]`` sums, ``[:, D]`` counts. Deterministic (no atomics): same bits every run.
    """
    check_tensor("x", x, min_dims=1)
    if isinstance(num_codes, bool) or not isinstance(num_codes, (int, torch.SymInt)):
        raise TypeError(f"num_codes must be an int, got {type(num_codes).__name__}")
    if num_codes < 1:
        raise ValueError(f"num_codes must be a positive int, got {num_codes!r}")
    _check_indices("indices", indices, x.shape[:-1], x.device)
    _check_index_range("indices", indices, num_codes)
    _check_mask(mask, x.shape[:-1], x.device)
    resolved = _resolve(backend, x.device, "codebook_statistics", x.dtype)
    dim = x.shape[-1]
    return torch.ops.lgvq.codebook_statistics(
        x.reshape(-1, dim).contiguous(), indices.reshape(-1).contiguous(), num_codes,
        None if mask is None else mask.reshape(-1).contiguous(), resolved)


def codebook_ema_update_(stats: Tensor, cluster_size: Tensor, embed_sum: Tensor,
                         codebook: Tensor, *, decay: float, eps: float = 1e-5,
                         dead_threshold: float = 0.0, replacement: Tensor | None = None,
                         backend: str = "auto") -> Tensor:
    """EMA codebook update in place, on device, without host synchronisation.

    stats ``[K, D + 1]`` from :func:`codebook_statistics` (all-reduced under DDP);
    cluster_size ``[K]`` and embed_sum ``[K, D]`` float32/float64 EMA state; codebook ``[K, D]``
    (overwritten with embed_sum / Laplace-smoothed cluster_size); decay in [0, 1]; eps > 0.
    Dead codes (cluster_size < dead_threshold) take the rows of ``replacement`` ``[K, D]`` when
    given. Returns the dead-code mask ``[K]`` bool. See reference.codebook_ema_update_.
    """
    check_tensor("stats", stats, dims=2, dtypes=(torch.float32, torch.float64))
    check_tensor("cluster_size", cluster_size, dims=1, dtypes=(torch.float32, torch.float64))
    check_tensor("embed_sum", embed_sum, dims=2, dtypes=(cluster_size.dtype,))
    check_tensor("codebook", codebook, dims=2)
    if replacement is not None:
        check_tensor("replacement", replacement, dims=2)
    for name, value in (("decay", decay), ("eps", eps), ("dead_threshold", dead_threshold)):
        check_real(name, value)
    check_same_device(codebook=codebook, stats=stats, cluster_size=cluster_size,
                      embed_sum=embed_sum, replacement=replacement)
    num_codes, dim = codebook.shape
    if tuple(stats.shape) != (num_codes, dim + 1):
        raise ValueError(f"stats must have shape {(num_codes, dim + 1)}, got {tuple(stats.shape)}")
    if tuple(cluster_size.shape) != (num_codes,) or tuple(embed_sum.shape) != (num_codes, dim):
        raise ValueError(f"cluster_size must be [{num_codes}] and embed_sum [{num_codes}, {dim}], "
                         f"got {tuple(cluster_size.shape)} and {tuple(embed_sum.shape)}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if replacement is not None:
        if tuple(replacement.shape) != (num_codes, dim):
            raise ValueError(f"replacement must have shape {(num_codes, dim)}, got "
                             f"{tuple(replacement.shape)}")
        replacement = replacement.contiguous()
    for name, tensor in (("cluster_size", cluster_size), ("embed_sum", embed_sum),
                         ("codebook", codebook)):
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
    resolved = _resolve(backend, codebook.device, "codebook_ema_update_", stats.dtype,
                        cluster_size.dtype, codebook.dtype,
                        *(() if replacement is None else (replacement.dtype,)))
    return torch.ops.lgvq.codebook_ema_update_(stats.contiguous(), cluster_size, embed_sum,
                                               codebook, float(decay), float(eps),
                                               float(dead_threshold), replacement, resolved)


# --------------------------------------------------------------------------------------------
# relationship alignment (LG-VQ)
# --------------------------------------------------------------------------------------------


class RelationAlignment(NamedTuple):
    loss: Tensor  # 0-d float32: mean over B*L*L of (P - Q)^2
    chosen: Tensor  # int64 [B, L]: the visual position each word aligned to


def relation_alignment_loss(words: Tensor, visual: Tensor, codes: Tensor, word_mask: Tensor, *,
                            backend: str = "auto") -> RelationAlignment:
    """LG-VQ relationship-alignment loss, fused: per-word argmax over the image's visual tokens,
    gather of the projected code there, both normalised Gram matrices, masked mean squared
    difference.

    Args:
      words: ``[B, L, C]`` text-token features (the frozen encoder's T; normalised inside).
      visual: ``[B, M, C]`` visual tokens (Zvt without CLS; normalised inside).
      codes: ``[B, M, C]`` projected quantized codes g(zq_st), the only differentiable input.
      word_mask: bool ``[B, L]``: real tokens (padding False).
    With W = normalize(words), V = normalize(visual), for each word i: p_i = argmax_p W_i.V_p
    (first maximum), s_i = W_i.V_{p_i}; c_i = m_i normalize(s_i codes[p_i]); w_i = m_i W_i;
    loss = mean over B*L*L of (c c^T - w w^T)^2. Gradient flows to ``codes`` only: the word
    Gram matrix is the stop-gradient target, the argmax is hard, and only the sign of s_i
    survives the normalisation.
    """
    check_tensor("words", words, dims=3)
    check_tensor("visual", visual, dims=3)
    check_tensor("codes", codes, dims=3)
    check_tensor("word_mask", word_mask, dims=2, dtypes=(torch.bool,))
    check_same_device(codes=codes, words=words, visual=visual, word_mask=word_mask)
    batch, length, width = words.shape
    if visual.shape[0] != batch or visual.shape[2] != width:
        raise ValueError(f"visual must be [{batch}, M, {width}] to match words, got "
                         f"{tuple(visual.shape)}")
    if tuple(codes.shape) != tuple(visual.shape):
        raise ValueError(f"codes must have the shape of visual {tuple(visual.shape)}, got "
                         f"{tuple(codes.shape)}")
    if tuple(word_mask.shape) != (batch, length):
        raise ValueError(f"word_mask must have shape {(batch, length)}, got "
                         f"{tuple(word_mask.shape)}")
    if visual.shape[1] == 0:
        raise ValueError("visual must hold at least one position (M >= 1)")
    resolved = _resolve(backend, codes.device, "relation_alignment_loss", words.dtype,
                        visual.dtype, codes.dtype, words=length)
    loss, chosen = torch.ops.lgvq.relation_alignment_loss(
        words.contiguous(), visual.contiguous(), codes.contiguous(), word_mask.contiguous(),
        resolved)
    return RelationAlignment(loss, chosen)
