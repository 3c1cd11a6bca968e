"""What ``import lgvq`` costs: the package must not import torch._dynamo (and with it sympy and
Triton: 1.2 s of the 4.3 s a training process spent importing, on the 2-core EPYC) unless the
user compiles. The functional layer marks its backend choice constant to torch.compile by hand;
the first test pins that the hand-made mark is the one torch's own decorator sets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_constant_mark_is_the_one_torch_sets() -> None:
    import torch._dynamo

    from lgvq_kernels import functional

    def public(): return 0

    def ours(): return 0

    torch._dynamo.assume_constant_result(public)
    functional._constant_to_compilers(ours)
    assert vars(public) == vars(ours) and vars(ours)  # same flags, and at least one
    assert vars(functional._resolve).items() >= vars(public).items()


def test_importing_the_package_leaves_the_compiler_unloaded() -> None:
    code = ("import sys, lgvq, lgvq_kernels, lgvq.training, lgvq_kernels.functional\n"
            "print(sorted(m for m in ('torch._dynamo', 'triton', 'sympy') if m in sys.modules))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", f"imported at start-up: {done.stdout.strip()}"
