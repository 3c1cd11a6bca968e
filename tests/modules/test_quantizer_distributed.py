"""Two CPU processes on gloo (torch.multiprocessing spawn), each with part of the batch: no hang,
the same codebook on both ranks after EMA steps, k-means init, dead-code replacement and CVQ
re-anchoring, and the same EMA result as one process on the whole batch."""

import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker  # noqa: E402

BACKENDS = ["reference", "auto"]
WORLD_SIZE = 2
DEADLINE_S = 120  # far above the ~10 s it takes; a hang fails instead of blocking the suite


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(distributed_worker.run,
                                 args=(WORLD_SIZE, free_port(), str(out_dir), BACKENDS),
                                 nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed quantizer test did not finish in {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.mark.distributed
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", ["ema", "kmeans", "dead_codes", "dead_codes_cluster_size",
                                      "cvq", "empty"])
def test_ranks_hold_identical_codebooks(rank_results, scenario, backend):
    first, second = (results[f"{scenario}/{backend}"] for results in rank_results)
    if isinstance(first, dict):
        for name in first:
            assert torch.equal(first[name], second[name]), name
    else:
        assert torch.equal(first, second)
        assert torch.isfinite(first).all()


@pytest.mark.distributed
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_match_one_process_on_the_whole_batch(rank_results, backend):
    single = distributed_worker.train_ema(
        distributed_worker.ema_quantizer(backend, sync_codebook=False),
        distributed_worker.full_batches())
    synced = rank_results[0][f"ema/{backend}"]
    start = distributed_worker.ema_quantizer(backend).codebooks
    assert not torch.allclose(single["codebooks"], start)  # the EMA did move the codes
    for name in ("codebooks", "cluster_size", "embed_sum"):
        torch.testing.assert_close(synced[name], single[name], rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
def test_dead_codes_were_replaced(rank_results):
    # threshold 3 with decay 0.5 on a batch of 20 + 35 small vectors: most codes die and are
    # reset to cluster size 1 at some step
    sizes = rank_results[0]["dead_codes_cluster_size/reference"]
    assert (sizes < 3.0).any()
