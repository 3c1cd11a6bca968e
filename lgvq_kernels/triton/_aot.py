"""Ahead-of-time compile of the Triton kernels for a GPU this machine need not have: every config
the launchers can pick, compiled with Triton's ``GPUTarget`` for sm_80 (A100) and sm_90
(H100/H200), with the shared memory each needs (Triton's metadata) and the registers and local
(spill) bytes of the cubin Triton built (``cuobjdump --dump-resource-usage``). Runs on a CPU; needs TRITON_INTERPRET unset (the
interpreter replaces the compiler).

    TRITON_INTERPRET=0 python -m lgvq_kernels.triton._aot [--arch 80 90] [--json]

The table it prints is the source of the numbers in the launchers' comments. Exit status 1 when
a config needs more shared memory than the architecture has (spills are reported, not failed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

# Shared memory per block a kernel may use (opt-in maximum), bytes: what Triton's launcher
# checks before it raises OutOfResources.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


class Spec(NamedTuple):
    """One kernel specialisation: ``args`` maps every argument name to a pointer type
    ("*fp32"), "i32", or the value of a constexpr (an int equal to 1 is a constexpr too, as the
    launcher specialises it)."""
    label: str
    kernel: object
    args: dict
    num_warps: int
    num_stages: int = 3


class Result(NamedTuple):
    label: str
    arch: int
    shared: int
    registers: int
    spill_bytes: int  # stack frame + local memory bytes (cuobjdump): spilled registers
    seconds: float

    @property
    def fits(self) -> bool:
        return self.shared <= SHARED_MEMORY_LIMIT[self.arch]


def _nvidia_tool(name: str) -> str:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    found = bundled if os.path.exists(bundled) else shutil.which(name)
    if found is None:
        raise RuntimeError(f"no {name}: neither Triton's bundled one nor one on PATH")
    return found


def compile_spec(spec: Spec, arch: int) -> Result:
    """Compile ``spec`` for sm_<arch>: shared bytes from Triton, registers/spills from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.kernel
    while not hasattr(fn, "arg_names"):  # an autotuner wraps the jit function
        fn = fn.fn
    missing = set(fn.arg_names) - set(spec.args)
    if missing:
        raise ValueError(f"{spec.label}: no value for {sorted(missing)}")
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        value = spec.args[name]
        if isinstance(value, str) and (value.startswith("*") or value in ("i32", "i64", "fp32")):
            signature[name] = value
            if value.startswith("*"):
                attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are aligned
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps,
                                       "num_stages": spec.num_stages})
    with tempfile.TemporaryDirectory() as tmp:  # the cubin Triton's own ptxas call made
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
    seconds = time.perf_counter() - start
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    # local memory (stack frame) is where ptxas spills: Triton kernels have no local arrays
    spills = int(re.search(r"STACK:(\d+)", usage).group(1)) + int(
        re.search(r"LOCAL:(\d+)", usage).group(1))
    return Result(spec.label, arch, int(compiled.metadata.shared), registers, spills, seconds)


# --------------------------------------------------------------------------------------------
# what the launchers ship
# --------------------------------------------------------------------------------------------

_DTYPE = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}


def nearest_code_specs() -> list[Spec]:
    """Every GPU config of the nearest-code kernel (the autotuned list, which holds the
    heuristic ones) for the headline dtypes at D = 64 / 100 / 256 (the x tile kept in registers
    or chunked) and fp32 ieee at a small D; the split-codebook variant (partial outputs) of the
    largest config; the merge kernel."""
    from lgvq_kernels.triton import nearest_code as nc

    specs = []
    cases = [("bfloat16", "ieee", 256), ("bfloat16", "ieee", 64), ("float32", "tf32", 100),
             ("float32", "tf32", 256), ("float32", "ieee", 64)]
    largest = max(nc.GPU_CONFIGS, key=lambda c: (c["BLOCK_N"] * c["BLOCK_K"], c["num_warps"]))
    for dtype, precision, dim in cases:
        block_d = nc._block_d(dim, fma_dot=dtype == "float32" and precision == "ieee")
        variants = [(config, False) for config in nc.GPU_CONFIGS] + [(largest, True)]
        for config, split in variants:
            block_n, block_k = config["BLOCK_N"], config["BLOCK_K"]
            pointer = _DTYPE[dtype]
            args = dict(x_ptr=pointer, codebook_ptr=pointer, sqnorm_ptr="*fp32",
                        indices_ptr="*i64", distances_ptr="*fp32", part_score_ptr="*fp32",
                        part_index_ptr="*i32", row_stats_ptr="*fp32", N="i32", K="i32",
                        stride_xn="i32", stride_xd=1, stride_ck="i32", stride_cd=1,
                        N_BUCKET="i32", SPLITS="i32", D=dim, BLOCK_N=block_n,
                        BLOCK_K=block_k, BLOCK_D=block_d, IS_COSINE=False,
                        INPUT_PRECISION=precision, SPLIT=split, INTERPRETING=False)
            specs.append(Spec(f"nearest_code {dtype}/{precision} D={dim} "
                              f"{block_n}x{block_k} w{config['num_warps']} "
                              f"s{config['num_stages']}{' split' if split else ''}",
                              nc._nearest_code_kernel, args, config["num_warps"],
                              config["num_stages"]))
    merge = dict(part_score_ptr="*fp32", part_index_ptr="*i32", row_stats_ptr="*fp32",
                 indices_ptr="*i64", distances_ptr="*fp32", N="i32", SPLITS="i32",
                 BLOCK_N=256, IS_COSINE=False)
    specs.append(Spec("nearest_code merge 256 rows", nc._merge_splits_kernel, merge, 4))
    return specs


