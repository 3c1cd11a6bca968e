"""Performance targets, judged from the rows a run has just measured: MET, NOT MET or
NOT MEASURED (benchmarks never fail on a speed; docs/benchmarks.md lists the targets)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from benchmarks.harness.rows import Row, format_seconds


@dataclasses.dataclass
class Target:
    """A performance target evaluated from measured rows: status MET, NOT MET or NOT MEASURED."""

    description: str
    status: str
    detail: str

    def line(self) -> str:
        return f"[{self.status}] {self.description}: {self.detail}"


def rows_by_case(rows: list[Row], device_type: str | None = None
                 ) -> dict[tuple[str, str], dict[str, Row]]:
    """{(shape label, dtype): {provider: row}} (of one device type when given): how targets
    look up the rows they compare."""
    by_case: dict[tuple[str, str], dict[str, Row]] = {}
    for row in rows:
        if device_type is None or row.device_type == device_type:
            by_case.setdefault((row.shape, row.dtype), {})[row.provider] = row
    return by_case


def ratio_target(description: str, case: Mapping[str, Row], numerator: str, denominator: str,
                 *, at_least: float | None = None, at_most: float | None = None,
                 where: str = "") -> Target:
    """A target on median(numerator) / median(denominator) of one case's rows ({provider: row},
    e.g. baseline / lgvq >= 4): MET or NOT MET, NOT MEASURED when a row is missing or did not
    run. ``where`` names the case in the NOT MEASURED reasons."""
    missing = []
    for name in (numerator, denominator):
        row = case.get(name)
        if row is None:
            missing.append(f"{name}{f' at {where}' if where else ''} not in this run")
        elif row.status != "ok" or row.median_s is None:
            missing.append(f"{name} {row.status}: {row.note}")
    if missing:
        return Target(description, "NOT MEASURED", "; ".join(missing))
    top, bottom = case[numerator].median_s, case[denominator].median_s
    ratio = top / bottom
    met = (at_least is None or ratio >= at_least) and (at_most is None or ratio <= at_most)
    needs = " and ".join([f">= {at_least}x"] * (at_least is not None)
                         + [f"<= {at_most}x"] * (at_most is not None))
    detail = (f"{ratio:.2f}x ({numerator} {format_seconds(top)} / {denominator} "
              f"{format_seconds(bottom)}; needs {needs})")
    return Target(description, "MET" if met else "NOT MET", detail)


def every_shape_target(description: str, rows: list[Row], numerator: str, denominator: str,
                       *, at_least: float | None = None, at_most: float | None = None,
                       applies=lambda shape: True, device_type: str | None = None) -> Target:
    """A target on median(numerator) / median(denominator) at every (shape, dtype) of the run
    where ``applies(shape dict)``: MET when the worst ratio meets it; the detail names the worst
    shape and how many shapes were compared (or could not be)."""
    ratios, missing = [], []
    for (label, dtype), case in rows_by_case(rows, device_type).items():
        top, bottom = case.get(numerator), case.get(denominator)
        if top is None and bottom is None:
            continue
        shape = (top or bottom).shape_dict
        if not applies(shape):
            continue
        if top is None or bottom is None or top.status != "ok" or bottom.status != "ok":
            missing.append(f"{label} {dtype}")
            continue
        ratios.append((top.median_s / bottom.median_s, f"{label} {dtype}"))
    if not ratios:
        return Target(description, "NOT MEASURED",
                      f"no measured pair of {numerator} and {denominator}")
    low, high = min(ratios), max(ratios)
    worst = low if at_least is not None else high
    met = (at_least is None or low[0] >= at_least) and (at_most is None or high[0] <= at_most)
    detail = (f"worst {worst[0]:.2f}x at {worst[1]} over {len(ratios)} shape(s)"
              + (f"; not measured: {', '.join(missing)}" if missing else ""))
    return Target(description, "MET" if met else "NOT MET", detail)
