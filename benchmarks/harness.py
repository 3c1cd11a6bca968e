"""The one benchmark harness: op families, providers, wall-clock timing, peak extra memory, rows.

An *op family* (one file in benchmarks/, e.g. ``benchmarks/nearest_code.py``) registers
*providers* (implementations to compare) and named *shape sets*. A provider is a factory::

    factory(shape: dict, device: torch.device, dtype: str) -> fn   # fn() runs the op once

The factory allocates and fills the inputs (outside the timing) and returns a zero-argument
function. ``dtype`` is a mode name from ``DTYPES``: "float32", "tf32" (float32 tensors, TF32
tensor-core products; CUDA only), "bfloat16", "float16", "float64". The harness sets the matmul
precision for the mode around every call, so factories need not.

Timing (``time_function``): wall clock (``time.perf_counter``; CUDA synchronised before and
after each sample). The first call is timed separately ("first_call_s": page faults on fresh
outputs, lazy initialisation, Triton compilation) and never enters the statistics; warm-up
continues to ``warmup`` calls and ``warmup_s`` seconds. Calls shorter than ``min_sample_s`` are
looped ``number`` times per sample. Reported: median, p20 and p80 of ``repeats`` samples
(fewer, at least 3, when a case would run past ``max_case_s``).

Peak extra memory (``peak_extra_bytes``): how much memory one steady-state call needs beyond
its inputs, outputs included.

* CUDA: in-process. After a warm-up call, ``torch.cuda.reset_peak_memory_stats``; extra =
  ``max_memory_allocated`` during one call minus ``memory_allocated`` before it (the inputs).
  Counts the caching allocator only (cuBLAS workspaces are allocated through it).
* CPU: in a separate worker process (``python -m benchmarks.harness --memory-worker``) started
  with ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc serves every block of 64 KiB or more
  with its own mmap and returns it to the OS on free: resident memory then tracks live memory
  instead of staying high from earlier cases. Per case the worker builds the inputs (the
  factory fills, hence touches, them), calls fn once (warm-up: thread pools, library caches),
  resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``), reads VmRSS, calls fn
  once more and reads VmHWM: extra = VmHWM - VmRSS. Method "VmHWM-reset". The noise floor is
  measured at worker start-up: the largest error on cases of known size (a trivial op; fresh
  filled 1, 4 and 16 MiB outputs), printed with every report (about 0.1-0.3 MiB: the kernel's
  RSS counters are per-CPU approximations). Blocks under 64 KiB may come from already-resident
  heap and go unseen; allocated but never-written memory is not resident. Where clear_refs
  is not writable (not Linux, old kernel; ``LGVQ_BENCH_MEMORY_METHOD=ru_maxrss-cold`` forces it)
  each case gets a fresh process and ``getrusage(RUSAGE_SELF).ru_maxrss`` (a lifetime peak that
  cannot be reset) is read around its *first* call (method "ru_maxrss-cold"): exact (peak - RSS
  before) when the call sets a new peak, otherwise only an upper bound, noted in the row; it
  includes one-off lazy initialisation. Timing never
  runs in the worker (the malloc setting would slow it), and never concurrently with it.

A provider can be skipped per case: unavailable on the device (reason from the provider),
not applicable to the shape or dtype (reason), or estimated to need more memory than the
budget (inputs + the provider's ``extra_bytes`` estimate > ``memory_budget_bytes``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _datetime
import gc
import importlib
import io
import json
import math
import os
import pkgutil
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
GiB = 1 << 30

# dtype mode name -> (storage dtype, matmul precision)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "ieee"),
    "tf32": (torch.float32, "tf32"),
    "bfloat16": (torch.bfloat16, "ieee"),
    "float16": (torch.float16, "ieee"),
    "float64": (torch.float64, "ieee"),
}


def torch_dtype(dtype: str) -> torch.dtype:
    """Storage dtype of a dtype mode name ("tf32" -> torch.float32)."""
    return DTYPES[dtype][0]


def precision(dtype: str) -> str:
    """Matmul precision of a dtype mode name: "tf32" or "ieee"."""
    return DTYPES[dtype][1]


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=torch_dtype(dtype)).element_size()


def dtype_reason(dtype: str, device: torch.device) -> str:
    """Why a dtype mode cannot run on a device ("" when it can)."""
    if dtype not in DTYPES:
        return f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}"
    if dtype == "tf32" and device.type != "cuda":
        return "tf32 is a CUDA tensor-core mode"
    return ""


@contextlib.contextmanager
def matmul_precision(dtype: str, device: torch.device):
    """TF32 matmuls on CUDA for the "tf32" mode, exact float32 otherwise; restored after."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision(dtype) == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------------------------
