"""benchmarks/gpu_check.sh --dry-run: the step plan of the GPU machine script fits its 8 minutes,
and the script parses, on any machine (it runs nothing)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_dry_run_prints_a_plan_within_eight_minutes():
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = re.findall(r"^  (\S+)\s+(\d+)\s+(\d+)$", done.stdout, flags=re.MULTILINE)
    names = [name for name, _, _ in steps]
    assert names[:3] == ["environment", "wheels", "build"]
    assert {"tests-cuda", "tests-triton", "bench-nearest"} <= set(names)
    total = sum(int(limit) for _, limit, _ in steps)
    deadline = int(re.search(r"deadline (\d+)s", done.stdout).group(1))
    assert total <= deadline <= 480
    assert "gpu_check_summary.md" in done.stdout and "gpu_check.tar.gz" in done.stdout


def test_unknown_argument_is_one_line_and_exit_2():
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [
        "gpu_check.sh: unknown argument --fast (expected --dry-run)"]
