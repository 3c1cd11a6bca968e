"""Compile checks of the CUDA sources, for machines without a GPU (CI does this on every change).

Every ``csrc/cuda/*.cu`` must compile with ``nvcc -c`` for sm_80 and sm_90 (a pure-CUDA file
takes a few seconds). The torch bindings ``csrc/cuda/*.cpp`` only build inside a CUDA torch, so
here they are syntax-checked with the host compiler against the installed torch headers, where
those headers include the CUDA ones (CPU wheels ship them, less one generated file).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.utils import run_compiler

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
CUDA_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
BINDING_SOURCES = sorted(CUDA_DIR.glob("*.cpp"))
ARCHS = ("sm_80", "sm_90")
# What torch's CUDAExtension passes to nvcc: the kernels must not lean on the implicit
# half/bfloat16 conversions and operators these remove.
TORCH_NVCC_DEFINES = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)


def find_nvcc() -> str | None:
    """nvcc on PATH, else under CUDA_HOME / CUDA_PATH, else /usr/local/cuda/bin/nvcc."""
    candidates = [shutil.which("nvcc")]
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            candidates.append(os.path.join(os.environ[variable], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def cuda_include_dir(nvcc: str | None) -> Path | None:
    """The toolkit's include folder (the one holding cuda_runtime.h), if any."""
    roots = [Path(nvcc).resolve().parent.parent] if nvcc else []
    roots += [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    roots.append(Path("/usr/local/cuda"))
    for root in roots:
        include = root / "include"
        if (include / "cuda_runtime.h").is_file():
            return include
    return None




@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_cuda_source_compiles(source: Path, tmp_path: Path) -> None:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (not on PATH, CUDA_HOME, CUDA_PATH or /usr/local/cuda/bin): "
                    "the CUDA compile check needs a CUDA toolkit")
    # One call for every architecture (what -arch=sm_XX gives each: its SASS and its PTX), the
    # device passes two at a time: the host side is compiled once (quantize.cu: 8.9 s, against
    # 17.6 s for one call per architecture on the 2-core EPYC). nvcc's errors name the arch.
    targets = [f"-gencode=arch=compute_{arch[3:]},code=[{arch},compute_{arch[3:]}]"
               for arch in ARCHS]
    command = [nvcc, "-c", "-std=c++17", "-O3", "--threads=2", *targets, *TORCH_NVCC_DEFINES,
               str(source), "-o", str(tmp_path / f"{source.stem}.o")]
    run_compiler(command, f"nvcc {source.name} for {', '.join(ARCHS)}")


@pytest.mark.parametrize("source", BINDING_SOURCES, ids=lambda path: path.name)
def test_cuda_binding_syntax(source: Path) -> None:
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++/c++) to syntax-check the CUDA bindings")
    include = cuda_include_dir(find_nvcc())
    if include is None:
        pytest.skip("CUDA toolkit headers (cuda_runtime.h) not found")
    torch_extension = pytest.importorskip("torch.utils.cpp_extension")
    torch_includes = torch_extension.include_paths()
    if not any((Path(p) / "c10" / "cuda" / "CUDAGuard.h").is_file() for p in torch_includes):
        pytest.skip("this torch install ships no c10/cuda headers")
    # C10_CUDA_NO_CMAKE_CONFIGURE_FILE: CPU wheels lack the generated cuda_cmake_macros.h (it
    # only sets C10_CUDA_BUILD_SHARED_LIBS, which nothing checked here depends on).
    command = [compiler, "-fsyntax-only", "-std=c++17", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
               *(f"-I{p}" for p in torch_includes), f"-I{include}", f"-I{CUDA_DIR}",
               str(source)]
    run_compiler(command, f"syntax check of {source.name}")
