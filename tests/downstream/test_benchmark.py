"""The downstream benchmark families run end to end (quick sets, one repeat)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_downstream_families_run():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--quick", "--ops", "downstream_sampling",
         "downstream_step", "--repeats", "1", "--no-save", "--no-memory", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "KV-cache sampling faster than uncached sampling" in result.stdout
    assert "codes/s" in result.stdout and "codebook -> Linear" in result.stdout
