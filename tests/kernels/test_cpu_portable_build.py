"""The CPU kernels without AVX2: the path that aarch64 hosts (Grace, GH200) build and run.

CI runs on x86-64, where the AVX2 kernels are compiled and picked, so the portable path would go
unchecked. Two checks keep it honest (csrc/cpu/simd.h explains the switches):

* every CPU source compiles with ``-DLGVQ_NO_AVX2`` (what a non-x86 build sees), and after
  preprocessing none of our own lines keeps anything x86-only: intrinsics, ``__m256`` types,
  ``__builtin_cpu_supports``, ``#pragma GCC target``. Torch's headers include <immintrin.h> on
  x86 whatever we do, so a plain compile would not notice a stray intrinsic; the scan does;
* the built extension, run with ``LGVQ_NO_AVX2=1`` (the AVX2 kernels compiled but not picked),
  gives the results of the default path, within the rounding the two orders of summation allow.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.utils import run_compiler
import torch

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CPU_SOURCES = sorted((CSRC / "cpu").glob("*.cpp")) + [CSRC / "module.cpp"]
RUN_TIMEOUT_S = 300
# The oldest standard the extension builds with (torch 2.11 builds extensions as C++17).
STANDARD = "-std=c++17"
X86_ONLY = re.compile(r"\b(_mm\d*_\w+|__m(64|128|256|512)\w*|__builtin_cpu_\w+|__builtin_ia32_\w+)"
                      r"|#\s*pragma\s+GCC\s+target")
LINE_MARKER = re.compile(r'^# (\d+) "([^"]*)"')


def _compiler() -> str:
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++/c++) to compile the CPU sources")
    return compiler


def _include_flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]




def x86_only_lines(preprocessed: Path) -> list[str]:
    """``file:line: text`` of every line of a preprocessed file that comes from csrc/ and uses
    something only x86 has (the line markers say where each line comes from)."""
    found, current, ours, line_number = [], None, False, 0
    resolved: dict[str, tuple[Path, bool]] = {}  # per file named by a marker: (path, ours)
    with preprocessed.open(errors="replace") as lines:
        for line in lines:
            marker = LINE_MARKER.match(line)
            if marker:
                line_number = int(marker.group(1))
                name = marker.group(2)
                if name not in resolved:  # resolve() per line cost ~12 s per source
                    path = Path(name)
                    path = (path if path.is_absolute() else ROOT / path).resolve()
                    resolved[name] = (path, path.is_relative_to(CSRC))
                current, ours = resolved[name]
                continue
            if ours and X86_ONLY.search(line):
                found.append(f"{current.relative_to(ROOT)}:{line_number}: {line.strip()}")
            line_number += 1
    return found


def preprocess(source: Path, directory: Path, *defines: str) -> Path:
    out = directory / f"{source.stem}.ii"
    run_compiler([_compiler(), "-E", STANDARD, *defines, *_include_flags(), str(source),
                  "-o", str(out)], f"preprocessing {source.name}")
    return out


@pytest.mark.parametrize("source", CPU_SOURCES, ids=lambda path: path.name)
def test_cpu_source_builds_without_avx2(source: Path, tmp_path: Path) -> None:
    preprocessed = preprocess(source, tmp_path, "-DLGVQ_NO_AVX2")
    offenders = x86_only_lines(preprocessed)
    assert not offenders, ("x86-only code outside the LGVQ_HAVE_AVX2 guard (it would not build on "
                           "aarch64):\n" + "\n".join(offenders[:40]))
    run_compiler([_compiler(), "-fsyntax-only", STANDARD, str(preprocessed)],
                 f"compiling {source.name} with -DLGVQ_NO_AVX2")


@pytest.mark.skipif(not sysconfig.get_platform().endswith("x86_64"),
                    reason="the AVX2 kernels are compiled on x86-64 only")
def test_scan_sees_the_avx2_code_of_an_x86_build(tmp_path: Path) -> None:
    # The check above passes vacuously if the scan cannot see AVX2 code: on x86-64 without the
    # switch, the same scan must find the guarded kernels.
    preprocessed = preprocess(CSRC / "cpu" / "quantize.cpp", tmp_path)
    assert any("_mm256_" in line for line in x86_only_lines(preprocessed))


# ----------------------------------------------------------------------------------------------
# the portable kernels at run time
# ----------------------------------------------------------------------------------------------

# Runs every CPU op on fixed inputs (D tails of 8 lanes, the nearest-code paths: D <= 32 direct,
# larger through GEMM tiles, three rows at D = 100 through the few-rows tiles without BLAS;
# float32/float16/bfloat16, whose kernels have AVX2 versions) and
# saves the outputs. The parent runs it once with LGVQ_NO_AVX2=1 and once without.
RUN_OPS = r"""
import sys
import torch
import lgvq_kernels._C as native

