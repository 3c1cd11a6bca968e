"""Peak extra memory of one benchmark call: how much memory one steady-state call needs beyond
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
  once more and reads VmHWM: extra = VmHWM - VmRSS. Method "VmHWM-reset". Buffers lgvq keeps
  between calls (the reference search's scores) are freed before that call, so it counts them.
  The noise floor is measured at worker start-up: the largest error on cases of known size (a
  trivial op; fresh filled 1, 4 and 16 MiB outputs), printed with every report (about
  0.1-0.3 MiB: the kernel's RSS counters are per-CPU approximations). Blocks under 64 KiB may
  come from already-resident heap and go unseen; allocated but never-written memory is not
  resident. Where clear_refs
  is not writable (not Linux, old kernel; ``LGVQ_BENCH_MEMORY_METHOD=ru_maxrss-cold`` forces it)
  each case gets a fresh process and ``getrusage(RUSAGE_SELF).ru_maxrss`` (a lifetime peak that
  cannot be reset) is read around its *first* call (method "ru_maxrss-cold"): exact (peak - RSS
  before) when the call sets a new peak, otherwise only an upper bound, noted in the row; it
  includes one-off lazy initialisation. Timing never runs in the worker (the malloc setting
  would slow it), and never concurrently with it.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness.dtypes import matmul_precision
from benchmarks.harness.machine import MiB, proc_field_bytes
from benchmarks.harness.registry import REPO_ROOT, get_family
from benchmarks.harness.rows import error_text

# marks the worker's replies on its stdout, which libraries may also print to
_WORKER_TAG = "@@lgvq-memory "


def _proc_status_bytes(key: str) -> int | None:
    return proc_field_bytes("/proc/self/status", key)


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


def _release_held_buffers() -> None:
    """Free what lgvq keeps between calls (the reference search's score buffer, freed with the
    mmap threshold above, so it leaves resident memory), so that the measured call counts it:
    memory a call holds on to is memory it needs."""
    reference = sys.modules.get("lgvq_kernels.reference")
    if reference is not None:
        reference.release_score_buffers()


def measure_peak_cpu(fn: Callable[[], Any], method: str) -> tuple[int, str]:
    """(peak extra resident bytes of one call of ``fn``, note) in a memory worker (see the
    module docstring). The note is "" for an exact figure."""
    if method == "VmHWM-reset":
        fn()  # warm-up
        _release_held_buffers()
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


def worker_main() -> int:
    """Loop of the CPU memory worker (``python -m benchmarks.harness --memory-worker``): JSON
    jobs on stdin, tagged JSON results on stdout."""
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
            _emit({"ok": False, "error": error_text(error), "method": method})
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


