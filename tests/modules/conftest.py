"""Module-layer tests run on tiny shapes: one intra-op thread each. On the 2-core machine two
threads made the convergence test 8x slower (6.1 s vs 0.74 s for 30 steps) whenever anything
else was running, from OpenMP waits around ~10 us ops."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
