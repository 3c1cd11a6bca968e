"""pytest configuration of the benchmark suite (not the test suite: that lives in tests/).

Run with ``python -m pytest benchmarks -q --benchmark-only``. Without pytest-benchmark installed
the benchmark files are not collected. ``LGVQ_BENCH_DEVICE`` (default "cpu") picks the device,
``LGVQ_BENCH_DTYPE`` (default "float32") the dtype mode.
"""

import importlib.util
import os

import pytest
import torch

collect_ignore_glob = [] if importlib.util.find_spec("pytest_benchmark") else ["test_*_bench.py"]


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    device = torch.device(os.environ.get("LGVQ_BENCH_DEVICE", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("LGVQ_BENCH_DEVICE asks for CUDA but torch.cuda is not available")
    return device


@pytest.fixture(scope="session")
def bench_dtype() -> str:
    return os.environ.get("LGVQ_BENCH_DTYPE", "float32")
