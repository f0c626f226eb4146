"""torch.compile (CPU inductor) on models with remat: same losses and gradients as eager.

Inductor fuses and reorders float math, so these comparisons use tolerances, not bitwise
equality. ``fallback_random`` makes compiled dropout draw from the eager RNG, so the
dropout masks match the eager reference.

What dynamo does with remat's hooks engine (see the report in the commit history): it
cannot trace it (``torch.get_rng_state`` is on dynamo's skip list and the engine enters
``saved_tensors_hooks``), so it breaks the graph inside each region; under torch.compile
regions must run on ``torch.utils.checkpoint`` (a higher-order op dynamo traces), which
``remat.integrations.hf`` does and ``remat.apply`` does not yet.
"""

from __future__ import annotations

import copy

import pytest
import torch

import remat
from conftest import NEEDS_COMPILER, tiny_gpt

pytestmark = [pytest.mark.slow, NEEDS_COMPILER, pytest.mark.usefixtures("fresh_dynamo")]

CLOSE = {"rtol": 1e-4, "atol": 1e-5}
STEPS = 2


def train(model, loss_of, params, seed: int):
    """Losses and gradients of STEPS SGD steps; ``model`` may be the compiled wrapper."""
    optimizer = torch.optim.SGD(params, lr=0.1)
    losses, grads = [], []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(seed + step)
        loss = loss_of(model)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in params])
        optimizer.step()
    return losses, grads


def gpt():
    return tiny_gpt(seq_len=8, d_model=16, n_heads=2, vocab_size=32, dropout=0.1)


def test_remat_apply_model_compiles_and_trains():
    reference, workload = gpt(), gpt()
    remat.apply(workload.model, remat.every(1))
    compiled = torch.compile(workload.model)
    expected = train(
        reference.model, lambda m: reference.loss(), [*reference.model.parameters()], 3
    )
    got = train(
        compiled,
        lambda m: workload.loss_fn(m(*workload.inputs), workload.targets),
        [*workload.model.parameters()],
        3,
    )
    torch.testing.assert_close(got, expected, **CLOSE)


HF_CASES = {
    "llama-recompute": ("llama", lambda: None),
    "gpt2-save-matmuls": ("gpt2", lambda: remat.ops("save-matmuls")),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_enabled_model_compiles_and_trains(case):
    pytest.importorskip("transformers")
    from test_hf import IDS, build, train_step
    from torch._inductor.compile_fx import compile_fx

    import remat.integrations.hf as hf

    arch, policy = HF_CASES[case]
    reference = build(arch, "sdpa")
    model = copy.deepcopy(reference)
    hf.enable(model, policy())
    graphs = []

    def inductor_recording(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, backend=inductor_recording)

    def loss_of(m):
        return m(input_ids=IDS, labels=IDS).loss

    expected = train(reference, loss_of, [*reference.parameters()], 5)
    # transformers' hub kernels (`kernels` >= 0.19, a dependency of transformers 5) set a
    # context variable in every attention forward and reset it on the way out; dynamo
    # refuses that side effect inside a checkpoint (it would not be replayed) and runs the
    # layer eagerly, unless told the forward's side effects need no replay.
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        got = train(compiled, loss_of, [*model.parameters()], 5)
    torch.testing.assert_close(got, expected, **CLOSE)
    # The layers were traced, with their checkpoint as the higher-order op inductor compiles
    # (not left to eager, where a compiled forward and an eager recompute would disagree).
    assert any("tag_activation_checkpoint" in gm.code for gm in graphs)
    # Outside torch.compile the same model runs remat's own engine: layer inputs kept only.
    saved_eager_remat = train_step(model)[2]
    assert saved_eager_remat < train_step(reference)[2] / 4
