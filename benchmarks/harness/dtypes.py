"""dtype modes: the names a benchmark case runs under, and the matmul precision each one sets.

A mode is the storage dtype of the inputs plus the precision of their products: "float32",
"tf32" (float32 tensors, TF32 tensor-core products; CUDA only), "bfloat16", "float16",
"float64". The harness sets the precision around every call, so factories need not.
"""

from __future__ import annotations

import contextlib

import torch

# dtype mode name -> (storage dtype, matmul precision)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "ieee"),
    "tf32": (torch.float32, "tf32"),
    "bfloat16": (torch.bfloat16, "ieee"),
    "float16": (torch.float16, "ieee"),
    "float64": (torch.float64, "ieee"),
}


def torch_dtype(dtype: str) -> torch.dtype:
    """Storage dtype of a dtype mode name ("tf32" -> torch.float32)."""
    return DTYPES[dtype][0]


def precision(dtype: str) -> str:
    """Matmul precision of a dtype mode name: "tf32" or "ieee"."""
    return DTYPES[dtype][1]


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=torch_dtype(dtype)).element_size()


def dtype_reason(dtype: str, device: torch.device) -> str:
    """Why a dtype mode cannot run on a device ("" when it can)."""
    if dtype not in DTYPES:
        return f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}"
    if dtype == "tf32" and device.type != "cuda":
        return "tf32 is a CUDA tensor-core mode"
    return ""


@contextlib.contextmanager
def matmul_precision(dtype: str, device: torch.device):
    """TF32 matmuls on CUDA for the "tf32" mode, exact float32 otherwise; restored after."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision(dtype) == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
