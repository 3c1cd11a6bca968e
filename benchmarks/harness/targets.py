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
