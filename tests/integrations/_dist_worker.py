"""One rank of the distributed tests:
``python tests/integrations/_dist_worker.py RANK WORLD INIT_FILE OUT``.

Trains the tiny GPT below for a few SGD steps under each case of :data:`CASES` (DDP
variants, FSDP2) with remat applied, and saves every step's loss and full gradients to
``OUT/rank{RANK}.pt``. ``tests/test_distributed.py`` starts two of these with the gloo
backend and compares the results with a single-process run of the same model and data.
A case that raises saves its error message instead, so the test can show it.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import remat
from remat.bench.workloads import Block, build_workload

STEPS = 2
LR = 0.1
PER_RANK = 2  # sequences per rank
CASES = (
    "ddp",
    "ddp-find-unused",
    "ddp-static-graph",
    "fsdp2",
    "fsdp2-apply-after",
    "ddp-tape",
    "fsdp2-tape",
    "ddp-torch-reentrant-find-unused",  # control: the classic failure; last, it may break DDP
)


# Op-level checkpointing on the tape engine: its recipes hold the gathered parameters that
# FSDP frees after the forward and gathers again before the backward.
TAPE = remat.ops("save-attention", engine="tape")


def workload(world: int):
    """The model, inputs and targets of every rank together (dropout on)."""
    return build_workload(
        "gpt",
        batch=PER_RANK * world,
        n_layers=2,
        seq_len=8,
        d_model=16,
        n_heads=2,
        vocab_size=32,
        dropout=0.1,
    )


def rank_batch(w, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return w.inputs[0][rows], w.targets[rows]


def seed(step: int, rank: int) -> None:
    """Dropout masks depend on the step and the rank, identically in the reference."""
    torch.manual_seed(1000 * step + rank)


def _torch_reentrant(model: nn.Module) -> None:
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        forward = block.forward
        block.forward = lambda x, f=forward: checkpoint(f, x, use_reentrant=True)


def _prepare(case: str, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(module to call, module whose named_parameters are the original ones)."""
    if case.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        if "torch-reentrant" in case:
            _torch_reentrant(model)
        elif case == "ddp-tape":
            remat.apply(model, remat.every(1) & TAPE)
        else:
            remat.apply(model, remat.every(1))  # before wrapping
        options = {
            "find_unused_parameters": "find-unused" in case,
            "static_graph": "static-graph" in case,
        }
        return DDP(model, **options), model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if case == "fsdp2":
        remat.apply(model, remat.by_type(Block))  # the documented order: AC, then shard
    if case == "fsdp2-tape":
        remat.apply(model, remat.by_type(Block) & TAPE)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if case == "fsdp2-apply-after":
        remat.apply(model, remat.by_type(Block))  # FSDPBlock subclasses Block
    return model, model


def _full(grad: torch.Tensor) -> torch.Tensor:
    # FSDP2 gradients are DTensors sharded on dim 0; full_tensor() all-gathers them.
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def run_case(case: str, rank: int, world: int) -> dict[str, Any]:
    w = workload(world)
    model, named = _prepare(case, w.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    inputs, targets = rank_batch(w, rank)
    losses, grads, applied = [], [], sorted(remat.applied(named))
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        seed(step, rank)
        loss = w.loss_fn(model(inputs), targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: _full(p.grad).detach().clone() for n, p in named.named_parameters()})
        optimizer.step()
    return {"losses": losses, "grads": grads, "applied": applied}


def main(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)  # the test's single-process reference uses one thread too
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results: dict[str, Any] = {}
    try:
        for case in CASES:
            try:
                results[case] = run_case(case, rank, world)
            except Exception as error:  # saved for the test to report
                results[case] = {"error": f"{type(error).__name__}: {error}"}
                traceback.print_exc()
                if "torch-reentrant" in case:
                    break  # DDP's state is unusable after this error
            dist.barrier()
    finally:
        torch.save(results, f"{out}/rank{rank}.pt")
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
