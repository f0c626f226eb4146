"""remat.profile -> remat.plan -> remat.apply_plan / autoplan on real models."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import remat
from conftest import assert_predicted_to_the_byte, every_plan, mean_square, tiny_gpt
from remat.bench.workloads import build_workload
from remat.engine.checkpointing import run_checkpoint
from remat.profiling.profile_data import Profile
from remat.profiling.step import measure_step_peak

B, T, C = 2, 16, 32


def small_gpt(**sizes):
    return tiny_gpt(**{"batch": B, "n_layers": 4, "seq_len": T, "d_model": C, **sizes})


def loss_of(workload):
    return lambda out: workload.loss_fn(out, workload.targets)


def assert_same_gradients(workload, reference):
    """One seeded training step of each; the gradients must be bitwise equal."""
    for w in (reference, workload):
        torch.manual_seed(0)
        w.model.zero_grad(set_to_none=True)
        w.loss().backward()
    for a, b in zip(workload.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_profile_bytes_per_block():
    workload = small_gpt()
    prof = remat.profile(workload.model, *workload.inputs, loss_fn=loss_of(workload))
    assert [r.name for r in prof.regions] == [f"blocks.{i}" for i in range(4)]
    x = B * T * C * 4
    heads = 4
    # everything a pre-norm block saves, by hand: its input, both layer norms' outputs,
    # means and rstds, qkv (one storage for q, k, v), attention out and logsumexp, the
    # re-laid-out attention output, the residual, fc out and gelu out
    saved = (
        x  # input (saved by ln1)
        + 4 * (B * T * 4)  # ln1 and ln2 mean, rstd
        + 2 * x  # ln1 and ln2 outputs
        + 3 * x  # qkv
        + B * heads * T * 4  # logsumexp
        + x  # attention output (CPU flash attention lays it out as (B, T, H, hd), so the
        # transpose + reshape before the projection is a view of it, not a copy)
        + x  # first residual (input of ln2)
        + 2 * 4 * x  # fc output, gelu output
    )
    for region in prof.regions:
        assert region.input_bytes == x and region.output_bytes == x
        assert region.saved_bytes == saved
        assert region.cost > 0 and region.flops > 0 and region.ops
    assert Profile.from_json(prof.to_json()) == prof


class _DroppedBranchBlock(nn.Module):
    """Computes a value it never uses (Mamba's mixer computes ``-exp(A_log)`` twice): the
    branch's node saves its own output, and dies in the forward with the branch."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a_log = nn.Parameter(torch.randn(d, d))
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        _ = -torch.exp(self.a_log)  # dropped: exp saved its result, freed with the branch
        return x + torch.tanh(self.lin(x)) @ -torch.exp(self.a_log)


def test_a_branch_the_forward_drops_is_not_counted_as_saved():
    torch.manual_seed(0)
    d = 32
    model = nn.Sequential(*[_DroppedBranchBlock(d) for _ in range(4)])
    x = torch.randn(8, d, requires_grad=True)

    prof = remat.profile(model, x, loss_fn=mean_square)
    act, weight = 8 * d * 4, d * d * 4
    # lin input (the first block's is the batch: not new), tanh output, the used branch's
    # exp result and -exp (the matmul's operand)
    saved = 2 * act + 2 * weight
    assert [r.saved_bytes for r in prof.regions] == [saved - act] + [saved] * 3
    plans = (["recompute"] * 4, ["store"] * 3 + ["recompute"], ["store"] * 4)
    assert_predicted_to_the_byte(model, (x,), prof, plans)


class _CachingBlock(nn.Module):
    """Keeps what it computes in a cache the model fills even in training (XLM's attention
    builds a KV cache on every forward): a checkpoint around it frees none of that."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, cache):
        k = self.lin(x)
        cache.append(k)
        return x + torch.tanh(k)


class _CachingModel(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            _CachingBlock(d) if i % 2 else _DroppedBranchBlock(d) for i in range(4)
        )

    def forward(self, x):
        cache: list = []
        for block in self.blocks:
            x = block(x, cache) if isinstance(block, _CachingBlock) else block(x)
        return x


def test_a_region_holding_bytes_outside_the_graph_is_only_stored():
    torch.manual_seed(0)
    d = 32
    model = _CachingModel(d)
    x = torch.randn(8, d, requires_grad=True)

    prof = remat.profile(model, x, loss_fn=mean_square, regions=[f"blocks.{i}" for i in range(4)])
    assert [r.held_bytes for r in prof.regions] == [0, 8 * d * 4, 0, 8 * d * 4]
    chain = prof.to_chain()
    assert [len(r.menu()) > 1 for r in chain.regions] == [True, False, True, False]
    assert "outside autograd's graph" in chain.regions[1].segment_break
    with pytest.raises(ValueError, match="outside autograd's graph"):
        remat.plan_from_choices(prof, ["recompute"] * 4)
    plan = remat.plan_from_choices(prof, ["recompute", "store", "recompute", "store"])
    m = copy.deepcopy(model)
    remat.apply_plan(m, plan)
    assert measure_step_peak(m, (x,), mean_square) == plan.predicted_peak_bytes


class _BranchesAsRegions(nn.Module):
    """Residual adds outside the regions, as XLM splits its layers: ``x = norm(x + ffn(x))``
    with ``ffn`` and ``norm`` the regions. The add hands the feed-forward's output gradient
    to ``x``'s other path too, which holds it through the feed-forward's backward."""

    def __init__(self, d: int, n: int = 3) -> None:
        super().__init__()
        self.ffns = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(n)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n))

    def forward(self, x):
        for ffn, norm in zip(self.ffns, self.norms):
            x = norm(x + ffn(x))
        return x


def test_an_output_gradient_held_outside_the_region_is_counted():
    torch.manual_seed(0)
    d, n = 16, 3
    model = _BranchesAsRegions(d, n)
    x = torch.randn(512, d, requires_grad=True)  # activations, not weights, make the peak

    names = [name for i in range(n) for name in (f"ffns.{i}", f"norms.{i}")]
    prof = remat.profile(model, x, loss_fn=mean_square, regions=names)
    for i in range(0, 2 * n, 2):  # each feed-forward recomputed alone, and all of them
        choices = ["store"] * (2 * n)
        choices[i] = "recompute"
        for plan_choices in (choices, ["recompute", "store"] * n):
            plan = remat.plan_from_choices(prof, plan_choices)
            m = copy.deepcopy(model)
            remat.apply_plan(m, plan)
            assert measure_step_peak(m, (x,), mean_square) <= plan.predicted_peak_bytes, (
                plan_choices
            )


class _TableLayer(nn.Module):
    """``fc(x * table + mask)``: the product saves ``table``, the sum does not save ``mask``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x, table, mask, unused=None):
        return x + self.fc(torch.tanh(x * table + mask))


