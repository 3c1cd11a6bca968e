"""Result rows: one per (op, provider, shape, dtype) case, their formatting and the CSV file."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import os

import torch

from benchmarks.harness.machine import MiB, describe_device, versions
from lgvq.files import atomic_write

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
    now = datetime.datetime.now().astimezone()
    return RunInfo(run_id=now.strftime("%Y%m%dT%H%M%S"), date=now.isoformat(timespec="seconds"),
                   device=describe_device(device), versions=versions())


def error_text(error: BaseException) -> str:
    """A failed case's note: the exception's type and first line, at most 300 characters."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


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
