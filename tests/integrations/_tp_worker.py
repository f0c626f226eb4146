"""One rank of the tensor-parallel tests:
``python tests/integrations/_tp_worker.py RANK WORLD INIT_FILE OUT [FSDP]``.

A Llama-style model (RMSNorm, attention with grouped heads split over the ranks, SwiGLU
MLP) parallelized as torchtitan parallelizes Llama: embedding rowwise into a sequence
shard, norms sequence-parallel, ``wq``/``wk``/``wv``/``w1``/``w3`` colwise, ``wo``/``w2``
rowwise back into a sequence shard, the head colwise to a replicated output. Every rank
runs the same batch (tensor parallelism splits the weights, not the data). With ``FSDP``
(``"fsdp"``), the world is a 2-D mesh (dp, tp) and ``fully_shard`` runs on each layer and
the root over the dp dimension, each dp rank on its own batch.

Each case of :data:`CASES` applies one remat treatment before parallelizing and trains
for a few SGD steps; every step's loss and full (all-gathered) gradients go to
``OUT/rank{RANK}.pt``. ``tests/integrations/test_tensor_parallel.py`` compares them with a
single-process run.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import remat

STEPS = 2
LR = 0.1
VOCAB, DIM, HEADS, KV_HEADS, HIDDEN, LAYERS, SEQ, BATCH = 64, 32, 4, 4, 64, 2, 8, 2
CASES = (
    "none",
    "recompute-hooks",
    "recompute-function",
    "ops-replay",
    "ops-tape",
    "ops-regather",
    "offload",
    "segments",
    "apply-plan",
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head_dim = DIM // HEADS
        self.wq = nn.Linear(DIM, HEADS * self.head_dim, bias=False)
        self.wk = nn.Linear(DIM, KV_HEADS * self.head_dim, bias=False)
        self.wv = nn.Linear(DIM, KV_HEADS * self.head_dim, bias=False)
        self.wo = nn.Linear(HEADS * self.head_dim, DIM, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        # -1: the heads this rank holds (all of them in one process)
        q = self.wq(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)
        self.w3 = nn.Linear(DIM, HIDDEN, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(DIM), Attention()
        self.ffn_norm, self.feed_forward = RMSNorm(DIM), FeedForward()

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.norm, self.output = RMSNorm(DIM), nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def build() -> Llama:
    torch.manual_seed(0)
    return Llama()


def batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``index``-th data-parallel batch: tokens and next-token targets."""
    gen = torch.Generator().manual_seed(100 + index)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def treat(case: str, model: Llama) -> None:
    """Apply the case's remat treatment to every layer (before parallelizing)."""
    layers = remat.by_type(Layer)
    if case == "recompute-hooks":
        remat.apply(model, layers & remat.recompute(engine="hooks"))
    elif case == "recompute-function":
        remat.apply(model, layers & remat.recompute(engine="function"))
    elif case == "ops-replay":
        remat.apply(model, layers & remat.ops("save-matmuls", engine="replay"))
    elif case == "ops-tape":
        remat.apply(model, layers & remat.ops("save-matmuls", engine="tape"))
    elif case == "ops-regather":
        remat.apply(model, layers & regather())
    elif case == "offload":
        remat.apply(model, layers & remat.offload(0, store=remat.CpuStore()))
    elif case == "segments":
        remat.apply(model, remat.segments(2))
    elif case == "apply-plan":
        tokens, targets = batch(0)
        prof = remat.profile(model, tokens, loss_fn=lambda out: loss_of(out, targets))
        remat.apply_plan(model, remat.plan_from_choices(prof, ["recompute", "store"]))


def regather() -> remat.Ops:
    """Megatron's sequence-parallel saving on the replay engine: keep what backward reads
    (the colwise matmuls' outputs, attention, the norms' and SwiGLU's pointwise outputs, the
    residual sums), and all-gather the norms' sequence shards again in backward instead of
    keeping the gathered copies the colwise matmuls save. The rowwise ``wo`` and ``w2``
    (``mm`` calls 3 and 6 of a layer) are recomputed too: their outputs are partial sums
    over the full sequence, not shards."""
    c10d = torch.ops._c10d_functional
    kept = remat.ops(save=["_scaled_dot_product_flash_attention_for_cpu", "add", "rsqrt",
                           "mul", "silu"])  # fmt: skip
    return remat.Ops(
        save=kept.save,
        recompute=frozenset({c10d.all_gather_into_tensor, c10d.wait_tensor}),
        save_calls=frozenset(f"aten.mm.default#{k}" for k in (0, 1, 2, 4, 5)),
        engine="replay",
    )


def parallelize(model: Llama, tp_mesh: Any) -> None:
    """torchtitan's Llama tensor and sequence parallelism."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        },
    )
    for layer in model.layers:
        parallelize_module(
            layer,
            tp_mesh,
            {
                "attention_norm": SequenceParallel(),
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "attention.wq": ColwiseParallel(),
                "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
                "feed_forward.w3": ColwiseParallel(),
            },
        )


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_case(case: str, rank: int, world: int, fsdp: bool) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    model = build()
    treat(case, model)
    applied = sorted(remat.applied(model))
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize(model, mesh["tp"])
        for layer in model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        data_index = mesh["dp"].get_local_rank()
    else:
        parallelize(model, init_device_mesh("cpu", (world,)))
        data_index = 0
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    tokens, targets = batch(data_index)
    losses, grads = [], []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model(tokens), targets)
        loss.backward()
        losses.append(_full(loss).detach())
        grads.append({n: _full(p.grad).detach().clone() for n, p in model.named_parameters()})
        optimizer.step()
    wq = model.layers[0].attention.wq.weight
    result = {"losses": losses, "grads": grads, "applied": applied,
              "wq_local_rows": _local(wq).shape[0]}  # fmt: skip
    if case == "none":  # what one rank's step holds: by the tracker, and by autograd's hooks
        model.zero_grad(set_to_none=True)
        with remat.MemoryTracker() as tracker:
            loss_of(model(tokens), targets).backward()
        result["saved_bytes"] = tracker.saved_bytes
        result["hooked_saved_bytes"] = hooked_saved_bytes(model, tokens, targets)
    return result


def hooked_saved_bytes(model: nn.Module, tokens, targets) -> int:
    """Bytes of the local storages autograd saves in one forward, parameters aside: an oracle
    for the tracker that reads DTensors' local shards itself."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor

    def key(t: torch.Tensor) -> torch.UntypedStorage:
        # a DTensor holds its local shard; a collective's pending result its buffer
        while isinstance(t, (DTensor, AsyncCollectiveTensor)):
            t = t._local_tensor if isinstance(t, DTensor) else t.elem
        return t.untyped_storage()

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = key(t)
        # the parameters as the module holds them now (FSDP2 swaps in the gathered ones)
        if st._cdata not in {key(p)._cdata for p in model.parameters()}:
            saved[st._cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model(tokens), targets)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def main(rank: int, world: int, init_file: str, out: str, fsdp: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results: dict[str, Any] = {}
    try:
        for case in CASES:
            try:
                results[case] = run_case(case, rank, world, fsdp)
            except Exception as error:  # saved for the test to report
                results[case] = {"error": f"{type(error).__name__}: {error}"}
                traceback.print_exc()
            dist.barrier()
    finally:
        torch.save(results, f"{out}/rank{rank}.pt")
        dist.destroy_process_group()


if __name__ == "__main__":
    fsdp = len(sys.argv) > 5 and sys.argv[5] == "fsdp"
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], fsdp)
