"""What the Triton kernel files share: the interpreter flag, the checks of what no Triton kernel
takes (a device other than CUDA, a dtype other than float32/float16/bfloat16), the device guard
of a launch, bf16 rounding under the interpreter, and the code-sorted row order of the
segment-sum kernels (quantize backward, codebook statistics).

The launchers take inputs validated and laid out by lgvq_kernels.functional (shapes, index
ranges, one device, one dtype); they check only what their kernels cannot take, and raise
``BackendUnavailableError`` for it, as the backend registry does.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from lgvq_kernels._backends import (GPU_KERNEL_DTYPES, BackendUnavailableError,
                                    triton_interpreting)

# Read once, like triton.jit does when it decorates the kernels.
INTERPRET = triton_interpreting()

SUPPORTED_DTYPES = GPU_KERNEL_DTYPES


def check_can_serve(**tensors: torch.Tensor | None) -> None:
    """Raise ``BackendUnavailableError`` for a tensor off CUDA (on the CPU only under the
    interpreter) or of a floating dtype no Triton kernel takes; None entries are skipped."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device.type != "cuda" and not (INTERPRET and tensor.device.type == "cpu"):
            raise BackendUnavailableError(
                f"{name} is on {tensor.device}; the triton backend needs CUDA tensors (CPU "
                "tensors only under TRITON_INTERPRET=1)")
        if tensor.is_floating_point() and tensor.dtype not in SUPPORTED_DTYPES:
            raise BackendUnavailableError(
                f"{name} has dtype {tensor.dtype}; the triton backend supports "
                "float32/float16/bfloat16 (use the reference or native backend)")


def check_same_dtype(x: torch.Tensor, codebook: torch.Tensor) -> None:
    """The row kernels read x and the codebook as one dtype (lgvq_kernels.functional promotes
    them to their common dtype)."""
    if codebook.dtype != x.dtype:
        raise TypeError(f"codebook has dtype {codebook.dtype} but x has {x.dtype}; "
                        "they must match")


def device_guard(tensor: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else nullcontext()


@triton.jit
def round_to_bfloat16(value):
    """fp32 → the nearest bfloat16 value (ties to even), still as fp32, so that the cast of a
    store is exact. Interpreter only: its fp32 → bf16 cast truncates (a GPU rounds to nearest).
    NaN passes unchanged (the carry could wrap a NaN's bits)."""
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(value != value, value, rounded.to(tl.float32, bitcast=True))


def contiguous_rows(indices: torch.Tensor, mask: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """indices [N] and mask [N] or None, contiguous: the kernels index them by row number."""
    return indices.contiguous(), None if mask is None else mask.contiguous()


def segment_block_rows(num_rows: int, num_codes: int) -> int:
    """Rows per tile of a code's segment: about the mean segment length, within [16, 64]."""
    mean = triton.cdiv(num_rows, max(num_codes, 1))
    return min(64, max(16, triton.next_power_of_2(mean)))


def sort_by_code(indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """indices [N] int64 → (order [N] int64: row numbers sorted by code, ascending within a
    code; offsets [K + 1] int64: code k owns order[offsets[k] : offsets[k + 1]]).

    Both stay on the device: searchsorted over the sorted codes, unlike bincount, needs no
    host sync to size its output. Indices outside [0, K) fall outside every segment."""
    sorted_codes, order = torch.sort(indices, stable=True)
    boundaries = torch.arange(num_codes + 1, dtype=sorted_codes.dtype, device=indices.device)
    return order, torch.searchsorted(sorted_codes, boundaries)
