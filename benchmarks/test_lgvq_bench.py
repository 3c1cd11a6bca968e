"""pytest-benchmark view of the LG-VQ families (same registry as the report): the relation op
and the LG-VQ training step.

    python -m pytest benchmarks/test_lgvq_bench.py -q --benchmark-only

Benchmarks, not tests: nothing asserts a speed. Unavailable providers skip with the reason.
"""

import pytest

from benchmarks import harness
from benchmarks.lgvq_step import FAMILY as STEP
from benchmarks.relation import FAMILY as RELATION

CASES = [(family, provider, shape) for family in (RELATION, STEP)
         for provider in family.providers for shape in family.shape_sets["bench"]]


@pytest.mark.parametrize("family, provider, shape", CASES,
                         ids=[f"{f.name}-{p}-{f.shape_label(s)}" for f, p, s in CASES])
def test_lgvq_family(benchmark, bench_device, bench_dtype, family, provider, shape):
    harness.run_pytest_benchmark(benchmark, family, provider, shape, bench_device, bench_dtype)