# registry: op families and their providers
# --------------------------------------------------------------------------------------------

Factory = Callable[[dict, torch.device, str], Callable[[], Any]]


def _always_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def _always_applies(shape: dict, dtype: str, device: torch.device) -> str:
    return ""


def _no_extra(shape: dict, dtype: str) -> int:
    return 0


@dataclasses.dataclass
class Provider:
    """One implementation of an op family's operation.

    name: short id used on the command line and in CSV rows ("torch-addmm-argmin").
    label: what tables and plots show ("torch addmm+argmin").
    factory: (shape, device, dtype) -> zero-argument function running the op once.
    available: device -> (usable, reason why not); checked once per device.
    applies: (shape, dtype, device) -> "" or the reason this case does not apply.
    extra_bytes: (shape, dtype) -> estimated peak memory beyond the inputs (for the budget).
    """

    name: str
    label: str
    factory: Factory
    available: Callable[[torch.device], tuple[bool, str]] = _always_available
    applies: Callable[[dict, str, torch.device], str] = _always_applies
    extra_bytes: Callable[[dict, str], int] = _no_extra
    description: str = ""


@dataclasses.dataclass
class Target:
    """A performance target evaluated from measured rows: status MET, NOT MET or NOT MEASURED."""

    description: str
    status: str
    detail: str

    def line(self) -> str:
        return f"[{self.status}] {self.description}: {self.detail}"


@dataclasses.dataclass
class OpFamily:
    """An op family: providers, shape sets and how to describe and judge its results.

    shape_sets: named lists of shape dicts; "quick" (CI/demo, < ~60 s in all), "full" (the CPU
      report), "gpu" (gpu_check.sh) and "bench" (pytest-benchmark) are the conventional names.
    input_bytes: (shape, dtype) -> bytes of the inputs (for the memory budget).
    shape_label: shape -> short text for tables ("16384x16384x256").
    parse_shape: text from the command line -> shape dict (default: "key=value,key=value").
    baseline: provider name the "speed-up" column divides by.
    floor: provider name the "x floor" column is relative to (e.g. the bare GEMM).
    targets: rows -> list of Target, computed from the measured numbers.
    default_dtypes: device type -> dtype modes run when the caller names none.
    """

    name: str
    module: str
    shape_sets: dict[str, list[dict]]
    input_bytes: Callable[[dict, str], int]
    shape_label: Callable[[dict], str] = lambda shape: ",".join(f"{k}={v}"
                                                               for k, v in shape.items())
    parse_shape: Callable[[str], dict] | None = None
    baseline: str | None = None
    floor: str | None = None
    floor_label: str = "floor"
    targets: Callable[[list["Row"]], list[Target]] | None = None
    default_dtypes: dict[str, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: {"cpu": ("float32",), "cuda": ("float32",)})
    providers: dict[str, Provider] = dataclasses.field(default_factory=dict)

    def provider(self, name: str, label: str | None = None,
                 **options) -> Callable[[Factory], Factory]:
        """Decorator registering ``factory`` as provider ``name`` (options: Provider fields)."""

        def register_factory(factory: Factory) -> Factory:
            if name in self.providers:
                raise ValueError(f"provider {name!r} is already registered for op {self.name!r}")
            self.providers[name] = Provider(name=name, label=label or name, factory=factory,
                                            **options)
            return factory

        return register_factory

    def shapes(self, specs: Iterable[str]) -> list[dict]:
        """Shape set names and/or shape texts -> list of shape dicts (duplicates dropped)."""
        result: list[dict] = []
        for spec in specs:
            if spec in self.shape_sets:
                found = self.shape_sets[spec]
            else:
                found = [(self.parse_shape or parse_key_values)(spec)]
            for shape in found:
                if shape not in result:
                    result.append(dict(shape))
        return result


