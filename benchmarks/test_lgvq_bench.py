"""pytest-benchmark view of the LG-VQ families (same registry as the report): the relation op
and the LG-VQ training step.

    python -m pytest benchmarks/test_lgvq_bench.py -q --benchmark-only

Benchmarks, not tests: nothing asserts a speed. Unavailable providers skip with the reason.
"""

import pytest
import torch

from benchmarks import harness
from benchmarks.lgvq_step import FAMILY as STEP
from benchmarks.relation import FAMILY as RELATION

CASES = [(family, provider, shape) for family in (RELATION, STEP)
         for provider in family.providers for shape in family.shape_sets["bench"]]


@pytest.mark.parametrize("family, provider, shape", CASES,
                         ids=[f"{f.name}-{p}-{f.shape_label(s)}" for f, p, s in CASES])
def test_lgvq_family(benchmark, bench_device, bench_dtype, family, provider, shape):
    reason = harness.provider_unavailable_reason(family, provider, bench_device) \
        or harness.case_skip_reason(family, provider, shape, bench_dtype, bench_device)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"{family.name} {family.shape_label(shape)} {bench_dtype}"
    benchmark.extra_info.update(op=family.name, provider=provider, shape=shape,
                                dtype=bench_dtype, device=harness.describe_device(bench_device))
    fn = family.providers[provider].factory(shape, bench_device, bench_dtype)
    if bench_device.type == "cuda":
        call = fn

        def fn():
            call()
            torch.cuda.synchronize(bench_device)

    fn()  # warm-up
    benchmark(fn)
