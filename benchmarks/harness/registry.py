"""The registry of op families and their providers.

An *op family* (one file in benchmarks/, e.g. ``benchmarks/nearest_code.py``) registers
*providers* (implementations to compare) and named *shape sets*. A provider is a factory::

    factory(shape: dict, device: torch.device, dtype: str) -> fn   # fn() runs the op once

The factory allocates and fills the inputs (outside the timing) and returns a zero-argument
function; ``dtype`` is a mode name from ``benchmarks.harness.dtypes.DTYPES``.

A provider can be skipped per case: unavailable on the device (reason from the provider),
not applicable to the shape or dtype (reason), or estimated to need more memory than the
budget (inputs + the provider's ``extra_bytes`` estimate > the memory budget).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.harness.shapes import ShapeFormat, parse_key_values

if TYPE_CHECKING:
    from benchmarks.harness.rows import Row
    from benchmarks.harness.targets import Target

# the repository root: the memory worker runs from it, the report writes below it
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

Factory = Callable[[dict, torch.device, str], Callable[[], Any]]
Availability = Callable[[torch.device], tuple[bool, str]]


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
    available: Availability = _always_available
    applies: Callable[[dict, str, torch.device], str] = _always_applies
    extra_bytes: Callable[[dict, str], int] = _no_extra
    description: str = ""


@dataclasses.dataclass
class OpFamily:
    """An op family: providers, shape sets and how to describe and judge its results.

    shape_sets: named lists of shape dicts; "quick" (CI/demo, < ~60 s in all), "full" (the CPU
      report), "gpu" (gpu_check.sh) and "bench" (pytest-benchmark) are the conventional names.
    input_bytes: (shape, dtype) -> bytes of the inputs (for the memory budget).
    shape_format: how shapes are written on the command line and labelled in tables
      (default: "key=value,key=value" both ways).
    baseline: provider name the "speed-up" column divides by.
    floor: provider name the "x floor" column is relative to (e.g. the bare GEMM).
    targets: rows -> list of Target, computed from the measured numbers.
    default_dtypes: device type -> dtype modes run when the caller names none.
    """

    name: str
    module: str
    shape_sets: dict[str, list[dict]]
    input_bytes: Callable[[dict, str], int]
    shape_format: ShapeFormat | None = None
    baseline: str | None = None
    floor: str | None = None
    floor_label: str = "floor"
    targets: Callable[[list[Row]], list[Target]] | None = None
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

    def shape_label(self, shape: dict) -> str:
        """Shape dict -> short text for tables, CSV rows and targets ("16384x16384x256")."""
        if self.shape_format is None:
            return ",".join(f"{key}={value}" for key, value in shape.items())
        return self.shape_format.label(shape)

    def parse_shape(self, text: str) -> dict:
        """Text from the command line -> shape dict."""
        if self.shape_format is None:
            return parse_key_values(text)
        return self.shape_format.parse(text)

    def shapes(self, specs: Iterable[str]) -> list[dict]:
        """Shape set names and/or shape texts -> list of shape dicts (duplicates dropped)."""
        result: list[dict] = []
        for spec in specs:
            found = self.shape_sets[spec] if spec in self.shape_sets else [self.parse_shape(spec)]
            for shape in found:
                if shape not in result:
                    result.append(dict(shape))
        return result


FAMILIES: dict[str, OpFamily] = {}

# modules of the benchmarks package that are not op families
_INFRASTRUCTURE = {"harness", "report", "conftest"}


def register(family: OpFamily) -> OpFamily:
    """Register an op family (called by its module at import)."""
    FAMILIES[family.name] = family
    return family


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


def lgvq_backend_available(backend: str, op: str) -> Availability:
    """A provider's ``available`` for lgvq backend ``backend`` running ``op``: the backend
    registry's answer, except that the Triton CPU interpreter is never timed."""

    def available(device: torch.device) -> tuple[bool, str]:
        # imported here: a broken lgvq_kernels makes its providers unavailable, not the harness
        import lgvq_kernels

        info = lgvq_kernels.available_backends(op, device)[backend]
        if info.available and backend == "triton" and device.type != "cuda":
            return False, "the Triton CPU interpreter is for tests, far too slow to time"
        return info.available, info.reason

    return available


def importable(module: str, distribution: str) -> Availability:
    """A provider's ``available`` for a peer library: usable when ``module`` imports (a broken
    install is reported with its error, like a missing one)."""

    def available(device: torch.device) -> tuple[bool, str]:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - any reason the peer cannot be imported
            return False, f"{distribution} is not importable ({type(error).__name__}: {error})"
        return True, ""

    return available