FAMILIES: dict[str, OpFamily] = {}

# modules of this package that are not op families
_INFRASTRUCTURE = {"harness", "report", "conftest"}


def register(family: OpFamily) -> OpFamily:
    """Register an op family (called by its module at import)."""
    FAMILIES[family.name] = family
    return family


def lgvq_backend_available(backend: str, op: str
                           ) -> Callable[[torch.device], tuple[bool, str]]:
    """A provider's ``available`` for lgvq backend ``backend`` on ``op``: the registry's
    answer, except that the Triton CPU interpreter is never timed."""

    def available(device: torch.device) -> tuple[bool, str]:
        import lgvq_kernels

        info = lgvq_kernels.available_backends(op, device)[backend]
        if info.available and backend == "triton" and device.type != "cuda":
            return False, "the Triton CPU interpreter is for tests, far too slow to time"
        return info.available, info.reason

    return available


def rows_by_case(rows: list["Row"]) -> dict[tuple[str, str], dict[str, "Row"]]:
    """{(shape label, dtype): {provider: row}}: how targets look up the rows they compare."""
    by_case: dict[tuple[str, str], dict[str, Row]] = {}
    for row in rows:
        by_case.setdefault((row.shape, row.dtype), {})[row.provider] = row
    return by_case


def ratio_target(description: str, numerator: "Row | None", denominator: "Row | None", *,
                 at_least: float | None = None, at_most: float | None = None) -> Target:
    """A target on ``numerator time / denominator time`` (e.g. baseline / lgvq >= 4): MET or
    NOT MET from the two medians, NOT MEASURED when a row is missing or failed."""
    if numerator is None or denominator is None:
        return Target(description, "NOT MEASURED", "a provider's row is missing")
    if numerator.median_s is None or denominator.median_s is None:
        return Target(description, "NOT MEASURED", "a case failed")
    ratio = numerator.median_s / denominator.median_s
    met = (at_least is None or ratio >= at_least) and (at_most is None or ratio <= at_most)
    return Target(description, "MET" if met else "NOT MET",
                  f"{ratio:.2f}x ({format_seconds(numerator.median_s)} vs "
                  f"{format_seconds(denominator.median_s)})")


def run_pytest_benchmark(benchmark, family: OpFamily, provider: str, shape: dict,
                         device: torch.device, dtype: str) -> None:
    """The pytest-benchmark body shared by benchmarks/test_*_bench.py: skip with the reason
    when the case cannot run, else time the provider (one untimed warm-up call first)."""
    import pytest

    reason = provider_unavailable_reason(family, provider, device) \
        or case_skip_reason(family, provider, shape, dtype, device)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"{family.name} {family.shape_label(shape)} {dtype}"
    benchmark.extra_info.update(op=family.name, provider=provider, shape=shape, dtype=dtype,
                                device=describe_device(device))
    with matmul_precision(dtype, device):
        call = family.providers[provider].factory(shape, device, dtype)
        synchronize = _synchronizer(device)

        def fn():
            call()
            synchronize()

        fn()  # warm-up: first-touch page faults, lazy initialisation, compilation
        benchmark(fn)


