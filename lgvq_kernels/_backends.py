"""Backend registry: the ops, where each backend implements them, which backend serves an op on
a device, and why the others cannot.

Backends:
  reference  pure PyTorch (lgvq_kernels.reference); any device, any dtype. The test oracle.
  native     the compiled extension lgvq_kernels._C: C++ on CPU tensors, CUDA on CUDA tensors.
  triton     Triton kernels: CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 (testing).

``backend="auto"`` picks, per device, the first usable backend in ``AUTO_ORDER`` and never the
Triton interpreter. The environment variable ``LGVQ_BACKEND`` replaces "auto" as the default.
An explicitly requested backend that is unusable raises ``BackendUnavailableError`` with the reason.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from typing import Callable, Iterable, Mapping, NamedTuple

import torch

from lgvq_kernels import reference

BACKENDS = ("reference", "native", "triton")

# Provisional order until GPU timings are committed in benchmarks/results: Triton uses tensor
# cores for fp16/bf16, the CUDA kernel is the fallback when Triton is missing.
AUTO_ORDER = {"cpu": ("native", "reference"), "cuda": ("triton", "native", "reference")}

# Floating dtypes the GPU kernels take (the CUDA kernels and every Triton kernel, interpreted
# or not); the reference and the C++ CPU kernels also take float64.
GPU_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Every op of torch.ops.lgvq and where each backend implements it: the reference as
# lgvq_kernels.reference.<op>, the native kernels as torch.ops.lgvq_C.<op>, the Triton launcher
# as (module in lgvq_kernels/triton/, function) below.
TRITON_LAUNCHERS = {
    "nearest_code": ("nearest_code", "nearest_code_forward"),
    "quantize_straight_through": ("quantize", "quantize_straight_through_forward"),
    "quantize_straight_through_backward": ("quantize", "quantize_straight_through_backward"),
    "codebook_statistics": ("codebook_ema", "codebook_statistics_forward"),
    "codebook_ema_update_": ("codebook_ema", "codebook_ema_update_forward_"),
    "relation_alignment_loss": ("relation", "relation_alignment_forward"),
    "relation_alignment_loss_backward": ("relation", "relation_alignment_backward"),
}
OPS = tuple(TRITON_LAUNCHERS)

# Size limits of a backend's kernels, checked by the registry so that backend="auto" passes over
# a backend that would refuse the call. The Triton relation kernels keep a sample's three
# [L, L] fp32 Gram tiles in one program; at L = 256 the backward needs 288 KiB of shared memory
# (see lgvq_kernels/triton/relation.py for the measured table).
TRITON_RELATION_MAX_WORDS = 128


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot serve the call: its device, its dtypes, a
    size limit of its kernels, or a missing build."""


class BackendInfo(NamedTuple):
    available: bool
    reason: str  # why it is unusable; "" when available


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when this torch has a usable GPU, else the CPU; any other name as
    ``torch.device(name)``. A CUDA device without CUDA raises ``ValueError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r}: CUDA is not available in this torch "
                         f"({torch.__version__})")
    return device


def _check_op(op: str) -> None:
    if op not in TRITON_LAUNCHERS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")


@functools.lru_cache(maxsize=None)
def _native_module():
    """Import the compiled extension once; return (module or None, reason)."""
    try:
        from lgvq_kernels import _C  # noqa: F401  (registers the lgvq_C:: ops on import)
    except ImportError as error:
        reason = (
            f"the compiled extension lgvq_kernels._C is not importable ({error}); "
            "rebuild with `pip install --no-build-isolation -e .` (LGVQ_BUILD_EXT=0 skips it)"
        )
        warnings.warn(f"lgvq: native backend unavailable, using the reference backend: {reason}",
                      RuntimeWarning, stacklevel=3)
        return None, reason
    return _C, ""


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not installed ({error})"
    return ""


@functools.lru_cache(maxsize=None)  # the extension's kernels do not change once it is loaded
def _native_info(device_type: str, op: str) -> BackendInfo:
    module, reason = _native_module()
    if module is None:
        return BackendInfo(False, reason)
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return BackendInfo(False, f"no native kernels for device type {device_type!r}")
    try:
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"lgvq_C::{op}", key)
    except RuntimeError:  # the schema itself is missing: an extension built from older sources
        return BackendInfo(False, f"the compiled extension has no op {op}; rebuild it with "
                                  "`pip install --no-build-isolation -e .`")
    if not has_kernel:
        if device_type == "cuda":
            return BackendInfo(False, "the extension was built without CUDA kernels "
                                      "(CPU-only torch or no nvcc at build time)")
        return BackendInfo(False, f"the extension has no {key} kernel for {op}")
    return BackendInfo(True, "")


def _triton_info(device_type: str, op: str) -> BackendInfo:
    error = _triton_import_error()
    if error:
        return BackendInfo(False, error)
    module = TRITON_LAUNCHERS[op][0]
    if importlib.util.find_spec(f"lgvq_kernels.triton.{module}") is None:
        return BackendInfo(False, f"no Triton kernel for {op}")
    if device_type == "cuda":
        return BackendInfo(True, "")
    if device_type == "cpu":
        if triton_interpreting():
            return BackendInfo(True, "")
        return BackendInfo(False, "Triton needs CUDA tensors; on CPU only under TRITON_INTERPRET=1 "
                                  "(set before lgvq_kernels is imported), for testing")
    return BackendInfo(False, f"Triton does not serve device type {device_type!r}")


