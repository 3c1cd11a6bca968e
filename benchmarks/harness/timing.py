"""Wall-clock timing of one benchmark case.

``time_function``: wall clock (``time.perf_counter``; CUDA synchronised before and after each
sample). The first call is timed separately ("first_call_s": page faults on fresh outputs, lazy
initialisation, Triton compilation) and never enters the statistics; warm-up continues to
``warmup`` calls and ``warmup_s`` seconds. Calls shorter than ``min_sample_s`` are looped
``number`` times per sample. Reported: median, p20 and p80 of ``repeats`` samples (fewer, at
least 3, when a case would run past ``max_case_s``). ``time_functions`` times several
candidates of one case with their samples interleaved (the report does, provider against
provider). Timing never runs in the memory worker
(its malloc setting would slow it), and never concurrently with it.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass
class TimingConfig:
    repeats: int = 7  # samples for median / p20 / p80 (at least 3 are always taken)
    warmup: int = 1  # warm-up calls after the first call, at least
    warmup_s: float = 0.2  # keep warming up until this much time has passed
    min_sample_s: float = 0.005  # loop fast calls until one sample lasts this long
    max_case_s: float = 20.0  # cut repeats (down to 3) so that a case stays near this


@dataclasses.dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    first_call_s: float
    repeats: int
    number: int


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (nothing to wait for on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]) of an ascending list."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


class _Case:
    """One function being timed: warmed up once, then sampled (alone or in turn with others)."""

    def __init__(self, fn: Callable[[], Any], device: torch.device, config: TimingConfig):
        self.fn, self.sync, self.samples = fn, synchronizer(device), []
        clock = time.perf_counter
        self.sync()
        start = clock()
        fn()
        self.sync()
        self.first = clock() - start  # page faults, lazy initialisation, compilation: apart
        warm_start, calls, last = clock(), 0, self.first
        while calls < max(1, config.warmup) or (clock() - warm_start < config.warmup_s
                                                and calls < 10_000):
            t0 = clock()
            fn()
            self.sync()
            last = clock() - t0
            calls += 1
        self.number = 1 if last >= config.min_sample_s else min(
            10_000, math.ceil(config.min_sample_s / max(last, 1e-7)))
        self.sample_s = last * self.number  # the expected length of one sample

    def sample(self) -> None:
        self.sync()
        t0 = time.perf_counter()
        for _ in range(self.number):
            self.fn()
        self.sync()
        self.samples.append((time.perf_counter() - t0) / self.number)

    def result(self) -> Timing:
        samples = sorted(self.samples)
        return Timing(median_s=percentile(samples, 50), p20_s=percentile(samples, 20),
                      p80_s=percentile(samples, 80), first_call_s=self.first,
                      repeats=len(samples), number=self.number)


def _repeats(config: TimingConfig, sample_s: float) -> int:
    return max(3, min(config.repeats, int(config.max_case_s // max(sample_s, 1e-9))))


def time_function(fn: Callable[[], Any], device: torch.device,
                  config: TimingConfig | None = None) -> Timing:
    """Median / p20 / p80 seconds per call of ``fn`` after warm-up (see the module docstring)."""
    return time_functions({"fn": fn}, device, config)["fn"]


def time_functions(fns: dict[str, Callable[[], Any]], device: torch.device,
                   config: TimingConfig | None = None) -> dict[str, Timing | Exception]:
    """``time_function`` of several functions, their samples interleaved (A B C A B C ...):
    on a shared machine a burst of load then slows every candidate alike, so the ratios of
    their medians stay meaningful even where the absolute times do not. Each function gets
    ``repeats`` samples (at least 3; fewer when its samples would take past ``max_case_s``).
    A function that raises gets its exception in the result and leaves the others running."""
    config = config or TimingConfig()
    cases: dict[str, _Case] = {}
    results: dict[str, Timing | Exception] = {}
    for name, fn in fns.items():
        try:
            cases[name] = _Case(fn, device, config)
        except Exception as error:  # noqa: BLE001 - reported in its row
            results[name] = error
    repeats = {name: _repeats(config, case.sample_s) for name, case in cases.items()}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for turn in range(max(repeats.values(), default=0)):
            for name, case in cases.items():
                if turn < repeats[name] and name not in results:
                    try:
                        case.sample()
                    except Exception as error:  # noqa: BLE001
                        results[name] = error
    finally:
        if gc_was_enabled:
            gc.enable()
    for name, case in cases.items():
        results.setdefault(name, case.result())
    return {name: results[name] for name in fns}