ops = torch.ops.lgvq_C
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
out = {"isa": native.cpu_isa()}
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for n, k, d in ((37, 19, 3), (200, 300, 17), (64, 130, 40), (50, 7, 256), (3, 300, 100)):
        x = torch.randn(n, d, generator=g).to(dtype)
        codebook = torch.randn(k, d, generator=g).to(dtype)
        mask = torch.rand(n, generator=g) < 0.7
        key = f"{dtype}-{n}-{k}-{d}"
        indices, distances = ops.nearest_code(x, codebook, None, False)
        out[key + "-nearest"] = (indices, distances)
        unit = torch.nn.functional.normalize(x.float(), dim=1).to(dtype)
        unit_codes = torch.nn.functional.normalize(codebook.float(), dim=1).to(dtype)
        out[key + "-nearest-cosine"] = ops.nearest_code(unit, unit_codes, None, True)
        out[key + "-quantize"] = ops.quantize_straight_through(x, codebook, indices, mask)
        grad = torch.randn(n, d, generator=g).to(dtype)
        out[key + "-backward"] = ops.quantize_straight_through_backward(
            grad, torch.tensor(0.25), torch.tensor(1.0), x, codebook, indices, mask)
        stats = ops.codebook_statistics(x, indices, k, mask)
        out[key + "-stats"] = stats
        state = (torch.rand(k, generator=g), torch.randn(k, d, generator=g), codebook.clone())
        dead = ops.codebook_ema_update_(stats.float(), *state, 0.9, 1e-5, 0.5,
                                        torch.randn(k, d, generator=g))
        out[key + "-ema"] = (dead, *state)
    for b, length, m, c in ((3, 5, 9, 20), (2, 30, 64, 384)):
        words = torch.randn(b, length, c, generator=g).to(dtype)
        visual = torch.randn(b, m, c, generator=g).to(dtype)
        codes = torch.randn(b, m, c, generator=g).to(dtype)
        word_mask = torch.rand(b, length, generator=g) < 0.8
        key = f"{dtype}-{b}-{length}-{m}-{c}"
        out[key + "-relation"] = ops.relation_alignment_loss(words, visual, codes, word_mask)
        out[key + "-relation-backward"] = ops.relation_alignment_loss_backward(
            torch.tensor(1.5), words, visual, codes, word_mask)
torch.save(out, sys.argv[1])
"""
# Error bound relative to the largest magnitude of a result, by dtype: the two paths sum in
# different orders (and the AVX2 ones fuse multiply-adds), which moves float32 results by a few
# ulps of the accumulation and 16-bit results by at most one final rounding.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _native_cpu_built() -> bool:
    try:
        import lgvq_kernels._C as native
    except ImportError:
        return False
    return hasattr(native, "cpu_isa")


def _run_ops(path: Path, no_avx2: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("LGVQ_NO_AVX2", None)
    if no_avx2:
        env["LGVQ_NO_AVX2"] = "1"
    result = subprocess.run([sys.executable, "-c", RUN_OPS, str(path)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(path)


def _flatten(value):
    return list(value) if isinstance(value, (tuple, list)) else [value]


@pytest.mark.skipif(not _native_cpu_built(), reason="native extension lgvq_kernels._C not built "
                    "(or built from sources without cpu_isa)")
def test_portable_kernels_match_the_default_path(tmp_path: Path) -> None:
    portable = _run_ops(tmp_path / "portable.pt", no_avx2=True)
    default = _run_ops(tmp_path / "default.pt", no_avx2=False)
    assert portable.pop("isa") == "baseline"
    default_isa = default.pop("isa")
    assert portable.keys() == default.keys()
    for key, expected in default.items():
        for i, (a, b) in enumerate(zip(_flatten(portable[key]), _flatten(expected))):
            what = f"{key}[{i}] (portable vs {default_isa})"
            assert a.dtype == b.dtype and a.shape == b.shape, what
            if not b.is_floating_point():  # indices, chosen positions, dead masks: exact
                assert torch.equal(a, b), what
                continue
            a64, b64 = a.double(), b.double()
            scale = max(b64.abs().max().item(), 1e-30) if b.numel() else 1.0
            err = (a64 - b64).abs().max().item() if b.numel() else 0.0
            bound = RTOL.get(b.dtype, RTOL[torch.float32]) * scale
            assert err <= bound, f"{what}: max difference {err:.3g} > {bound:.3g}"
