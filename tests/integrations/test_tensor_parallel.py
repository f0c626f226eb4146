"""remat under tensor and sequence parallelism (DTensor), alone and with FSDP2, on gloo.

``_tp_worker.py`` parallelizes a Llama-style model as torchtitan does and trains it under
each remat treatment. Without remat, each step's loss and all-gathered gradients equal one
process's to float rounding (DTensor's collectives sum partial results in another order than
one process's matmul does); with each treatment they equal the parallel run without remat
bit for bit (the same parallel computation: checkpointing must not change it).
"""

from __future__ import annotations

from pathlib import Path

import _tp_worker as worker
import pytest
import torch
from _ranks import run_ranks

import remat

pytestmark = pytest.mark.distributed

TIMEOUT_S = 400
CLOSE = {"rtol": 1e-5, "atol": 1e-6}
EXACT = {"rtol": 0.0, "atol": 0.0}


def _launch(tmp_path: Path, world: int, *extra: str) -> list[dict]:
    return run_ranks(Path(worker.__file__), world, tmp_path, TIMEOUT_S, *extra)


def _reference(batches: list[int]) -> dict:
    """One process, no remat: per step the loss of each batch and the mean gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = worker.build()
        optimizer = torch.optim.SGD(model.parameters(), lr=worker.LR)
        losses, grads = [], []
        for _ in range(worker.STEPS):
            step_losses, per_batch = [], []
            for index in batches:
                model.zero_grad(set_to_none=True)
                tokens, targets = worker.batch(index)
                loss = worker.loss_of(model(tokens), targets)
                loss.backward()
                step_losses.append(loss.detach())
                per_batch.append({n: p.grad.clone() for n, p in model.named_parameters()})
            mean = {n: sum(g[n] for g in per_batch) / len(per_batch) for n in per_batch[0]}
            for name, p in model.named_parameters():
                p.grad = mean[name]
            optimizer.step()
            losses.append(step_losses)
            grads.append(mean)
        return {"losses": losses, "grads": grads}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("tp"), 2)


@pytest.fixture(scope="module")
def fsdp_tp_results(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("fsdp_tp"), 4, "fsdp")


def _check(results: list[dict], reference: dict, case: str, batch_of_rank) -> None:
    """``none`` against one process (float rounding), every treatment against ``none``
    on the same ranks (bitwise)."""
    for rank, saved in enumerate(results):
        got = saved[case]
        assert "error" not in got, f"rank {rank}: {got.get('error')}"
        if case == "none":
            for step in range(worker.STEPS):
                expected_loss = reference["losses"][step][batch_of_rank(rank)]
                torch.testing.assert_close(got["losses"][step], expected_loss, **CLOSE)
                torch.testing.assert_close(got["grads"][step], reference["grads"][step], **CLOSE)
            continue
        assert got["applied"], case
        plain = saved["none"]
        assert "error" not in plain, f"rank {rank}: {plain.get('error')}"
        torch.testing.assert_close(got["losses"], plain["losses"], **EXACT)
        torch.testing.assert_close(got["grads"], plain["grads"], **EXACT)


@pytest.mark.parametrize("case", worker.CASES)
def test_tensor_and_sequence_parallel_two_ranks(tp_results, case):
    _check(tp_results, _reference([0]), case, lambda rank: 0)


@pytest.mark.parametrize("case", worker.CASES)
def test_fsdp2_with_tensor_parallel_on_a_2x2_mesh(fsdp_tp_results, case):
    # mesh (dp, tp) = (2, 2): ranks 0-1 are dp rank 0, ranks 2-3 dp rank 1
    _check(fsdp_tp_results, _reference([0, 1]), case, lambda rank: rank // 2)


def _saved_bytes_in_one_process() -> int:
    model = worker.build()
    tokens, targets = worker.batch(0)
    with remat.MemoryTracker() as tracker:
        worker.loss_of(model(tokens), targets).backward()
    return tracker.saved_bytes


def test_each_rank_holds_its_shards(tp_results, fsdp_tp_results):
    """The weights are split over the tensor-parallel ranks, and the tracker counts what a
    rank saves by its DTensors' local shards, never their global shape: to the byte what
    autograd's hooks see, below what one process saves."""
    whole = worker.HEADS * (worker.DIM // worker.HEADS)
    single = _saved_bytes_in_one_process()
    # FSDP2 shards the tensor-parallel shard again, on the same dim, over dp = 2
    for results, shards in ((tp_results, 2), (fsdp_tp_results, 4)):
        for saved in results:
            assert saved["none"]["wq_local_rows"] == whole // shards
            assert saved["none"]["saved_bytes"] == saved["none"]["hooked_saved_bytes"]
            assert 0 < saved["none"]["saved_bytes"] < single
