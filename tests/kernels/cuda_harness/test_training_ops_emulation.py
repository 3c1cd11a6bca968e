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

import os
import shutil
import subprocess
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
BUILD_TIMEOUT_S = 600
RUN_TIMEOUT_S = 600  # a shuffle or barrier that part of a block misses is reported, never hangs


def _cuda_include() -> Path | None:
    roots = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(Path(nvcc).resolve().parent.parent)
    roots += [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    roots.append(Path("/usr/local/cuda"))
    for root in roots:
        if (root / "include" / "cuda_fp16.h").is_file():
            return root / "include"
    return None


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, flags: list[str]) -> Path:
    if os.name != "posix":
        pytest.skip("the emulation harness uses POSIX fibers")
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++/c++) to build the CUDA emulation harness")
    include = _cuda_include()
    if include is None:
        pytest.skip("CUDA toolkit headers (cuda_fp16.h) not found: the harness needs the "
                    "toolkit's host-side half/bfloat16 types")
    binary = tmp_path_factory.mktemp(name) / "emulate_training_ops"
    # -ffp-contract=off: the kernels and the oracles must round every operation alike.
    command = [compiler, "-std=c++20", "-ffp-contract=off", *flags, f"-I{include}",
               *(f'-D{macro}="{path}"' for macro, path in KERNELS.items()), str(HARNESS),
               "-o", str(binary)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if result.returncode != 0:
        pytest.fail(f"building the emulation harness failed:\n{' '.join(command)}\n"
                    f"{result.stderr}")
    return binary


def _run(binary: Path, *args: str) -> None:
    result = subprocess.run([str(binary), *args], capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S)
    if result.returncode != 0:
        failing = [line for line in result.stdout.splitlines()
                   if not line.rstrip().endswith("ok") and " ok (" not in line]
        pytest.fail(f"emulated CUDA kernels disagree with the oracle (exit {result.returncode}):\n"
                    + "\n".join(failing[-60:]) + f"\n{result.stderr[-4000:]}")


def test_training_op_kernels_emulated(tmp_path_factory: pytest.TempPathFactory) -> None:
    _run(_build(tmp_path_factory, "plain", ["-O2"]))


@pytest.mark.slow
def test_training_op_kernels_emulated_with_sanitizers(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    flags = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
             "-fno-omit-frame-pointer"]
    _run(_build(tmp_path_factory, "asan", flags), "--quick")
