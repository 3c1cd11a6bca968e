"""Builds lgvq_kernels._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA
and nvcc is found. A failed or skipped build only warns: the package then runs on the reference
(and Triton) backends. Environment switches:

  LGVQ_BUILD_EXT=0     skip the native extension entirely
  LGVQ_BUILD_CUDA=0    build the CPU kernels only, even with a CUDA torch
  LGVQ_CUDA_ARCHS      e.g. "8.0;9.0" (default: TORCH_CUDA_ARCH_LIST or 8.0;9.0)
  LGVQ_NO_AVX2=1       compile the CPU kernels without their AVX2 versions, as on non-x86 hosts
                       (at run time the same variable only stops the AVX2 kernels being picked;
                       csrc/cpu/simd.h; LGVQ_NO_AVX512=1 at run time keeps the nearest-code
                       search on its AVX2 kernels on an AVX-512 CPU)
  MAX_JOBS             parallel compile jobs (ninja)

The AVX2 kernels are compiled only for x86-64 with GCC; elsewhere (aarch64 such as GH200, clang)
the portable kernels build alone, and the CUDA kernels still build beside them.

Install with ``pip install --no-build-isolation -e .`` so that the build uses the torch that is
already installed (an isolated build would fetch another one).
"""

import glob
import os
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("LGVQ_BUILD_EXT", "1") == "0":
        warnings.warn("lgvq: LGVQ_BUILD_EXT=0, skipping the native extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as error:  # torch missing at build time: pure-Python install
        warnings.warn(f"lgvq: torch is not importable at build time ({error}); "
                      "skipping the native extension")
        return [], {}

    class SafeBuildExtension(BuildExtension):
        """A compile failure warns and leaves the pure-Python package installable."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 - any compiler failure
                warnings.warn(f"lgvq: building {ext.name} failed ({error}); the native backend "
                              "will be unavailable")
                print(f"lgvq: WARNING: native extension build failed: {error}", file=sys.stderr)

    sources = _sources("csrc/registration.cpp") + _sources("csrc/module.cpp") \
        + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-DNDEBUG"]  # the C++ standard is torch's own (C++20 for 2.13)
    if os.environ.get("LGVQ_NO_AVX2", "0") not in ("", "0"):
        cxx.append("-DLGVQ_NO_AVX2")
    ldflags = ["-fopenmp"]
    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                and os.environ.get("LGVQ_BUILD_CUDA", "1") != "0")
    if use_cuda:
        archs = os.environ.get("LGVQ_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") \
            or "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        ext = CUDAExtension(
            "lgvq_kernels._C",
            sources + _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
            extra_compile_args={"cxx": cxx + ["-DLGVQ_WITH_CUDA"],
                                "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=ldflags,
        )
    else:
        if torch.version.cuda is not None:
            warnings.warn("lgvq: CUDA torch but no CUDA toolkit (or LGVQ_BUILD_CUDA=0): "
                          "building CPU kernels only")
        ext = CppExtension("lgvq_kernels._C", sources, extra_compile_args={"cxx": cxx},
                           extra_link_args=ldflags)
    return [ext], {"build_ext": SafeBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
