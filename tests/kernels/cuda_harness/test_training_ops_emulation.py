"""Runs the CUDA training-op kernels without a GPU: emulate_training_ops.cpp compiles
csrc/cuda/quantize.cu, codebook_ema.cu and relation.cu with the host compiler, runs every CUDA
thread as a fiber (emu_runtime.h) and compares each result bit for bit with an oracle that
repeats the kernels' fp32 arithmetic: the quantizer forward (gather, two-pass squared error), its
backward and codebook_statistics (sort by code, tiled segment sums, hot codes spanning tiles,
out-of-range indices, masks, NaN in masked rows, grid-stride loops), the EMA update (float64
total, dead-code replacement) and the relation loss and its backward (ties, NaN similarities, a
zero code row, mixed dtypes), the last also against a float64 port of lgvq_kernels/reference.py.
fp32, fp16 and bf16.

The plain build is quick; the AddressSanitizer + UBSan build (out-of-bounds global and shared
accesses) is marked slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "emulate_training_ops.cpp"
CUDA_DIR = HERE.parents[2] / "csrc" / "cuda"
KERNELS = {
    "LGVQ_QUANTIZE_CU": CUDA_DIR / "quantize.cu",
    "LGVQ_CODEBOOK_EMA_CU": CUDA_DIR / "codebook_ema.cu",
    "LGVQ_RELATION_CU": CUDA_DIR / "relation.cu",
}


def test_training_op_kernels_emulated(emulate) -> None:
    emulate(HARNESS, KERNELS)


@pytest.mark.slow
def test_training_op_kernels_emulated_with_sanitizers(emulate) -> None:
    emulate(HARNESS, KERNELS, sanitize=True)
