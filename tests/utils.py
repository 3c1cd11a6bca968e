"""What the kernel tests share: which backends can run here, the tolerance tables, and
comparisons that say what went wrong.

Tolerances are measured against a float64 oracle (lgvq_kernels.reference on float64 inputs, or
a plain-autograd formula) unless the table says otherwise. The kernels accumulate in float32
(float64 for float64 inputs) whatever the input dtype, so an output differs from the oracle by
the float32 summation error plus one rounding to its own dtype.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import lgvq_kernels
from lgvq_kernels._backends import triton_interpreting

INTERPRET = triton_interpreting()
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_DTYPES = FLOAT_DTYPES[:3]  # what the CUDA and Triton kernels take

# ------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------


def usable_backends(op: str, device: str = "cpu") -> list[str]:
    """Backends that can run ``op`` on ``device`` here (the Triton interpreter included)."""
    return [name for name, info in lgvq_kernels.available_backends(op, device).items()
            if info.available]


def fast_backends(op: str) -> list[str]:
    """The usable CPU backends less the Triton interpreter (~0.5 ms per interpreted op): for
    tests whose shapes or repetitions the interpreter cannot afford."""
    return [name for name in usable_backends(op) if name != "triton"]


def device_backends(op: str) -> list:
    """(device, backend) pairs: every usable CPU backend, and the CUDA ones (marked cuda)."""
    pairs = [("cpu", name) for name in usable_backends(op)]
    if torch.cuda.is_available():
        pairs += [pytest.param("cuda", name, marks=pytest.mark.cuda)
                  for name in usable_backends(op, "cuda")]
    return pairs


def kernel_device(backend: str) -> str:
    """Where a backend's kernels are tested directly: native on the CPU (its CUDA kernels are
    tested through the public ops on a GPU), Triton on the CPU interpreter when it is on, else
    on the GPU."""
    return "cpu" if backend != "triton" or INTERPRET else "cuda"


def supports(backend: str, dtype: torch.dtype, device: str = "cpu") -> bool:
    """Whether the backend's kernels take ``dtype`` (float64: reference, and native on CPU)."""
    return dtype in GPU_DTYPES or backend == "reference" or (backend == "native"
                                                             and device == "cpu")


def skip_unsupported(backend: str, dtype: torch.dtype, device: str = "cpu") -> None:
    if not supports(backend, dtype, device):
        pytest.skip(f"{backend} on {device} does not take {dtype}")


# The exception the compiled ops' own checks raise (direct calls to torch.ops.lgvq_C, past
# the public ops' validation), by kind of mistake.
NATIVE_CHECK_ERRORS = {"dtype": TypeError, "value": ValueError}

# ------------------------------------------------------------------------------------------
# tolerances
# ------------------------------------------------------------------------------------------

# An output against the oracle, relative to the largest oracle magnitude, by the output's
# dtype: 16-bit outputs are dominated by their final rounding (one ulp: 2^-10, 2^-7), float32
# by accumulation.
SCALED_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3,
               torch.bfloat16: 8e-3}
# Element by element, an output against the same computation by another backend on the same
# inputs: both accumulate in float32 and round once, so they differ by the float32 summation
# order, one ulp of the output dtype at most.
OUTPUT_TOLERANCE = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
}
# A float32 loss or statistic against the float64 oracle (sums of up to a few thousand terms).
FLOAT32_ORACLE_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# A loss of the public ops against the oracle, by input dtype: float32 accumulation whatever the
# input dtype (float64 for float64).
LOSS_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5,
                  torch.bfloat16: 1e-5}
# A gradient stored in a 16-bit input dtype (one rounding of a float32 value, plus the
# rounding of the input itself before the oracle sees it).
LOW_PRECISION_GRAD_TOLERANCE = 1e-2


# ------------------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------------------


def assert_within_scale(out: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype, what: str,
                        rtol: float | None = None) -> None:
    """``out`` has ``dtype`` and ``oracle``'s shape, is finite, and is within ``rtol`` (default
    SCALED_RTOL of dtype) times the largest oracle magnitude of it, plus the spacing of
    subnormals (float16 gradients of large batches fall there)."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(oracle.shape)}"
    if oracle.numel() == 0:
        return
    out64, ref64 = out.detach().cpu().double(), oracle.detach().cpu().double()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    rtol = SCALED_RTOL[dtype] if rtol is None else rtol
    scale = max(ref64.abs().max().item(), 1e-30)
    err = (out64 - ref64).abs().max().item()
    bound = rtol * scale + torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (scale {scale:.3g})"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **tolerance) -> None:
    """Same shape, and values within ``tolerance`` (default: OUTPUT_TOLERANCE of actual's
    dtype), compared in float64 on the CPU."""
    tolerance = tolerance or OUTPUT_TOLERANCE[actual.dtype]
    assert actual.shape == expected.shape, \
        f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.detach().cpu().double(),
                               expected.detach().cpu().double(), **tolerance)


def float64_copies(*tensors):
    """The oracle's inputs: floating tensors in float64, the rest (indices, masks, None) as
    they are."""
    return [t.double() if t is not None and t.is_floating_point() else t for t in tensors]


# ------------------------------------------------------------------------------------------
# compiler runs (nvcc, g++) of the build-check tests

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPILE_TIMEOUT_S = 300


def run_compiler(command: list[str], what: str, timeout: float = COMPILE_TIMEOUT_S) -> None:
    """Run a compiler from the repository root; a failure or time-out fails the test with the
    command and the compiler's output."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: the compiler ran past {timeout} s: {' '.join(command)}")
    if result.returncode != 0:
        pytest.fail(f"{what} failed (exit {result.returncode}):\n{' '.join(command)}\n"
                    f"{result.stderr[-8000:]}{result.stdout[-2000:]}")