class _SharedTables(nn.Module):
    """Tables and masks made before the layers, as transformers models make rotary tables
    and causal masks: one pair for the even layers, one for the odd ones, and a table only
    the last layer takes; a value no layer takes, which the forward holds and drops.
    ``unused``: also hand every layer ``unused(x)``, which none uses (zamba2)."""

    def __init__(self, d: int, n: int = 4, unused: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        self.layers = nn.ModuleList(_TableLayer(d) for _ in range(n))
        self.unused = unused

    def forward(self, x):
        tables = [torch.cos(x.detach() * k) for k in (1.0, 2.0)]
        masks = [torch.sin(x.detach() * k) for k in (1.0, 2.0)]
        last = torch.cos(x.detach() * 3.0)
        scratch = torch.cos(x.detach() * 4.0)  # held by the forward alone, then dropped
        unused = self.unused(x) if self.unused else None
        for i, layer in enumerate(self.layers):
            table = last if i == len(self.layers) - 1 else tables[i % 2]
            x = layer(x, table, masks[i % 2], unused)
        del scratch
        return x


def test_shared_inputs_live_in_the_backward_while_a_region_holds_them():
    torch.manual_seed(0)
    d, n = 16, 4
    model = _SharedTables(d, n)
    x = torch.randn(256, d, requires_grad=True)

    prof = remat.profile(model, x, loss_fn=mean_square, regions=[f"layers.{i}" for i in range(n)])
    # the value the forward drops (no taker), the even layers' table and mask, the odd
    # ones' mask, the table layer 1 alone takes and the last layer's (made before the
    # chain, so not theirs to keep)
    shared = sorted((t.takers, t.saved_by, t.nbytes) for t in prof.shared_inputs)
    nbytes = x.numel() * 4
    assert shared == [
        ((), (), nbytes),
        ((0, 2), (), nbytes),
        ((0, 2), (0, 2), nbytes),
        ((1,), (1,), nbytes),
        ((1, 3), (), nbytes),
        ((3,), (3,), nbytes),
    ]
    assert not any(t.held_outside for t in prof.shared_inputs)
    assert_predicted_to_the_byte(model, (x,), prof, every_plan(n))


def test_a_shared_input_no_region_uses_gets_no_gradient_in_the_prediction():
    """zamba2 hands its embeddings to every layer; layers that ignore them never give
    them a gradient, so no region's backward has one accumulating beside it."""
    torch.manual_seed(0)
    d, n = 16, 4
    x = torch.randn(256, d, requires_grad=True)
    model = _SharedTables(d, n, unused=lambda h: h * 2.0)  # requires grad, used by none
    prof = remat.profile(model, x, loss_fn=mean_square, regions=[f"layers.{i}" for i in range(n)])
    assert ((0, 1, 2, 3), ()) in [(t.takers, t.saved_by) for t in prof.shared_inputs]
    # only the parameter gradients of the layers after each (weight and bias of fc)
    params = sum(p.numel() * 4 for p in model.layers[0].parameters())
    assert [r.later_gradient_bytes for r in prof.regions] == [
        params * (n - 1 - i) + 8 for i in range(n)
    ]


class _ForwardScratch(nn.Module):
    """A feed-forward block whose forward alone makes a large temporary (a routing or
    a statistic under no_grad), as hy_v4's first layers do: its backward has none."""

    def __init__(self, d: int, scratch: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.scratch = scratch

    def forward(self, x):
        if self.scratch:
            with torch.no_grad():
                scale = 1.0 + x.repeat(1, self.scratch).tanh().mean() * 0.0
            x = x * scale
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_a_stored_region_s_backward_does_not_carry_its_forward_s_temporaries():
    torch.manual_seed(0)
    d, n = 64, 4
    model = nn.Sequential(*(_ForwardScratch(d, 256 if i < 2 else 0) for i in range(n)))
    x = torch.randn(8, d, requires_grad=True)  # the weights' gradients weigh most
    prof = remat.profile(model, x, loss_fn=mean_square, regions=[str(i) for i in range(n)])
    assert prof.regions[0].forward_transient_bytes > prof.regions[0].transient_bytes
    assert_predicted_to_the_byte(model, (x,), prof, every_plan(n))


class _CrossLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc, self.cross = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, memory=None):
        h = self.fc(x)
        if memory is not None:
            h = h + self.cross(memory).mean(dim=0, keepdim=True)
        return x + torch.tanh(h)


class _EncoderDecoder(nn.Module):
    """Encoder layers, a norm outside them, decoder layers that all take its output (the
    encoder's output, as T5's and Whisper's cross-attentions take it)."""

    def __init__(self, d: int, n: int = 2) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(_CrossLayer(d) for _ in range(n))
        self.norm = nn.LayerNorm(d)
        self.decoder = nn.ModuleList(_CrossLayer(d) for _ in range(n))

    def forward(self, x, y):
        for layer in self.encoder:
            x = layer(x)
        memory = self.norm(x)
        for layer in self.decoder:
            y = layer(y, memory)
        return y


def test_a_shared_input_s_gradient_lives_from_its_last_taker_to_its_maker():
    """The encoder's output gets its gradient from every decoder layer: it builds up from
    the last decoder layer's backward until the norm that made it runs backward, and is
    gone by the encoder layers' backward."""
    torch.manual_seed(0)
    d, n = 32, 2
    model = _EncoderDecoder(d, n)
    x, y = torch.randn(256, d), torch.randn(64, d)
    names = [f"encoder.{i}" for i in range(n)] + [f"decoder.{i}" for i in range(n)]
    prof = remat.profile(model, x, y, loss_fn=mean_square, regions=names)
    memory = 256 * d * 4
    assert [(t.takers, t.nbytes) for t in prof.shared_inputs] == [((2, 3), memory)]
    params = sum(p.numel() * 4 for p in model.decoder[0].parameters())
    # decoder.0 runs backward beside the memory's gradient the last decoder layer began
    assert prof.regions[2].later_gradient_bytes - prof.regions[3].later_gradient_bytes == (
        params + memory
    )
    assert_predicted_to_the_byte(model, (x, y), prof, every_plan(2 * n))


class _BiasBlock(nn.Module):
    """T5's block: the first makes a bias from a learned table and returns it beside its
    output; each later one takes it, adds it, and hands it back unchanged."""

    def __init__(self, d: int, first: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.table = nn.Parameter(torch.randn(1, d)) if first else None

    def forward(self, x, bias=None):
        if bias is None:
            bias = self.table.expand(x.shape[0], -1) * 1.0
        return x + torch.tanh(self.fc(x) + bias), bias


class _BiasChain(nn.Module):
    def __init__(self, d: int, n: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_BiasBlock(d, i == 0) for i in range(n))

    def forward(self, x):
        bias = None
        for block in self.blocks:
            x, bias = block(x, bias)
        return x


def test_an_output_later_regions_take_and_hand_back_is_counted_once():
    torch.manual_seed(0)
    d, n = 32, 4
    model = _BiasChain(d, n)
    x = torch.randn(256, d)
    prof = remat.profile(model, x, loss_fn=mean_square, regions=[f"blocks.{i}" for i in range(n)])
    bias = 256 * d * 4
    assert [(t.takers, t.made_by, t.nbytes) for t in prof.shared_inputs] == [((1, 2, 3), 0, bias)]
    # made by the first block; the others hand it back: not their output, nor its gradient
    assert [r.output_gradient_bytes for r in prof.regions] == [2 * bias] + [bias] * (n - 1)
    assert_predicted_to_the_byte(model, (x,), prof, every_plan(n))


class _AttentionReturningProbs(nn.Module):
    """A layer that returns its attention probabilities beside its output, as many
    transformers layers do; the model drops them, so they never get a gradient."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return x + self.out(probs @ v), probs


class _DropsProbs(nn.Module):
    def __init__(self, d: int, n: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_AttentionReturningProbs(d) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x, _ = layer(x)
        return x


def test_an_output_the_model_drops_gets_no_gradient_in_the_prediction():
    torch.manual_seed(0)
    d, n = 16, 3
    model = _DropsProbs(d, n)
    x = torch.randn(4, 64, d, requires_grad=True)  # the probabilities outweigh the output

    prof = remat.profile(model, x, loss_fn=mean_square, regions=[f"layers.{i}" for i in range(n)])
    out, probs = 4 * 64 * d * 4, 4 * 64 * 64 * 4
    assert [(r.output_bytes, r.output_gradient_bytes) for r in prof.regions] == [
        (out + probs, out)
    ] * n
    plans = (
        ["recompute"] * n,
        ["store", "recompute", "store"],
        ["store"] * (n - 1) + ["recompute"],
    )
    assert_predicted_to_the_byte(model, (x,), prof, plans)


def test_profile_marks_the_op_outputs_autograd_saves():
    """A projection's output feeds a residual add, which saves nothing: saving it keeps it
    in the selective-checkpoint cache only. Which outputs are saved must not depend on which
    freed storage addresses the allocator happens to reuse (run it twice)."""
    expected = {
        "aten.native_layer_norm.default#0": True,
        "aten.addmm.default#0": True,  # qkv, saved by sdpa
        "aten.addmm.default#1": False,  # attention projection -> residual add
        "aten.add.Tensor#0": True,  # first residual, saved by ln2
        "aten.addmm.default#2": True,  # fc, saved by gelu
        "aten.gelu.default#0": True,
        "aten.addmm.default#3": False,  # mlp projection -> residual add
        "aten.add.Tensor#1": False,  # the block's output: saved by the next block, not this one
    }
    for _ in range(2):
        workload = small_gpt()
        prof = remat.profile(workload.model, *workload.inputs, loss_fn=loss_of(workload))
        for region in prof.regions:
            saved = {o.name: o.output_saved for o in region.ops if o.name in expected}
            assert saved == expected, region.name


ACTIVATION_BOUND = dict(batch=8, n_layers=6, seq_len=64, d_model=64, n_heads=4, vocab_size=128)


def test_plan_predicts_within_budget_and_apply_plan_is_exact():
    reference = small_gpt(dropout=0.1, **ACTIVATION_BOUND)
    workload = small_gpt(dropout=0.1, **ACTIVATION_BOUND)
    prof = remat.profile(workload.model, *workload.inputs, loss_fn=loss_of(workload))
    plan = remat.plan(prof, "60%")
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    assert remat.apply_plan(workload.model, plan) is workload.model
    assert set(remat.applied(workload.model)) <= {r.name for r in plan.regions}
    assert_same_gradients(workload, reference)


def test_infeasible_budget_names_the_smallest_feasible():
    workload = small_gpt()
    prof = remat.profile(workload.model, *workload.inputs, loss_fn=loss_of(workload))
    with pytest.raises(remat.BudgetError) as info:
        remat.plan(prof, 1000)
    floor = info.value.min_feasible_bytes
    assert floor > 1000
    assert remat.plan(prof, floor).predicted_peak_bytes <= floor


def test_pareto_frontier_is_monotone():
    workload = small_gpt()
    prof = remat.profile(workload.model, *workload.inputs, loss_fn=loss_of(workload))
    front = remat.pareto(prof)
    peaks = [p.predicted_peak_bytes for p in front]
    costs = [p.extra_cost for p in front]
    assert peaks == sorted(peaks) and costs == sorted(costs, reverse=True)


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["75%", "50%", "25%"])
def test_autoplan_measured_peak_within_budget(budget):
    """GPT with activations dominating: every budget fits, measured, gradients unchanged."""
    reference = small_gpt(dropout=0.1, **ACTIVATION_BOUND)
    workload = small_gpt(dropout=0.1, **ACTIVATION_BOUND)
    result = remat.autoplan(
        workload.model, *workload.inputs, budget=budget, loss_fn=loss_of(workload)
    )
    measured = measure_step_peak(workload.model, workload.inputs, loss_of(workload))
    assert measured == result.measured_peak_bytes <= result.budget_bytes
    assert_same_gradients(workload, reference)


def test_profile_bad_input():
    workload = small_gpt()
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        remat.profile("gpt", *workload.inputs)
    with pytest.raises(remat.PlanError, match="no module named"):
        remat.profile(workload.model, *workload.inputs, regions=["blocks.9"])


class _Looped(nn.Module):
    """Runs its blocks twice over (a recurrent depth, as HRM and Dory do): each call of a
    block saves again, which the chain of regions cannot count."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))

    def forward(self, x):
        for _ in range(2):
            for block in self.blocks:
                x = block(x)
        return x


def test_a_region_called_twice_is_named_not_under_predicted():
    model, x = _Looped(), torch.randn(4, 8)
    with pytest.raises(remat.PlanError, match=r"region 'blocks\.0' runs 2 times .* \(3 such"):
        remat.profile(model, x)


def test_nested_segments_across_containers_are_exact():
    """Segments nest (Rotor) and may cross the model's own containers (block1.2 .. block2.1
    of the MLP): heads run their segment, followers of an outer segment hand back its output
    while the runner of a nested one still gets the real work done. Out-of-place ReLUs: an
    in-place one writes its input, so it can neither be recomputed nor start a segment."""
    from remat.solver import plan_from_choices

    workload, reference = (build_workload("mlp", batch=64, inplace=False) for _ in range(2))
    loss = loss_of(workload)
    regions = [n for n, _ in workload.model.named_modules() if n.count(".") == 1]
    prof = remat.profile(workload.model, *workload.inputs, loss_fn=loss, regions=regions)
    chain = prof.to_chain(op_options=False)
    choices = ["store"] * len(regions)
    choices[3] = choices[7] = "recompute"
    plan = plan_from_choices(chain, choices, [(0, 6), (0, 3), (3, 5), (7, 9)])
    remat.apply_plan(workload.model, plan)
    assert remat.applied(workload.model)["block1.3"] == "segment+segment+recompute"
    assert_same_gradients(workload, reference)


def test_named_presets_join_a_thinned_menu():
    from remat.profiling.profile_data import OpProfile, RegionProfile

    ops = (
        OpProfile(name="aten.addmm.default#0", output_bytes=400, cost=5.0),
        OpProfile(name="aten.gelu.default#0", output_bytes=400, cost=1.0),
        OpProfile(name="aten.addmm.default#1", output_bytes=100, cost=3.0),
        OpProfile(name="aten.add.Tensor#0", output_bytes=100, cost=0.5),
    )
    region = RegionProfile(
        name="b",
        type="Block",
        cost=9.5,
        flops=0,
        input_bytes=100,
        saved_bytes=1100,
        output_bytes=100,
        ops=ops,
    )
    prof = Profile(
        regions=(region,),
        cost_unit="seconds",
        device="cpu",
        step_peak_bytes=2000,
        outside_bytes=0,
        forward_cost=9.5,
    )
    menu = {o.name: o for o in prof.to_chain(max_options=1).regions[0].menu()}
    assert menu["save-matmuls"].save_ops == ("aten.addmm.default#0", "aten.addmm.default#1")
    assert menu["save-matmuls"].kept_bytes == 100 + 500
    assert menu["save-matmuls"].recompute_cost == 1.5


def mlp_workloads(batch, inplace=True):
    return tuple(build_workload("mlp", batch=batch, inplace=inplace) for _ in range(2))


@pytest.mark.parametrize("inplace", [True, False], ids=["ReLU(inplace)", "ReLU()"])
def test_profile_opens_sequentials_and_marks_unsaved_inputs(inplace):
    """The tutorial MLP has no block list: its Sequential blocks open into their layers. A
    ReLU's input (the Linear's output) is saved by nobody; its output is saved by the next
    Linear as that Linear's input, counted there, and needed once more in the ReLU's own
    backward, so it joins the ReLU's transient. An in-place ReLU's output is its input,
    rewritten: counted once, in the next Linear, not twice."""
    workload = build_workload("mlp", batch=64, inplace=inplace)
    prof = remat.profile(workload.model, *workload.inputs, loss_fn=loss_of(workload))
    by_name = {r.name: r for r in prof.regions}
    assert list(by_name) == [f"block{b}.{i}" for b, n in ((1, 4), (2, 4), (3, 3)) for i in range(n)]
    fc, relu, next_fc = by_name["block1.2"], by_name["block1.3"], by_name["block2.0"]
    width = 64 * 700 * 4
    assert (relu.input_saved, relu.saved_bytes, relu.input_bytes) == (False, 0, width)
    assert (fc.input_saved, next_fc.input_saved) == (True, True)
    assert next_fc.saved_bytes == next_fc.input_bytes == width
    assert relu.transient_bytes >= width + relu.forward_transient_bytes
    assert Profile.from_json(prof.to_json()) == prof


@pytest.mark.parametrize("inplace", [True, False], ids=["ReLU(inplace)", "ReLU()"])
def test_mlp_layer_plans_are_predicted_to_the_byte(inplace):
    """Every plan on the MLP's frontier (nested segments across its Sequentials, ReLUs
    stored or recomputed) measures exactly its predicted peak, gradients unchanged."""
    workload, reference = mlp_workloads(1024, inplace)
    loss = loss_of(workload)
    prof = remat.profile(workload.model, *workload.inputs, loss_fn=loss)
    front = remat.pareto(prof)
    assert len(front) >= 3 and any(p.segments for p in front)
    torch.manual_seed(0)
    reference.loss().backward()
    for p in front:
        remat.apply_plan(workload.model, p)
        assert measure_step_peak(workload.model, workload.inputs, loss) == p.predicted_peak_bytes
        torch.manual_seed(0)
        workload.loss().backward()
        for a, b in zip(workload.model.parameters(), reference.model.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
        workload.model.zero_grad(set_to_none=True)


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["75%", "50%", "25%"])
def test_autoplan_mlp_measured_peak_within_budget(budget):
    """The tutorial MLP with activations dominating (batch 4096): 75% fits, measured. Below
    about 60% no checkpointing can fit: a Linear(512, 700)'s backward alone needs its input,
    its output's gradient and its input's gradient while the parameter gradients pile up.
    The planner says so with the least peak it measured, and that figure is true."""
    workload, reference = mlp_workloads(4096)
    loss = loss_of(workload)
    try:
        result = remat.autoplan(workload.model, *workload.inputs, budget=budget, loss_fn=loss)
    except remat.BudgetError as err:
        assert budget != "75%", f"{budget} should be feasible: {err}"
        baseline = measure_step_peak(reference.model, reference.inputs, loss_of(reference))
        assert err.min_feasible_bytes > remat.parse_budget(budget, baseline_bytes=baseline)
        floor = remat.autoplan(
            workload.model, *workload.inputs, budget=err.min_feasible_bytes, loss_fn=loss
        )
        assert floor.measured_peak_bytes <= err.min_feasible_bytes
        assert floor.measured_peak_bytes < 0.65 * baseline
        return
    measured = measure_step_peak(workload.model, workload.inputs, loss)
    assert measured == result.measured_peak_bytes <= result.budget_bytes
    assert_same_gradients(workload, reference)


def test_gpt_plans_are_predicted_to_the_byte():
    """Block-level plans of a GPT (its head and loss modelled as the chain's tail, its
    embedding's gradients appearing after the chain's backward, the positions its embedding
    saved living beside the chain: ``outside_bytes``) measure their predicted step peak to
    the byte, the last block recomputed or not, segments included. Op-level plans are never
    under-predicted."""
    workload = small_gpt(n_layers=3, batch=4, seq_len=64, d_model=64, vocab_size=256)
    loss = loss_of(workload)
    prof = remat.profile(workload.model, *workload.inputs, loss_fn=loss)
    assert prof.tail_bytes > 0 and prof.outside_bytes == 64 * 8  # the positions, int64
    for op_level in (False, True):
        front = (
            remat.pareto(prof) if op_level else remat.solver.pareto(prof.to_chain(op_options=False))
        )
        assert len(front) >= 3
        for p in front:
            remat.apply_plan(workload.model, p)
            measured = measure_step_peak(workload.model, workload.inputs, loss)
            remat.remove(workload.model)
            # a chain's plans predict the chain's peak; the profile's, the step's
            predicted = (
                p.predicted_peak_bytes if op_level else prof.step_peak_for(p.predicted_peak_bytes)
            )
            assert measured <= predicted, p
            if not op_level:
                assert measured == predicted, p


class _CountOps(TorchDispatchMode):
    """Counts the region's ops (not the detaches the checkpoint adds to what it saves)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is not torch.ops.aten.detach.default
        return func(*args, **(kwargs or {}))


def test_recomputation_runs_the_ops_the_profile_counts():
    """A pre-norm block's backward needs nothing from its last Linear and the residual add:
    remat's checkpoint stops recomputing before them (early stop), and the profile's
    recompute_ops, the cost of the recompute option and the op menus say the same."""
    workload = small_gpt()
    prof = remat.profile(workload.model, *workload.inputs, loss_fn=loss_of(workload))
    for region in prof.regions:
        skipped = [o.name for o in region.ops[region.recompute_ops :]]
        assert skipped == ["aten.addmm.default#3", "aten.view.default#11", "aten.add.Tensor#1"]
        assert region.to_region().rerun_cost < region.cost
    for region in prof.to_chain().regions:
        for option in region.options:
            assert not set(option.save_ops) & {"aten.addmm.default#3", "aten.add.Tensor#1"}

    block = workload.model.get_submodule("blocks.1")
    x = torch.randn(B, T, C, requires_grad=True)
    counter = _CountOps()
    out = run_checkpoint(block, (x,), {}, context_fn=lambda: (contextlib.nullcontext(), counter))
    out.sum().backward()
    assert counter.count == prof.regions[1].recompute_ops


def test_op_level_options_pay_the_measured_overhead():
    workload = small_gpt()
    prof = remat.profile(workload.model, *workload.inputs, loss_fn=loss_of(workload))
    for profiled, region in zip(prof.regions, prof.to_chain().regions):
        assert profiled.op_overhead > 0  # dispatch modes and the replay cost Python time
        assert all(o.recompute_cost >= profiled.op_overhead for o in region.options)


class _NoisyBlock(nn.Module):
    """A block with an in-place op and two random ops among ops worth saving."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(C)
        self.fc = nn.Linear(C, 4 * C)
        self.proj = nn.Linear(4 * C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu_(self.fc(self.ln(x)))  # changes the fc output in place
        h, _ = torch.native_dropout(h, 0.5, True)
        h = torch.nn.functional.gelu(h)
        h, _ = torch.native_dropout(h, 0.5, True)
        return x + self.proj(h)


class _ChainOf(nn.Module):
    """Three blocks of one type in a ModuleList (the planner's default regions)."""

    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_random_and_mutated_outputs_are_never_cached():
    """Caching a random op would skip its draws in the recomputation and shift the random
    numbers of the ops after it; caching an output an in-place op changes would hand back
    the changed tensor. The profile marks both unsaveable, the menus leave them out, and an
    op-level treatment asked to save a random op recomputes it anyway."""
    torch.manual_seed(0)
    model = _ChainOf(_NoisyBlock)
    x = torch.randn(B * T, C, requires_grad=True)
    prof = remat.profile(model, x)
    # on blocks this small, the dispatch overhead would price every op-level option out
    prof = dataclasses.replace(
        prof, regions=tuple(dataclasses.replace(r, op_overhead=0.0) for r in prof.regions)
    )
    unsaveable = {o.name for o in prof.regions[0].ops if not o.saveable}
    assert {
        "aten.addmm.default#0",  # the fc output relu_ changes
        "aten.relu_.default#0",
        "aten.native_dropout.default#0",
        "aten.native_dropout.default#1",
    } <= unsaveable
    assert "aten.gelu.default#0" not in unsaveable
    menus = [o for r in prof.to_chain(max_options=None).regions for o in r.options]
    assert menus and not any(set(o.save_ops) & unsaveable for o in menus)

    def grads(treatment: remat.Ops | None) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        h = x
        for block in model.blocks:
            h = block(h) if treatment is None else treatment.run(block, (h,), {})
        h.sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    reference = grads(None)
    asked = remat.Ops(save_calls=frozenset({"aten.native_dropout.default#0", "aten.mm.default#0"}))
    for option in menus[:3]:
        treatment = remat.Ops(save_calls=frozenset(option.save_ops))
        for a, b in zip(grads(treatment), reference):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(grads(asked), reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_profile_leaves_the_model_as_it_was():
    """Profiling runs the model several times: BatchNorm statistics, gradients and the RNG
    state come back as they were, and gradients already there do not change the profile."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4)
    )
    x = torch.randn(32, 8)
    fresh = remat.profile(model, x)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    again = remat.profile(model, x)
    assert again.step_peak_bytes == fresh.step_peak_bytes
    assert [r.saved_bytes for r in again.regions] == [r.saved_bytes for r in fresh.regions]
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    for b, kept in zip(model.buffers(), buffers):
        assert torch.equal(b, kept)
    assert torch.equal(torch.get_rng_state(), rng)


def test_autoplan_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        *(nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU()) for _ in range(4)),
        nn.Linear(64, 1),
    )
    x = torch.randn(256, 64)
    buffers = [b.clone() for b in model.buffers()]
    result = remat.autoplan(model, x, budget="60%")
    assert result.measured_peak_bytes <= result.budget_bytes
    for b, kept in zip(model.buffers(), buffers):
        assert torch.equal(b, kept)


def test_op_level_plans_run_on_the_tape_where_every_op_is_recomputable():
    """The tape engine keeps the outputs of random ops and of ops that write to a tensor
    (batch norm's statistics), which the op menus count as recomputed: regions with such
    ops plan on the replay engine, the others on the tape."""
    from remat.planner.applying import plan_assignments

    def engines(workload, **options):
        prof = remat.profile(workload.model, *workload.inputs, **options)
        # Without the overhead, op-level options reach the frontier of these tiny models.
        regions = tuple(dataclasses.replace(r, op_overhead=0.0) for r in prof.regions)
        prof = Profile.from_json(dataclasses.replace(prof, regions=regions).to_json())
        found = {o.engine for r in prof.to_chain().regions for o in r.options}
        plans = remat.pareto(prof)
        assert any(r.action == "ops" for p in plans for r in p.regions)
        for plan in plans:
            assert remat.Plan.from_json(plan.to_json()) == plan
            planned = {r.name: r.engine for r in plan.regions if r.action == "ops"}
            assert set(planned.values()) <= found
            applied = {
                name: t.engine
                for name, _, t in plan_assignments(workload.model, plan)
                if isinstance(t, remat.Ops)
            }
            assert applied == planned
        return found

    assert engines(small_gpt(), loss_fn=loss_of(small_gpt())) == {"tape"}
    assert engines(small_gpt(dropout=0.1)) == {"replay"}
    assert engines(small_gpt(), op_engines="replay") == {"replay"}
    convnet = build_workload("convnet", batch=2, channels=8, n_blocks=3)
    assert engines(convnet) == {"replay"}  # batch norm writes its running statistics
    # The functional form has no counter update: only batch norm itself writes, unannounced.
    chain = _ChainOf(_FunctionalNormBlock)
    x = torch.randn(64, 4 * C)
    assert engines(type("W", (), {"model": chain, "inputs": (x,)})) == {"replay"}


class _FunctionalNormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4 * C, 4 * C)
        self.register_buffer("mean", torch.zeros(4 * C))
        self.register_buffer("var", torch.ones(4 * C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.batch_norm(self.fc(x), self.mean, self.var, training=True)
        return x + torch.tanh(h)


def test_plan_for_fewer_blocks_or_a_bad_plan_leaves_the_model_as_it_was():
    """A plan made from a 4-block profile does not fit a 6-block model of the same kind,
    and a plan that does not fit never strips the model's current policy first."""
    four, six = small_gpt(n_layers=4), small_gpt(n_layers=6)
    plan = remat.plan(remat.profile(four.model, *four.inputs, repeats=1), "90%")
    remat.apply(six.model, remat.every(2))
    before = remat.applied(six.model)
    with pytest.raises(remat.PlanError, match=r"made for 4 regions .* not in the plan: blocks\.4"):
        remat.apply_plan(six.model, plan)
    assert remat.applied(six.model) == before
    with pytest.raises(TypeError, match="must be a remat.Plan .*Plan.from_dict"):
        remat.apply_plan(six.model, plan.to_dict())
    assert remat.applied(six.model) == before


def test_nested_segment_plan_on_a_conv_bn_chain_changes_every_buffer_once():
    """Buffers of every block of every (nested) segment change once, as without remat."""
    from remat.solver import plan_from_choices

    torch.manual_seed(0)
    blocks = [
        nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh()) for _ in range(9)
    ]
    reference = nn.Sequential(*blocks)
    model = copy.deepcopy(reference)
    x = torch.randn(2, 3, 6, 6)
    prof = remat.profile(model, x, repeats=1, regions=[str(i) for i in range(9)])
    choices = ["store"] * 9
    choices[5] = "recompute"
    plan = plan_from_choices(prof.to_chain(op_options=False), choices, [(0, 9), (0, 4), (4, 8)])
    remat.apply_plan(model, plan)
    for m in (reference, model):
        torch.manual_seed(0)
        m(x.clone().requires_grad_(True)).pow(2).sum().backward()
    for got, want in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)


class _BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: in-place ReLUs, ``out += identity``."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class _ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        self.layer1 = nn.Sequential(*[_BasicBlock(16) for _ in range(4)])
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.layer1(self.stem(x)).mean((2, 3)))


class _WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x):
        x.mul_(0.5)
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class _Writers(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(64, 64)
        self.blocks = nn.ModuleList(_WritesItsInput() for _ in range(4))

    def forward(self, x):
        x = self.pre(x)
        for block in self.blocks:
            x = block(x)
        return x


IN_PLACE = {
    # The Sequential is opened: each in-place ReLU is a region that writes its input.
    "flat-mlp": (
        lambda: nn.Sequential(
            nn.Linear(256, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 10),
        ),
        (4096, 256),
        "70%",
    ),
    "resnet": (_ResNet, (8, 3, 16, 16), "60%"),
    "writes-its-input": (_Writers, (1024, 64), "85%"),
}


@pytest.mark.parametrize("name", sorted(IN_PLACE))
def test_autoplan_on_models_with_in_place_ops_runs_and_is_exact(name):
    """A region that writes its input in place is never recomputed from that input (nor
    starts a segment): plans store it or run it op-level on the tape, and say why."""
    build, shape, budget = IN_PLACE[name]
    torch.manual_seed(0)
    model = build()
    reference = copy.deepcopy(model)
    x = torch.randn(shape)
    result = remat.autoplan(model, x, budget=budget)
    assert result.measured_peak_bytes <= result.budget_bytes
    writers = {r.name for r in result.profile.regions if r.store_only}
    if name != "resnet":  # the ResNet's regions are its blocks, which write no input
        assert writers and "writes its input in place" in str(result.plan)
    for region in result.plan.regions:
        if region.name in writers:
            assert region.action != "recompute" and region.note
    for m in (reference, model):
        torch.manual_seed(0)
        m.zero_grad(set_to_none=True)
        m(x).pow(2).sum().backward()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)
    for got, want in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_profile_and_autoplan_refuse_a_model_in_eval_mode():
    workload = small_gpt(dropout=0.1)
    workload.model.eval()
    with pytest.raises(remat.PlanError, match="eval mode.*model.train()"):
        remat.profile(workload.model, *workload.inputs)
    with pytest.raises(remat.PlanError, match="eval mode"):
        remat.autoplan(workload.model, *workload.inputs, budget="50%")


class _Gapped(nn.Module):
    """Block 2's input is made between blocks 1 and 2, not handed on by block 1."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16)) for _ in range(4)
        )

    def forward(self, x):
        x = self.blocks[1](self.blocks[0](x)) * 0.5
        return self.blocks[3](self.blocks[2](x))


def test_no_planned_segment_spans_code_between_blocks_and_every_plan_is_exact():
    """remat's segments carry on only through their own calls' outputs, so a segment over
    blocks 1-2 would run as two regions and keep more than planned: the profile marks block 2
    and every frontier plan measures its prediction to the byte."""
    torch.manual_seed(0)
    model, x = _Gapped(), torch.randn(256, 16)
    loss = lambda out: out.square().mean()  # noqa: E731
    prof = remat.profile(model, x, loss_fn=loss)
    assert [bool(r.segment_break) for r in prof.regions] == [False, False, True, False]
    assert "'blocks.1'" in prof.regions[2].segment_break
    front = remat.pareto(prof)
    assert any(p.segments for p in front)
    for p in front:
        assert not any(a < 2 < b for a, b in p.segments)
        remat.apply_plan(model, p)
        assert measure_step_peak(model, (x,), loss) == p.predicted_peak_bytes


class _Composite(nn.Module):
    """A vision stack and a text stack; text input runs the text stack only."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.vision = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(3)
        )

    def forward(self, x, image=None):
        if image is not None:
            for block in self.vision:
                image = block(image)
            x = x + image
        for block in self.layers:
            x = x + block(x)
        return x


def test_default_regions_the_forward_does_not_run_are_left_out():
    torch.manual_seed(0)
    d = 16
    model = _Composite(d)
    x = torch.randn(64, d, requires_grad=True)

    prof = remat.profile(model, x, loss_fn=mean_square)
    assert [r.name for r in prof.regions] == ["layers.0", "layers.1", "layers.2"]
    assert prof.meta["regions_not_run"] == ["vision.0", "vision.1"]
    plan = remat.plan_from_choices(prof, ["recompute", "store", "recompute"])
    m = copy.deepcopy(model)
    remat.apply_plan(m, plan)  # the vision blocks are not missing from the plan
    # to the byte: the vision blocks' parameters get no gradient, and none is counted
    assert measure_step_peak(m, (x,), mean_square) == plan.predicted_peak_bytes
    with pytest.raises(remat.PlanError, match="'vision.0' did not run"):
        remat.profile(model, x, loss_fn=mean_square, regions=["vision.0", "layers.0"])
