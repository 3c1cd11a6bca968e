"""Runs the CUDA nearest-code kernels without a GPU: emulate_nearest_code.cpp compiles
csrc/cuda/nearest_code.cu with the host compiler, runs every CUDA thread as a fiber and compares
each result bit for bit with an oracle that repeats the kernel's fp32 arithmetic (ties, non-finite
scores, signed zeros, D/N/K tails, codebook splits, grid-stride loops; fp32, fp16, bf16).

The plain build is quick; the AddressSanitizer + UBSan build (out-of-bounds global and shared
accesses) is marked slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "emulate_nearest_code.cpp"
CUDA_DIR = HERE.parents[2] / "csrc" / "cuda"
KERNELS = {"LGVQ_NEAREST_CODE_CU": CUDA_DIR / "nearest_code.cu"}


def test_nearest_code_kernels_emulated(emulate) -> None:
    emulate(HARNESS, KERNELS)


@pytest.mark.slow
def test_nearest_code_kernels_emulated_with_sanitizers(emulate) -> None:
    emulate(HARNESS, KERNELS, sanitize=True)
