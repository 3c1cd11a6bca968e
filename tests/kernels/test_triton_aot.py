"""Ahead-of-time compile of the shipped Triton configs for sm_80 (A100) and sm_90 (H100/H200), on
the CPU (lgvq_kernels.triton._aot): every config fits the architecture's shared memory, and the
configs the code comments call spill-free are. Runs in a subprocess: the test session runs
Triton under its interpreter, which cannot compile."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
LIMIT_KIB = {80: 163, 90: 227}


def aot(*args: str, timeout: float) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "lgvq_kernels.triton._aot", "--json", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not rows:
        pytest.fail(f"no compile results (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return rows


def check_shared_memory(rows: list[dict]) -> None:
    over = [f"{r['label']} sm_{r['arch']}: {r['shared'] / 1024:.1f} KiB" for r in rows
            if r["shared"] > LIMIT_KIB[r["arch"]] * 1024]
    assert not over, "over the shared memory limit: " + "; ".join(over)


def test_largest_relation_tiles_fit_both_architectures():
    # The L = 256 backward needed 288 KiB (OutOfResources for 129 <= L <= 256); the largest
    # shipped BLOCK_L must fit an A100's 163 KiB. Two kernels x two architectures, ~20 s.
    from lgvq_kernels._backends import TRITON_RELATION_MAX_WORDS

    rows = aot("--only", f"relation backward L{TRITON_RELATION_MAX_WORDS} ", "--arch", "80",
               "90", timeout=600)
    assert len(rows) == 2
    check_shared_memory(rows)


@pytest.mark.slow  # ~120 compiles: about 4 minutes on 2 cores (cold Triton cache)
def test_every_shipped_config_fits_and_the_spill_free_ones_do_not_spill():
    rows = aot("--arch", "80", "90", timeout=1500)
    check_shared_memory(rows)
    # What the comments in relation.py and the segment kernels call spill-free.
    spill_free = ("relation forward L16 ", "relation backward L16 ", "relation forward L32 ",
                  "relation backward L32 ", "quantize backward ", "codebook statistics ",
                  "nearest_code merge ", "nearest_code bfloat16/ieee D=64 32x64 w4 ",
                  "nearest_code bfloat16/ieee D=64 128x64 w8 ")
    spilled = [f"{r['label']} sm_{r['arch']}: {r['spill_bytes']} B" for r in rows
               if r["label"].startswith(spill_free) and r["spill_bytes"] > 0]
    assert not spilled, "spills where the comments say none: " + "; ".join(spilled)
