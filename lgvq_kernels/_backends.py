"""Backend registry: which backend serves an op on a device, and why the others cannot.

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
import importlib.util
import os
import warnings
from typing import NamedTuple

import torch

BACKENDS = ("reference", "native", "triton")

# Provisional order until GPU timings are committed in benchmarks/results: Triton uses tensor
# cores for fp16/bf16, the CUDA kernel is the fallback when Triton is missing.
AUTO_ORDER = {"cpu": ("native", "reference"), "cuda": ("triton", "native", "reference")}


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot serve tensors on this device."""


class BackendInfo(NamedTuple):
    available: bool
    reason: str  # why it is unusable; "" when available


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def _native_info(device_type: str, op: str = "nearest_code") -> BackendInfo:
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


# The Triton module that implements each op (lgvq_kernels/triton/<module>.py).
TRITON_MODULES = {
    "nearest_code": "nearest_code",
    "quantize_straight_through": "quantize",
    "quantize_straight_through_backward": "quantize",
    "codebook_statistics": "codebook_ema",
    "codebook_ema_update_": "codebook_ema",
    "relation_alignment_loss": "relation",
    "relation_alignment_loss_backward": "relation",
}


def _triton_info(device_type: str, op: str = "nearest_code") -> BackendInfo:
    error = _triton_import_error()
    if error:
        return BackendInfo(False, error)
    module = TRITON_MODULES.get(op)
    if module is None or importlib.util.find_spec(f"lgvq_kernels.triton.{module}") is None:
        return BackendInfo(False, f"no Triton kernel for {op}")
    if device_type == "cuda":
        return BackendInfo(True, "")
    if device_type == "cpu":
        if triton_interpreting():
            return BackendInfo(True, "")
        return BackendInfo(False, "Triton needs CUDA tensors; on CPU only under TRITON_INTERPRET=1 "
                                  "(set before lgvq_kernels is imported), for testing")
    return BackendInfo(False, f"Triton does not serve device type {device_type!r}")


def backend_info(backend: str, device: torch.device | str, op: str = "nearest_code") -> BackendInfo:
    """Whether ``backend`` can run ``op`` on ``device`` (and why not)."""
    device_type = torch.device(device).type
    if backend == "reference":
        return BackendInfo(True, "")
    if backend == "native":
        return _native_info(device_type, op)
    if backend == "triton":
        return _triton_info(device_type, op)
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def available_backends(device: torch.device | str = "cpu") -> dict[str, BackendInfo]:
    """Every backend with whether it can serve tensors on ``device`` and, if not, why."""
    return {name: backend_info(name, device) for name in BACKENDS}


def resolve_backend(backend: str, device: torch.device | str, op: str = "nearest_code") -> str:
    """Turn a user's backend choice ("auto" or a name) into a backend that can run ``op`` on
    ``device``, or raise ``BackendUnavailableError`` saying why."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    device_type = torch.device(device).type
    if backend == "auto":
        backend = os.environ.get("LGVQ_BACKEND", "auto") or "auto"
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ("reference",)):
            if name == "triton" and device_type != "cuda":
                continue  # never the interpreter
            if backend_info(name, device_type, op).available:
                return name
        return "reference"
    info = backend_info(backend, device_type, op)
    if not info.available:
        raise BackendUnavailableError(
            f"backend {backend!r} cannot serve {device_type} tensors: {info.reason}")
    return backend
