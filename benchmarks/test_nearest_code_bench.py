"""pytest-benchmark view of the nearest-code providers (same registry as the report).

    python -m pytest benchmarks -q --benchmark-only [--benchmark-group-by=group]

Benchmarks, not tests: nothing asserts a speed. Unavailable or inapplicable providers skip with
the reason. One untimed call first pays page faults and lazy initialisation.
"""

import pytest

from benchmarks import harness
from benchmarks.nearest_code import FAMILY

SHAPES = FAMILY.shape_sets["bench"]


@pytest.mark.parametrize("provider", list(FAMILY.providers))
@pytest.mark.parametrize("shape", SHAPES, ids=FAMILY.shape_label)
def test_nearest_code(benchmark, bench_device, bench_dtype, shape, provider):
    harness.run_pytest_benchmark(benchmark, FAMILY, provider, shape, bench_device, bench_dtype)
