"""pytest-benchmark view of the nearest-code providers (same registry as the report).

    python -m pytest benchmarks -q --benchmark-only [--benchmark-group-by=group]

Benchmarks, not tests: nothing asserts a speed. Unavailable or inapplicable providers skip with
the reason. One untimed call first pays page faults and lazy initialisation.
"""

import pytest
import torch

from benchmarks import harness
from benchmarks.nearest_code import FAMILY

SHAPES = FAMILY.shape_sets["bench"]


@pytest.mark.parametrize("provider", list(FAMILY.providers))
@pytest.mark.parametrize("shape", SHAPES, ids=FAMILY.shape_label)
def test_nearest_code(benchmark, bench_device, bench_dtype, shape, provider):
    reason = harness.provider_unavailable_reason(FAMILY, provider, bench_device) \
        or harness.case_skip_reason(FAMILY, provider, shape, bench_dtype, bench_device)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"nearest_code {FAMILY.shape_label(shape)} {bench_dtype}"
    benchmark.extra_info.update(op=FAMILY.name, provider=provider, shape=shape,
                                dtype=bench_dtype, device=harness.describe_device(bench_device))
    with harness.matmul_precision(bench_dtype, bench_device):
        fn = FAMILY.providers[provider].factory(shape, bench_device, bench_dtype)
        if bench_device.type == "cuda":
            call = fn

            def fn():
                call()
                torch.cuda.synchronize(bench_device)

        fn()  # warm-up: first-touch page faults, lazy initialisation, compilation
        benchmark(fn)
