"""The machine a benchmark runs on: CPU model, memory, GPU, versions, load, memory budget."""

from __future__ import annotations

import os
import platform

import torch

MiB = 1 << 20
GiB = 1 << 30


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def proc_field_bytes(path: str, key: str) -> int | None:
    """A "Key:  N kB" field of a /proc file in bytes, or None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def total_memory_bytes() -> int:
    return proc_field_bytes("/proc/meminfo", "MemTotal") or 0


def available_memory_bytes() -> int:
    value = proc_field_bytes("/proc/meminfo", "MemAvailable")
    if value is None:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return 8 * GiB
    return value


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
