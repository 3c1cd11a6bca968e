"""Running benchmark cases into rows: every provider x shape x dtype of an op family is
skipped with its reason, or timed (``benchmarks.harness.timing``) and its peak extra memory
measured (``benchmarks.harness.memory``); and the same case as one pytest-benchmark body."""

from __future__ import annotations

import gc
import json
import warnings
from collections.abc import Callable

import torch

from benchmarks.harness.dtypes import dtype_reason, matmul_precision
from benchmarks.harness.machine import GiB, MiB, default_memory_budget, describe_device, \
    load_average
from benchmarks.harness.memory import MemoryWorker, measure_peak_cuda
from benchmarks.harness.registry import OpFamily
from benchmarks.harness.rows import Row, RunInfo, error_text, format_seconds, new_run_info
from benchmarks.harness.timing import TimingConfig, synchronizer, time_functions


def case_skip_reason(family: OpFamily, provider: str, shape: dict, dtype: str,
                     device: torch.device, budget: int | None = None) -> str:
    """Why this case should not run ("" when it should), the provider being available:
    "not applicable: ..." (dtype or shape) or "needs ~X GiB > memory budget Y GiB"."""
    candidate = family.providers[provider]
    if reason := dtype_reason(dtype, device) or candidate.applies(shape, dtype, device):
        return f"not applicable: {reason}"
    budget = default_memory_budget(device) if budget is None else budget
    need = family.input_bytes(shape, dtype) + candidate.extra_bytes(shape, dtype)
    if need > budget:
        return f"needs ~{need / GiB:.1f} GiB > memory budget {budget / GiB:.1f} GiB"
    return ""


