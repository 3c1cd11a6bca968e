"""Build-and-run helpers of the CUDA emulation harnesses (emulate_*.cpp), as fixtures: each
harness compiles csrc/cuda/*.cu with the host compiler, runs every CUDA thread as a fiber
(emu_runtime.h) and compares the results bit for bit with its oracles."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BUILD_TIMEOUT_S = 600
RUN_TIMEOUT_S = 600  # a shuffle or barrier that part of a block misses is reported, never hangs
PLAIN_FLAGS = ["-O2"]
SANITIZER_FLAGS = ["-O0", "-g", "-fsanitize=address,undefined",
                   "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


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


def _build(directory: Path, harness: Path, kernels: dict[str, Path], flags: list[str]) -> Path:
    """Compile ``harness`` with each ``-D<macro>="<kernel .cu path>"``; skip when this machine
    cannot, fail with the compiler's message when the code does not compile."""
    if os.name != "posix":
        pytest.skip("the emulation harness uses POSIX fibers")
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++/c++) to build the CUDA emulation harness")
    include = _cuda_include()
    if include is None:
        pytest.skip("CUDA toolkit headers (cuda_fp16.h) not found: the harness needs the "
                    "toolkit's host-side half/bfloat16 types")
    binary = directory / harness.stem
    # -ffp-contract=off: the kernels and the oracles must round every operation alike.
    command = [compiler, "-std=c++20", "-ffp-contract=off", *flags, f"-I{include}",
               *(f'-D{macro}="{path}"' for macro, path in kernels.items()), str(harness),
               "-o", str(binary)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if result.returncode != 0:
        pytest.fail(f"building the emulation harness failed:\n{' '.join(command)}\n"
                    f"{result.stderr}")
    return binary


def _run(binary: Path, *args: str) -> None:
    """Run a built harness; on a mismatch, fail with its failing lines."""
    result = subprocess.run([str(binary), *args], capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S)
    if result.returncode != 0:
        failing = [line for line in result.stdout.splitlines()
                   if not line.rstrip().endswith("ok") and " ok (" not in line]
        pytest.fail(f"emulated CUDA kernels disagree with the oracle (exit {result.returncode}):\n"
                    + "\n".join(failing[-60:]) + f"\n{result.stderr[-4000:]}")


@pytest.fixture
def emulate(tmp_path_factory: pytest.TempPathFactory):
    """``emulate(harness, kernels, sanitize=False)``: build the harness and run it; with
    ``sanitize`` an AddressSanitizer + UBSan build runs the harness's --quick set."""

    def build_and_run(harness: Path, kernels: dict[str, Path], sanitize: bool = False) -> None:
        flags = SANITIZER_FLAGS if sanitize else PLAIN_FLAGS
        binary = _build(tmp_path_factory.mktemp(harness.stem), harness, kernels, flags)
        _run(binary, *(["--quick"] if sanitize else []))

    return build_and_run