def discover() -> dict[str, OpFamily]:
    """Import every op-family module of the benchmarks package; return the registry."""
    import benchmarks

    for info in pkgutil.iter_modules(benchmarks.__path__):
        if info.name in _INFRASTRUCTURE or info.name.startswith("test_"):
            continue
        importlib.import_module(f"benchmarks.{info.name}")
    return FAMILIES


def get_family(name: str) -> OpFamily:
    if name not in FAMILIES:
        discover()
    if name not in FAMILIES:
        raise ValueError(f"unknown op family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def parse_key_values(text: str) -> dict:
    """"N=1024,K=512,metric=l2" -> {"N": 1024, "K": 512, "metric": "l2"}."""
    shape: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ValueError(f"shape item {item!r} is not key=value (in {text!r})")
        key, value = (part.strip() for part in item.split("=", 1))
        shape[key] = int(value) if re.fullmatch(r"-?\d+", value) else value
    return shape


# --------------------------------------------------------------------------------------------
# machine description
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def total_memory_bytes() -> int:
    return _meminfo("MemTotal") or 0


def available_memory_bytes() -> int:
    value = _meminfo("MemAvailable")
    if value is None:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return 8 * GiB
    return value


def _proc_field_bytes(path: str, key: str) -> int | None:
    """A "Key:  N kB" field of a /proc file in bytes, or None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _meminfo(key: str) -> int | None:
    return _proc_field_bytes("/proc/meminfo", key)


def describe_device(device: torch.device) -> str:
    """One line naming the machine: CPU model, cores, torch threads, memory; GPU if used."""
    host = (f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"{total_memory_bytes() / GiB:.0f} GiB")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / GiB:.0f} GiB, CUDA {torch.version.cuda}, "
                f"sm_{props.major}{props.minor}); host {host}")
    return host


def versions() -> dict[str, str]:
    result = {"torch": torch.__version__, "lgvq": "", "triton": ""}
    try:
        import lgvq_kernels

        result["lgvq"] = getattr(lgvq_kernels, "__version__", "")
    except Exception as error:  # noqa: BLE001 - a broken package is reported, not fatal
        result["lgvq"] = f"unimportable ({type(error).__name__})"
    try:
        import triton

        result["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        result["triton"] = "not installed"
    return result


def load_average() -> float | None:
    """1-minute load average (None where unsupported). Above the core count, timings are
    unreliable: other processes share the cores."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def default_memory_budget(device: torch.device) -> int:
    """75% of the memory available now (CPU) or 85% of the GPU's memory."""
    if device.type == "cuda":
        return int(0.85 * torch.cuda.get_device_properties(device).total_memory)
    return int(0.75 * available_memory_bytes())


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


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


def _synchronizer(device: torch.device) -> Callable[[], None]:
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
    sync = _synchronizer(device)
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


# --------------------------------------------------------------------------------------------
# peak extra memory
# --------------------------------------------------------------------------------------------

_WORKER_TAG = "@@lgvq-memory "


def _proc_status_bytes(key: str) -> int | None:
    return _proc_field_bytes("/proc/self/status", key)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported."""
    for _ in range(3):
        hwm_before = _proc_status_bytes("VmHWM")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        hwm, rss = _proc_status_bytes("VmHWM"), _proc_status_bytes("VmRSS")
        if hwm is None or rss is None or hwm_before is None:
            return False
        # reset: the mark now sits at the resident size (up to the counters' per-CPU slack and
        # whatever was freed between the two reads), or at least it went down
        if hwm <= rss + MiB or hwm < hwm_before:
            return True
    return False


def _ru_maxrss_bytes() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def measure_peak_cpu(fn: Callable[[], Any], method: str) -> tuple[int, str]:
    """(peak extra resident bytes of one call of ``fn``, note) in a memory worker (see the
    module docstring). The note is "" for an exact figure."""
    if method == "VmHWM-reset":
        fn()  # warm-up
        gc.collect()
        if not _reset_peak_rss():
            raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs")
        before = _proc_status_bytes("VmRSS")
        out = fn()
        peak = _proc_status_bytes("VmHWM")
        del out
        return max(0, peak - before), ""
    # "ru_maxrss-cold": the first call in a fresh process; the lifetime peak cannot be reset
    gc.collect()
    rss_before = _proc_status_bytes("VmRSS")
    peak_before = _ru_maxrss_bytes()
    out = fn()
    peak_after = _ru_maxrss_bytes()
    del out
    if rss_before is None:
        return max(0, peak_after - peak_before), "lower bound (current RSS unreadable)"
    if peak_after > peak_before:  # the call set a new peak: exact
        return peak_after - rss_before, ""
    return max(0, peak_before - rss_before), \
        "upper bound (the call stayed under the process's earlier peak)"


def measure_peak_cuda(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak extra bytes of the caching allocator during one call (after a warm-up call)."""
    fn()
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return max(0, peak - before)


def _noise_cases() -> list[tuple[Callable[[], Any], int]]:
    """(function, true extra bytes): a trivial op, and fresh filled outputs of known size."""
    small = torch.ones(256)
    cases = [(lambda: small.sum(), 0)]
    for mib in (1, 4, 16):
        cases.append((lambda n=mib * MiB // 4: torch.ones(n), mib * MiB))
        # a multi-threaded op writing its output while its temporary input is alive
        cases.append((lambda n=mib * MiB // 4: torch.ones(n).mul(2), 2 * mib * MiB))
    return cases * 2


def measure_noise_floor(method: str) -> int:
    """Largest error of ``measure_peak_cpu`` on cases of known size (kernel RSS counters are
    per-CPU approximations, and pages are counted as touched)."""
    return max(abs(measure_peak_cpu(fn, method)[0] - truth) for fn, truth in _noise_cases())


def _worker_method() -> str:
    if os.environ.get("LGVQ_BENCH_MEMORY_METHOD") == "ru_maxrss-cold":  # force the fallback
        return "ru_maxrss-cold"
    return "VmHWM-reset" if _reset_peak_rss() else "ru_maxrss-cold"


def _memory_worker_main() -> int:
    """Loop of the CPU memory worker: JSON jobs on stdin, tagged JSON results on stdout."""
    warnings.simplefilter("ignore")
    method = _worker_method()
    noise = None  # not measured under "ru_maxrss-cold"
    if method == "VmHWM-reset":
        noise = measure_noise_floor(method)
    _emit({"hello": True, "method": method, "noise_bytes": noise})
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            torch.set_num_threads(job["threads"])
            family = get_family(job["op"])
            provider = family.providers[job["provider"]]
            device = torch.device("cpu")
            fn = provider.factory(job["shape"], device, job["dtype"])
            with matmul_precision(job["dtype"], device):
                extra, note = measure_peak_cpu(fn, method)
            del fn
            gc.collect()
            _emit({"ok": True, "peak_extra_bytes": extra, "note": note, "method": method})
        except Exception as error:  # noqa: BLE001 - reported per case
            _emit({"ok": False, "error": _error_text(error), "method": method})
        if method != "VmHWM-reset":
            break  # "ru_maxrss-cold" needs a fresh process per case
    return 0


def _emit(message: dict) -> None:
    sys.stdout.write(_WORKER_TAG + json.dumps(message) + "\n")
    sys.stdout.flush()


class MemoryWorker:
    """Parent side of the CPU memory worker; restarts it after a crash (e.g. OOM kill)."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.method = ""
        self.noise_bytes: int | None = None
        self.stderr = None

    def _start(self) -> None:
        env = dict(os.environ)
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # blocks >= 64 KiB: own mmap, unmapped on free
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONWARNINGS"] = "ignore"
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.harness", "--memory-worker"], cwd=REPO_ROOT,
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            text=True, bufsize=1)
        hello = self._read()
        if hello is None:
            raise RuntimeError(f"the memory worker did not start: {self._stderr_tail()}")
        self.method, self.noise_bytes = hello["method"], hello["noise_bytes"]

    def _read(self) -> dict | None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(_WORKER_TAG):
                return json.loads(line[len(_WORKER_TAG):])
        return None

    def _stderr_tail(self) -> str:
        if self.stderr is None:
            return ""
        self.stderr.seek(0)
        lines = [line for line in self.stderr.read().strip().splitlines() if line.strip()]
        return " | ".join(lines[-3:])[-400:]

    def measure(self, op: str, provider: str, shape: dict, dtype: str) -> tuple[int | None, str]:
        """(peak extra bytes or None, note or error)."""
        if self.process is None or self.process.poll() is not None:
            self._start()
        job = {"op": op, "provider": provider, "shape": shape, "dtype": dtype,
               "threads": torch.get_num_threads()}
        try:
            self.process.stdin.write(json.dumps(job) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        reply = self._read()
        if reply is None:
            code = self.process.wait()
            self.process = None
            killed = " (killed: out of memory?)" if code in (-9, 137) else ""
            return None, f"memory worker died, exit code {code}{killed} {self._stderr_tail()}"
        if self.method != "VmHWM-reset":
            self.close()
        if not reply["ok"]:
            return None, reply["error"]
        return reply["peak_extra_bytes"], reply.get("note", "")

    def close(self) -> None:
        if self.process is not None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
            self.process = None


# --------------------------------------------------------------------------------------------
# running cases into rows
# --------------------------------------------------------------------------------------------

ROW_FIELDS = ("run_id", "date", "op", "provider", "provider_label", "shape", "shape_json",
              "dtype", "device_type", "status", "note", "median_s", "p20_s", "p80_s",
              "first_call_s", "repeats", "number", "peak_extra_bytes", "memory_method",
              "device", "threads", "load_avg", "torch_version", "lgvq_version", "triton_version")


@dataclasses.dataclass
class Row:
    """One (op, provider, shape, dtype) result. status: "ok", "skipped" or "error"."""

    run_id: str
    date: str
    op: str
    provider: str
    provider_label: str
    shape: str
    shape_json: str
    dtype: str
    device_type: str
    status: str
    note: str = ""
    median_s: float | None = None
    p20_s: float | None = None
    p80_s: float | None = None
    first_call_s: float | None = None
    repeats: int | None = None
    number: int | None = None
    peak_extra_bytes: int | None = None
    memory_method: str = ""
    device: str = ""
    threads: int = 0
    load_avg: float | None = None  # 1-minute load average when the case was timed
    torch_version: str = ""
    lgvq_version: str = ""
    triton_version: str = ""
    unavailable: bool = False  # not a CSV column: the skip is the provider's availability

    @property
    def shape_dict(self) -> dict:
        return json.loads(self.shape_json)

    def csv_values(self) -> dict:
        values = dataclasses.asdict(self)
        return {key: "" if values[key] is None else values[key] for key in ROW_FIELDS}


@dataclasses.dataclass
class RunInfo:
    run_id: str
    date: str
    device: str
    versions: dict[str, str]
    memory_method: str = ""
    memory_noise_bytes: int | None = None


def new_run_info(device: torch.device) -> RunInfo:
    now = _datetime.datetime.now().astimezone()
    return RunInfo(run_id=now.strftime("%Y%m%dT%H%M%S"), date=now.isoformat(timespec="seconds"),
                   device=describe_device(device), versions=versions())


def _error_text(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


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
            return _error_text(error)
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
    cases = [(shape, dtype, name) for shape in shapes for dtype in dtypes for name in providers]
    for index, (shape, dtype, name) in enumerate(cases, 1):
        provider = family.providers[name]
        row = Row(run_id=run.run_id, date=run.date, op=family.name, provider=name,
                  provider_label=provider.label, shape=family.shape_label(shape),
                  shape_json=json.dumps(shape, sort_keys=True), dtype=dtype,
                  device_type=device.type, status="skipped", device=run.device,
                  threads=torch.get_num_threads(), torch_version=run.versions["torch"],
                  lgvq_version=run.versions["lgvq"], triton_version=run.versions["triton"])
        rows.append(row)
        row.load_avg = load_average()
        usable, reason = availability[name]
        if not usable:
            row.note, row.unavailable = f"unavailable: {reason}", True
        elif reason := case_skip_reason(family, name, shape, dtype, device, budget):
            row.note = reason
        else:
            _time_case(row, family, provider, shape, dtype, device, timing, memory)
        progress(f"[{index}/{len(cases)}] {family.name} {row.shape} {dtype} {name}: "
                 + (format_seconds(row.median_s) if row.status == "ok" else
                    f"{row.status} ({row.note[:90]})"))

    if memory and device.type == "cpu":
        _measure_cpu_rows(family, rows, run, progress)
    return rows


def _time_case(row: Row, family: OpFamily, provider: Provider, shape: dict, dtype: str,
               device: torch.device, timing: TimingConfig, memory: bool) -> None:
    fn = None
    try:
        with warnings.catch_warnings(), matmul_precision(dtype, device):
            warnings.simplefilter("ignore")
            fn = provider.factory(shape, device, dtype)
            result = time_function(fn, device, timing)
            row.status = "ok"
            row.median_s, row.p20_s, row.p80_s = result.median_s, result.p20_s, result.p80_s
            row.first_call_s, row.repeats, row.number = (result.first_call_s, result.repeats,
                                                         result.number)
            if memory and device.type == "cuda":
                row.peak_extra_bytes = measure_peak_cuda(fn, device)
                row.memory_method = "cuda max_memory_allocated"
    except Exception as error:  # noqa: BLE001 - one failing case never stops the run
        row.status, row.note = "error", _error_text(error)
    finally:
        del fn
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
                extra, note = None, _error_text(error)
            row.peak_extra_bytes, row.memory_method = extra, worker.method
            if note:
                row.note = (row.note + "; " if row.note else "") + f"memory: {note}"
            progress(f"[memory {index}/{len(todo)}] {row.shape} {row.dtype} {row.provider}: "
                     + (f"{extra / MiB:.1f} MiB" if extra is not None else note[:90]))
    finally:
        worker.close()
    run.memory_method, run.memory_noise_bytes = worker.method, worker.noise_bytes


# --------------------------------------------------------------------------------------------
# formatting and files
# --------------------------------------------------------------------------------------------


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def format_mib(value: int | None) -> str:
    return "—" if value is None else f"{value / MiB:.1f}"


def atomic_write(path: str, data: str | bytes) -> None:
    """Write a file through a temporary in the same folder: a good file is never left half-done."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    handle, temporary = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(handle, mode) as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def append_csv(path: str, rows: list[Row]) -> str:
    """Append rows to a CSV (header written once). A file with another header is left alone and
    the rows go to a sibling file instead; returns the path written."""
    existing = ""
    if os.path.exists(path):
        with open(path, newline="") as f:
            existing = f.read()
        header = existing.splitlines()[0] if existing else ""
        if existing and header.split(",") != list(ROW_FIELDS):
            stem, ext = os.path.splitext(path)
            return append_csv(f"{stem}-v2{ext}", rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_FIELDS, lineterminator="\n")
    if not existing:
        writer.writeheader()
    elif not existing.endswith("\n"):
        buffer.write("\n")
    for row in rows:
        writer.writerow(row.csv_values())
    atomic_write(path, existing + buffer.getvalue())
    return path


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


if __name__ == "__main__":
    if sys.argv[1:] == ["--memory-worker"]:
        # run from the importable module, whose registry the op-family modules fill
        from benchmarks import harness as _harness

        sys.exit(_harness._memory_worker_main())
    sys.exit("usage: python -m benchmarks.harness --memory-worker "
             "(internal; run reports with python -m benchmarks.report)")
