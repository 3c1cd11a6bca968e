"""The benchmark families for LG-VQ run end to end (their quick sets, one repeat): a benchmark
that cannot run is a bug found here, not on the GPU machine."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_relation_and_lgvq_step_families_run(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--quick", "--ops", "relation", "lgvq_step",
         "--repeats", "1", "--no-save", "--no-memory", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "paper's per-word loop" in out and "lgvq native" in out
    assert "LG-VQ step <= 1.25x the step without language losses" in out
    assert "fused op faster than the paper's per-word loop" in out
