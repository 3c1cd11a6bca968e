"""Wall-clock timing of one benchmark case.

``time_function``: wall clock (``time.perf_counter``; CUDA synchronised before and after each
sample). The first call is timed separately ("first_call_s": page faults on fresh outputs, lazy
initialisation, Triton compilation) and never enters the statistics; warm-up continues to
``warmup`` calls and ``warmup_s`` seconds. Calls shorter than ``min_sample_s`` are looped
``number`` times per sample. Reported: median, p20 and p80 of ``repeats`` samples (fewer, at
least 3, when a case would run past ``max_case_s``). Timing never runs in the memory worker
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


def time_function(fn: Callable[[], Any], device: torch.device,
                  config: TimingConfig | None = None) -> Timing:
    """Median / p20 / p80 seconds per call of ``fn`` after warm-up (see the module docstring)."""
    config = config or TimingConfig()
    sync = synchronizer(device)
    clock = time.perf_counter

    sync()
    start = clock()
    fn()
    sync()
    first = clock() - start  # page faults, lazy initialisation, compilation: reported apart
    warm_start, calls, last = clock(), 0, first
    while calls < max(1, config.warmup) or (clock() - warm_start < config.warmup_s
                                            and calls < 10_000):
        t0 = clock()
        fn()
        sync()
        last = clock() - t0
        calls += 1
    number = 1 if last >= config.min_sample_s else min(
        10_000, math.ceil(config.min_sample_s / max(last, 1e-7)))
    repeats = max(3, min(config.repeats, int(config.max_case_s // max(last * number, 1e-9))))

    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            sync()
            t0 = clock()
            for _ in range(number):
                fn()
            sync()
            samples.append((clock() - t0) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    samples.sort()
    return Timing(median_s=percentile(samples, 50), p20_s=percentile(samples, 20),
                  p80_s=percentile(samples, 80), first_call_s=first, repeats=repeats,
                  number=number)
