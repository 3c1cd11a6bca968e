"""Test-wide set-up. Without a GPU the Triton kernels run under the interpreter, which must be
switched on before any Triton kernel module is imported. The repository root goes on sys.path so
that test modules import their shared helpers as ``tests.utils`` however pytest is started
(``--import-mode=importlib`` puts nothing there)."""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import lgvq_kernels  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


# LGVQ_COUNT_TRITON_SPECIALISATIONS=1: count the kernel specialisations the Triton launches of
# this session would compile, as Triton keys them (each constexpr value and launch option, each
# tensor's dtype and 16-byte alignment, each int argument's "== 1" and "% 16 == 0" unless the
# kernel does not specialise it). Under the interpreter nothing compiles, so this is how the
# CPU machine bounds the count; benchmarks/gpu_check.sh counts the compiled kernels on a GPU
# (the interpreter picks its own tiles, so the two counts need not agree).
_SPECIALISATIONS: dict = {}


def _count_specialisations() -> None:
    from triton.runtime.interpreter import InterpretedFunction
    import inspect

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args), **kwargs)
        params = inspect.signature(self.fn).parameters
        fixed = set(self.kwargs.get("do_not_specialize") or ())
        key = []
        for name, value in sorted(bound.items()):
            constexpr = name in params and str(params[name].annotation).endswith("constexpr")
            if constexpr or name not in params or isinstance(value, (bool, str)) or value is None:
                key.append((name, value))
            elif isinstance(value, torch.Tensor):
                key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
            elif isinstance(value, int):
                key.append((name,) if name in fixed else (name, value == 1, value % 16 == 0))
            else:
                key.append((name, type(value).__name__))
        _SPECIALISATIONS.setdefault(self.fn.__name__, set()).add(tuple(key))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


if os.environ.get("LGVQ_COUNT_TRITON_SPECIALISATIONS") == "1" \
        and os.environ.get("TRITON_INTERPRET") == "1":
    _count_specialisations()


def pytest_terminal_summary(terminalreporter):
    if _SPECIALISATIONS:
        counts = {name: len(keys) for name, keys in sorted(_SPECIALISATIONS.items())}
        terminalreporter.write_line(
            f"Triton kernel specialisations these tests would compile: {sum(counts.values())} "
            f"({', '.join(f'{name} {count}' for name, count in counts.items())})")