def relation_specs() -> list[Spec]:
    """Forward and backward at every BLOCK_L the launcher takes (C = 256, float32)."""
    from lgvq_kernels.triton import relation as rel

    specs = []
    for block_l in rel.GPU_BLOCK_LS:
        meta = rel._gpu_meta(block_l)
        common = dict(words_ptr="*fp32", visual_ptr="*fp32", codes_ptr="*fp32",
                      mask_ptr="*i1", L="i32", M="i32", stride_wb="i32", stride_wl="i32",
                      stride_wc=1, stride_vb="i32", stride_vm="i32", stride_vc=1,
                      stride_cb="i32", stride_cm="i32", stride_cc=1, stride_mb="i32",
                      stride_ml=1, C=256, BLOCK_L=block_l, BLOCK_M=meta["BLOCK_M"],
                      BLOCK_C=meta["BLOCK_C"], INTERPRETING=False)
        tiles = f"L{block_l} M{meta['BLOCK_M']} C{meta['BLOCK_C']} w{meta['num_warps']}"
        specs.append(Spec(f"relation forward {tiles}", rel._relation_forward_kernel,
                          dict(common, chosen_ptr="*i64", partials_ptr="*fp32"),
                          meta["num_warps"]))
        specs.append(Spec(f"relation backward {tiles}", rel._relation_backward_kernel,
                          dict(common, coef_ptr="*fp32", grad_codes_ptr="*fp32",
                               ROUND_TO_BF16=False), meta["num_warps"]))
    return specs


def segment_specs() -> list[Spec]:
    """The row-tile kernels at their widest tiles (D = 256 → BLOCK_D 128), float32."""
    from lgvq_kernels.triton import codebook_ema as ema
    from lgvq_kernels.triton import quantize as qz

    block_d = qz._block_d(256)
    forward = dict(x_ptr="*fp32", codebook_ptr="*fp32", indices_ptr="*i64", mask_ptr="*i64",
                   quantized_ptr="*fp32", partials_ptr="*fp32", N="i32", K="i32",
                   stride_xn="i32", stride_xd=1, stride_ck="i32", stride_cd=1, D=256,
                   BLOCK_N=qz._forward_block_n(1 << 16), BLOCK_D=block_d, HAS_MASK=False)
    specs = [Spec("quantize forward D=256", qz._quantize_forward_kernel, forward, 4)]
    backward = dict(grad_quantized_ptr="*fp32", x_ptr="*fp32", codebook_ptr="*fp32",
                    mask_ptr="*i64", order_ptr="*i64", offsets_ptr="*i64",
                    coef_x_ptr="*fp32", coef_codebook_ptr="*fp32", grad_x_ptr="*fp32",
                    grad_codebook_ptr="*fp32", stride_gn="i32", stride_gd=1,
                    stride_xn="i32", stride_xd=1, stride_ck="i32", stride_cd=1, D=256,
                    BLOCK_R=64, BLOCK_D=block_d, HAS_MASK=True, HAS_GRAD_QUANTIZED=True,
                    ROUND_TO_BF16=False)
    specs.append(Spec("quantize backward D=256 R64", qz._quantize_backward_kernel, backward, 4))
    statistics = dict(x_ptr="*fp32", mask_ptr="*i1", order_ptr="*i64", offsets_ptr="*i64",
                      stats_ptr="*fp32", stride_xn="i32", stride_xd=1, D=256, BLOCK_R=64,
                      BLOCK_D=ema._block_d(256), HAS_MASK=True)
    specs.append(Spec("codebook statistics D=256 R64", ema._codebook_statistics_kernel,
                      statistics, 4))
    return specs


def shipped_specs() -> list[Spec]:
    return nearest_code_specs() + relation_specs() + segment_specs()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--only", default="", help="compile only labels containing this")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiles in parallel processes (default: CPU count)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile", file=sys.stderr)
        return 2
    work = [(index, arch) for index, spec in enumerate(shipped_specs())
            if args.only in spec.label for arch in args.arch]
    if not args.json:
        print(f"{'kernel config':58} {'sm':>3} {'shared KiB':>10} {'regs':>4} {'spill B':>7}")
    over = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for result in pool.map(_compile_indexed, work):  # in order, as each one finishes
            over += not result.fits
            if args.json:
                print(json.dumps(dict(result._asdict(), fits=result.fits)), flush=True)
            else:
                flag = "" if result.fits else "  OVER THE SHARED MEMORY LIMIT"
                print(f"{result.label:58} {result.arch:>3} {result.shared / 1024:10.1f} "
                      f"{result.registers:>4} {result.spill_bytes:>7}{flag}", flush=True)
    return 1 if over else 0


def _compile_indexed(item: tuple[int, int]) -> Result:
    index, arch = item
    return compile_spec(shipped_specs()[index], arch)


if __name__ == "__main__":
    raise SystemExit(main())
