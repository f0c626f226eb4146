"""remat.apply / remove and the policies: gradients unchanged, bytes kept as promised."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import remat
from conftest import tiny_gpt
from remat.bench.workloads import Block

B, T, C, LAYERS = 2, 16, 32, 4
BLOCK_INPUT = B * T * C * 4  # one (B, T, C) float32 tensor


def gpt(dropout: float = 0.1):
    return tiny_gpt(batch=B, n_layers=LAYERS, seq_len=T, d_model=C, dropout=dropout)


def grads_of(workload, seed=3):
    torch.manual_seed(seed)
    workload.model.zero_grad(set_to_none=True)
    loss = workload.loss()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in workload.model.parameters()]


def forward_bytes(workload):
    """(live bytes after forward, bytes autograd saved, saved bytes per module)."""
    with remat.MemoryTracker(
        module=workload.model, count_existing=[workload.model, *workload.inputs]
    ) as tracker:
        loss = workload.loss()
    loss.backward()
    return tracker.current_bytes, tracker.saved_bytes, tracker.saved_bytes_by_module


POLICIES = {
    "by_type": lambda: remat.by_type(Block),
    "every1": lambda: remat.every(1),
    "every2": lambda: remat.every(2),
    "glob": lambda: "blocks.*",
    "predicate": lambda: lambda m, fqn: isinstance(m, Block) and fqn.endswith("1"),
    "function-engine": lambda: remat.recompute(engine="function"),
    "save-matmuls": lambda: remat.ops("save-matmuls"),
    "save-matmuls-tape": lambda: remat.ops("save-matmuls", engine="tape"),
    "every2-ops": lambda: remat.every(2) & remat.ops("save-matmuls"),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_gradients_equal_uncheckpointed(name):
    reference = gpt()
    checkpointed = gpt()
    remat.apply(checkpointed.model, POLICIES[name]())
    assert remat.applied(checkpointed.model)
    loss_ref, grads_ref = grads_of(reference)
    loss, grads = grads_of(checkpointed)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    torch.testing.assert_close(grads, grads_ref, rtol=0, atol=0)


def test_state_dict_parameters_and_repr_unchanged_and_remove_restores():
    workload = gpt()
    model = workload.model
    keys, names, text = (
        list(model.state_dict()),
        [n for n, _ in model.named_parameters()],
        repr(model),
    )
    remat.apply(model, remat.every(1))
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == names
    assert repr(model) == text
    assert set(remat.applied(model)) == {f"blocks.{i}" for i in range(LAYERS)}
    remat.remove(model)
    assert remat.applied(model) == {}
    assert all("forward" not in block.__dict__ for block in model.blocks)
    # a module whose forward was already replaced by its owner gets that one back
    own = model.blocks[0].forward = lambda x: x
    remat.apply(model, remat.every(1))
    remat.remove(model)
    assert model.blocks[0].forward is own


def test_applying_twice_does_not_nest():
    once, twice = gpt(), gpt()
    remat.apply(once.model, remat.every(1))
    remat.apply(twice.model, remat.every(1))
    remat.apply(twice.model, remat.every(1))
    assert forward_bytes(once)[:2] == forward_bytes(twice)[:2]
    # re-applying with another treatment replaces it
    remat.apply(twice.model, remat.ops("save-matmuls"))
    assert set(remat.applied(twice.model).values()) == {"ops"}


def test_every_block_keeps_only_block_inputs():
    _, saved_none, by_module = forward_bytes(gpt(dropout=0.0))
    blocks = sum(by_module[f"blocks.{i}"] for i in range(LAYERS))
    workload = gpt(dropout=0.0)
    remat.apply(workload.model, remat.every(1))
    _, saved, by_module_ckpt = forward_bytes(workload)
    assert saved == saved_none - blocks + LAYERS * BLOCK_INPUT
    for i in range(LAYERS):
        assert by_module_ckpt[f"blocks.{i}"] == BLOCK_INPUT


def test_every_second_block():
    _, saved_none, by_module = forward_bytes(gpt(dropout=0.0))
    workload = gpt(dropout=0.0)
    remat.apply(workload.model, remat.every(2))
    assert set(remat.applied(workload.model)) == {"blocks.0", "blocks.2"}
    _, saved, _ = forward_bytes(workload)
    assert saved == saved_none - by_module["blocks.0"] - by_module["blocks.2"] + 2 * BLOCK_INPUT


def test_save_matmuls_keeps_matmul_and_attention_outputs():
    full = gpt(dropout=0.0)
    remat.apply(full.model, remat.every(1))
    live_full, _, _ = forward_bytes(full)
    selective = gpt(dropout=0.0)
    remat.apply(selective.model, remat.ops("save-matmuls"))
    live_selective, _, _ = forward_bytes(selective)
    heads = 4
    per_block = (
        B * T * 3 * C * 4  # qkv addmm
        + B * T * C * 4  # attention output
        + B * heads * T * 4  # attention logsumexp
        + B * T * C * 4  # attention projection addmm
        + B * T * 4 * C * 4  # mlp fc addmm
        + B * T * C * 4  # mlp projection addmm
    )
    assert live_selective - live_full == LAYERS * per_block


def test_filter_and_selector_combinations():
    model = gpt().model
    remat.apply(model, remat.every(1), filter="blocks.[13]")
    assert set(remat.applied(model)) == {"blocks.1", "blocks.3"}
    remat.remove(model)
    remat.apply(model, remat.by_name("blocks.0") | remat.by_name("blocks.2"))
    assert set(remat.applied(model)) == {"blocks.0", "blocks.2"}
    remat.remove(model)
    remat.apply(model, remat.by_type(Block) & remat.every(2, offset=1))
    assert set(remat.applied(model)) == {"blocks.1", "blocks.3"}


def test_outermost_region_wins():
    model = gpt().model
    remat.apply(model, remat.by_type(Block) | remat.by_type(nn.Linear))
    regions = set(remat.applied(model))
    assert {f"blocks.{i}" for i in range(LAYERS)} <= regions
    assert not any(r.startswith("blocks.0.") for r in regions)
    assert "head" in regions  # a Linear outside any block


def test_applied_model_deepcopies_and_pickles():
    workload = gpt()
    remat.apply(workload.model, remat.every(1))
    for clone in (copy.deepcopy(workload.model), pickle.loads(pickle.dumps(workload.model))):
        assert remat.applied(clone) == remat.applied(workload.model)
        copied = gpt()
        copied.model = clone
        torch.testing.assert_close(grads_of(copied), grads_of(workload), rtol=0, atol=0)


def test_selecting_nothing_is_an_error_naming_the_pattern_and_the_modules():
    model = gpt().model
    remat.apply(model, remat.every(2))
    with pytest.raises(remat.PlanError, match=r"'no-such-glob' selects no module .* blocks\.0"):
        remat.apply(model, "no-such-glob")
    with pytest.raises(remat.PlanError, match=r"by_type.*Conv2d.* selects no module of GPT"):
        remat.apply(model, remat.by_type(nn.Conv2d))
    assert set(remat.applied(model)) == {"blocks.0", "blocks.2"}  # left as it was


def test_applying_another_policy_replaces_the_first():
    model = gpt().model
    remat.apply(model, remat.every(2))
    remat.apply(model, remat.by_name("blocks.1"))
    assert remat.applied(model) == {"blocks.1": "recompute"}


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        remat.apply("model", remat.every(1))
    with pytest.raises(TypeError, match="module filter must be a Selector"):
        remat.apply(gpt().model, 3)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        remat.every(0)
    with pytest.raises(TypeError, match="by_type expects module classes"):
        remat.by_type("Block")
    with pytest.raises(ValueError, match="unknown op 'matmull'"):
        remat.ops(save=["matmull"])
    with pytest.raises(ValueError, match="unknown preset 'save-all'"):
        remat.ops("save-all")
    with pytest.raises(ValueError, match="listed in both save= and recompute="):
        remat.ops(save=["mm"], recompute=["mm"])
    with pytest.raises(ValueError, match="engine='reentrant' is not one of"):
        remat.recompute(engine="reentrant")
    with pytest.raises(TypeError, match="unknown option.*'use_reentrant'"):
        remat.recompute(use_reentrant=False)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        remat.remove(None)


STEPPED = {
    **POLICIES,
    "sqrt": lambda: remat.sqrt(),
    "offload": lambda: remat.offload(min_bytes=0, store=remat.CpuStore()),
}


@pytest.mark.parametrize("name", sorted(STEPPED))
def test_parameters_stepped_before_backward_raise_under_every_policy(name):
    """A GAN's optD.step() between forward and backward: every policy raises (plain PyTorch
    does too, the weights being saved for backward) instead of using the new weights."""
    workload = gpt(dropout=0.0)
    remat.apply(workload.model, STEPPED[name]())
    loss = workload.loss()
    # The blocks' weights only: the head's are saved by plain autograd, which checks them.
    stepped = list(workload.model.blocks.parameters())
    optimizer = torch.optim.SGD(stepped, lr=0.1)
    for p in stepped:
        p.grad = torch.ones_like(p)
    optimizer.step()
    with pytest.raises(RuntimeError, match="modified by an in-?place operation"):
        loss.backward()