def provider_unavailable_reason(family: OpFamily, provider: str, device: torch.device) -> str:
    """"" when the provider can run on device, else why not."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            usable, reason = family.providers[provider].available(device)
        except Exception as error:  # noqa: BLE001
            return error_text(error)
    return "" if usable else (reason or "unavailable")


def run_cases(family: OpFamily, shapes: list[dict], providers: list[str], dtypes: list[str],
              device: torch.device, *, timing: TimingConfig | None = None, memory: bool = True,
              memory_budget_bytes: int | None = None, run: RunInfo | None = None,
              progress: Callable[[str], None] | None = None) -> list[Row]:
    """Time (and measure the peak extra memory of) every provider x shape x dtype case."""
    timing = timing or TimingConfig()
    run = run or new_run_info(device)
    budget = memory_budget_bytes if memory_budget_bytes is not None \
        else default_memory_budget(device)
    progress = progress or (lambda text: None)
    unknown = [name for name in providers if name not in family.providers]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown} for op {family.name!r}; known: "
                         f"{', '.join(family.providers)}")
    availability = {}
    for name in providers:
        reason = provider_unavailable_reason(family, name, device)
        availability[name] = (not reason, reason)

    rows: list[Row] = []
    total, done = len(shapes) * len(dtypes) * len(providers), 0
    for shape in shapes:
        for dtype in dtypes:
            timed: list[Row] = []  # the providers of this case, timed in turn (interleaved)
            for name in providers:
                provider = family.providers[name]
                row = Row(run_id=run.run_id, date=run.date, op=family.name, provider=name,
                          provider_label=provider.label, shape=family.shape_label(shape),
                          shape_json=json.dumps(shape, sort_keys=True), dtype=dtype,
                          device_type=device.type, status="skipped", device=run.device,
                          threads=torch.get_num_threads(), torch_version=run.versions["torch"],
                          lgvq_version=run.versions["lgvq"],
                          triton_version=run.versions["triton"])
                rows.append(row)
                row.load_avg = load_average()
                usable, reason = availability[name]
                if not usable:
                    row.note, row.unavailable = f"unavailable: {reason}", True
                elif reason := case_skip_reason(family, name, shape, dtype, device, budget):
                    row.note = reason
                else:
                    timed.append(row)
            _time_case(timed, family, shape, dtype, device, timing, memory)
            for row in rows[len(rows) - len(providers):]:
                done += 1
                progress(f"[{done}/{total}] {family.name} {row.shape} {dtype} {row.provider}: "
                         + (format_seconds(row.median_s) if row.status == "ok" else
                            f"{row.status} ({row.note[:90]})"))

    if memory and device.type == "cpu":
        _measure_cpu_rows(family, rows, run, progress)
    return rows


def _time_case(rows: list[Row], family: OpFamily, shape: dict, dtype: str,
               device: torch.device, timing: TimingConfig, memory: bool) -> None:
    """Time the providers of ``rows`` on one shape and dtype, their samples interleaved."""
    fns = {}
    try:
        with warnings.catch_warnings(), matmul_precision(dtype, device):
            warnings.simplefilter("ignore")
            for row in rows:
                try:
                    fns[row.provider] = family.providers[row.provider].factory(shape, device,
                                                                               dtype)
                except Exception as error:  # noqa: BLE001 - one failing case never stops the run
                    row.status, row.note = "error", error_text(error)
            results = time_functions(fns, device, timing)
            for row in rows:
                result = results.get(row.provider)
                if isinstance(result, Exception):
                    row.status, row.note = "error", error_text(result)
                elif result is not None:
                    row.status = "ok"
                    row.median_s, row.p20_s, row.p80_s = (result.median_s, result.p20_s,
                                                          result.p80_s)
                    row.first_call_s, row.repeats, row.number = (result.first_call_s,
                                                                 result.repeats, result.number)
            if memory and device.type == "cuda":
                for row in rows:
                    if row.status == "ok":
                        row.peak_extra_bytes = measure_peak_cuda(fns[row.provider], device)
                        row.memory_method = "cuda max_memory_allocated"
    except Exception as error:  # noqa: BLE001
        for row in rows:
            if row.status != "ok":
                row.status, row.note = "error", error_text(error)
    finally:
        fns.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _measure_cpu_rows(family: OpFamily, rows: list[Row], run: RunInfo,
                      progress: Callable[[str], None]) -> None:
    todo = [row for row in rows if row.status == "ok"]
    if not todo:
        return
    worker = MemoryWorker()
    try:
        for index, row in enumerate(todo, 1):
            try:
                extra, note = worker.measure(family.name, row.provider, row.shape_dict, row.dtype)
            except Exception as error:  # noqa: BLE001
                extra, note = None, error_text(error)
            row.peak_extra_bytes, row.memory_method = extra, worker.method
            if note:
                row.note = (row.note + "; " if row.note else "") + f"memory: {note}"
            progress(f"[memory {index}/{len(todo)}] {row.shape} {row.dtype} {row.provider}: "
                     + (f"{extra / MiB:.1f} MiB" if extra is not None else note[:90]))
    finally:
        worker.close()
    run.memory_method, run.memory_noise_bytes = worker.method, worker.noise_bytes




def run_pytest_benchmark(benchmark, family: OpFamily, provider: str, shape: dict,
                         device: torch.device, dtype: str) -> None:
    """The pytest-benchmark body shared by benchmarks/test_*_bench.py: skip with the reason
    when the case cannot run, else time the provider (one untimed warm-up call first)."""
    import pytest  # the pytest-benchmark view only: the report runs without pytest

    reason = provider_unavailable_reason(family, provider, device) \
        or case_skip_reason(family, provider, shape, dtype, device)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"{family.name} {family.shape_label(shape)} {dtype}"
    benchmark.extra_info.update(op=family.name, provider=provider, shape=shape, dtype=dtype,
                                device=describe_device(device))
    with matmul_precision(dtype, device):
        call = family.providers[provider].factory(shape, device, dtype)
        synchronize = synchronizer(device)

        def fn():
            call()
            synchronize()

        fn()  # warm-up: first-touch page faults, lazy initialisation, compilation
        benchmark(fn)

