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