def _dtype_info(backend: str, device_type: str, dtypes: Iterable[torch.dtype]) -> BackendInfo:
    if backend == "reference" or (backend == "native" and device_type != "cuda"):
        return BackendInfo(True, "")
    refused = sorted({str(dtype).removeprefix("torch.") for dtype in dtypes
                      if dtype not in GPU_KERNEL_DTYPES})
    if refused:
        return BackendInfo(False, f"its kernels take float32, float16 and bfloat16 tensors, not "
                                  f"{', '.join(refused)} (the reference backend takes every "
                                  "dtype, the native one float64 on CPU)")
    return BackendInfo(True, "")


def size_info(backend: str, op: str, sizes: Mapping[str, int] | None) -> BackendInfo:
    """Whether the kernels of ``backend`` take an ``op`` call of these ``sizes`` (names as in
    the op's docstring: "words" is the relation op's L, tokens per sample)."""
    sizes = sizes or {}
    if backend == "triton" and op.startswith("relation_alignment_loss"):
        words = int(sizes.get("words", 0))
        if words > TRITON_RELATION_MAX_WORDS:
            return BackendInfo(False, f"words has {words} tokens per sample; the triton backend "
                                      f"takes at most {TRITON_RELATION_MAX_WORDS} (use the "
                                      "native or reference backend)")
    return BackendInfo(True, "")


def backend_info(backend: str, device: torch.device | str, op: str,
                 dtypes: Iterable[torch.dtype] = (),
                 sizes: Mapping[str, int] | None = None) -> BackendInfo:
    """Whether ``backend`` can run ``op`` on ``device`` with floating inputs of ``dtypes`` and
    the ``sizes`` of ``size_info`` (and why not)."""
    _check_op(op)
    device_type = torch.device(device).type
    if backend == "reference":
        return BackendInfo(True, "")
    if backend == "native":
        info = _native_info(device_type, op)
    elif backend == "triton":
        info = _triton_info(device_type, op)
    else:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if not info.available:
        return info
    info = _dtype_info(backend, device_type, dtypes)
    return info if not info.available else size_info(backend, op, sizes)


def available_backends(op: str, device: torch.device | str = "cpu") -> dict[str, BackendInfo]:
    """Every backend with whether it can serve ``op`` on ``device`` and, if not, why."""
    return {name: backend_info(name, device, op) for name in BACKENDS}


def resolve_backend(backend: str, device: torch.device | str, op: str,
                    dtypes: Iterable[torch.dtype] = (),
                    sizes: Mapping[str, int] | None = None) -> str:
    """Turn a user's backend choice ("auto" or a name) into a backend that can run ``op`` on
    ``device`` with floating inputs of ``dtypes`` and the ``sizes`` of ``size_info``, or raise
    ``BackendUnavailableError`` saying why. "auto" never picks a backend that would refuse."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    _check_op(op)
    dtypes = tuple(dtypes)
    device_type = torch.device(device).type
    if backend == "auto":
        backend = os.environ.get("LGVQ_BACKEND", "auto") or "auto"
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ("reference",)):
            if name == "triton" and device_type != "cuda":
                continue  # never the interpreter
            if backend_info(name, device_type, op, dtypes, sizes).available:
                return name
        return "reference"
    info = backend_info(backend, device_type, op, dtypes, sizes)
    if not info.available:
        raise BackendUnavailableError(
            f"backend {backend!r} cannot serve {op} on {device_type} tensors: {info.reason}")
    return backend


# --------------------------------------------------------------------------------------------
# the implementation of an op on a backend: what the torch.ops.lgvq ops forward to
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _native(op: str) -> Callable:
    """The compiled op ``torch.ops.lgvq_C.<op>``, loaded on the first call and then held (a
    fresh closure and a torch.ops attribute look-up per call cost ~2 us of a ~20 us call)."""
    handle = None

    def call(*args):
        nonlocal handle
        if handle is None:
            _native_module()  # loads the extension (registers torch.ops.lgvq_C)
            handle = getattr(torch.ops.lgvq_C, op)
        return handle(*args)

    call.__name__ = f"native_{op}"
    return call


def _unit_for_cosine(x, codebook, metric):
    """The CUDA and Triton nearest-code kernels (Triton interpreted on CPU tensors too) take
    unit x rows and unit codes for cosine; the op's contract gives them any norm. The C++ CPU
    kernels and the reference make no normalised copy: they fold the norms in themselves."""
    if metric != "cosine":
        return x, codebook
    return (torch.nn.functional.normalize(x, dim=-1),
            torch.nn.functional.normalize(codebook, dim=-1))


def _native_nearest_code(x, codebook, codebook_sqnorm, metric, precision):
    # The compiled op takes a cosine flag and has no tf32 mode: it ignores precision.
    if x.device.type != "cpu":
        x, codebook = _unit_for_cosine(x, codebook, metric)
    return _native("nearest_code")(x, codebook, codebook_sqnorm, metric == "cosine")


def _triton_nearest_code(x, codebook, codebook_sqnorm, metric, precision):
    x, codebook = _unit_for_cosine(x, codebook, metric)
    return _triton("nearest_code")(x, codebook, codebook_sqnorm, metric, precision)


def _triton(op: str) -> Callable:
    module, function = TRITON_LAUNCHERS[op]

    def call(*args):
        # imported on first call: importing a Triton module compiles nothing but needs triton
        return getattr(importlib.import_module(f"lgvq_kernels.triton.{module}"), function)(*args)

    call.__name__ = f"triton_{function}"
    return call


@functools.lru_cache(maxsize=None)
def implementation(op: str, backend: str) -> Callable:
    """The function that runs ``op`` on ``backend``: inputs already validated and laid out by
    lgvq_kernels.functional, signatures those of lgvq_kernels.reference."""
    _check_op(op)
    if backend == "reference":
        return getattr(reference, op)
    if backend == "native":
        return _native_nearest_code if op == "nearest_code" else _native(op)
    if backend == "triton":
        return _triton_nearest_code if op == "nearest_code" else _triton(op)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
