"""The op-tape engine of op-level checkpointing (``remat.ops(..., engine="tape")``).

Oracles: gradients equal the un-checkpointed module's bit for bit; bytes kept are counted
exactly by the tracker; the ops backward runs are counted by a dispatch mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import remat
from conftest import tiny_gpt
from remat.bench.workloads import Block

EXACT = {"rtol": 0.0, "atol": 0.0}
SAVE_SETS = {
    "nothing": {},
    "save-matmuls": {"preset": "save-matmuls"},
    "save-attention": {"preset": "save-attention"},
    "norms-and-gelu": {"save": ["native_layer_norm", "gelu"]},
}

CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), (4, 6)),
    "layernorm-gelu": (
        lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2)),
        (4, 6),
    ),
    "conv-batchnorm": (  # BatchNorm writes its running statistics: kept
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        (2, 3, 6, 6),
    ),
    "relu-inplace": (  # relu_ writes to the Linear's output: kept
        lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)),
        (4, 6),
    ),
    "dropout": (  # random: kept, so the replayed stream is not needed
        lambda: nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.GELU(), nn.Linear(8, 3)),
        (4, 6),
    ),
    "lstm": (lambda: nn.LSTM(6, 5, batch_first=True), (2, 4, 6)),
}


def _step(module, x, treatment=None, seed=1):
    torch.manual_seed(seed)
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = module(x) if treatment is None else treatment.run(module, (x,), {})
    out = out[0] if isinstance(out, tuple) else out
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    return {
        "out": out.detach(),
        "x_grad": x.grad,
        "grads": [p.grad for p in module.parameters()],
        "buffers": [b.clone() for b in module.buffers()],
    }


@pytest.mark.parametrize("save", sorted(SAVE_SETS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_equal_uncheckpointed(case, save):
    build, shape = CASES[case]
    torch.manual_seed(0)
    module = build().train()
    x = torch.randn(shape)
    want = _step(copy.deepcopy(module), x)
    got = _step(copy.deepcopy(module), x, remat.ops(**SAVE_SETS[save], engine="tape"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], **EXACT)


def _gpt(dropout=0.0, layers=2):
    return tiny_gpt(n_layers=layers, dropout=dropout)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("save", sorted(SAVE_SETS))
def test_gpt_gradients_equal_uncheckpointed(save, dropout):
    reference, tape = _gpt(dropout), _gpt(dropout)
    remat.apply(tape.model, remat.by_type(Block) & remat.ops(**SAVE_SETS[save], engine="tape"))
    results = []
    for w in (reference, tape):
        torch.manual_seed(3)
        w.model.zero_grad(set_to_none=True)
        w.loss().backward()
        results.append([p.grad for p in w.model.parameters()])
    torch.testing.assert_close(results[1], results[0], **EXACT)


class _Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _block_calls(treatment):
    torch.manual_seed(0)
    block = _gpt().model.blocks[0]
    x = torch.randn(2, 16, 32, requires_grad=True)
    forward, backward = _Calls(), _Calls()
    with forward:
        y = treatment.run(block, (x,), {})
    with backward:
        y.sum().backward()
    return forward.calls, backward.calls


def test_backward_recomputes_only_unsaved_ops_and_each_once():
    forward, backward = _block_calls(remat.ops(engine="tape"))
    # Saving nothing: the norms, gelu and attention are each recomputed once (the qkv
    # matmul that q, k and v are views of, too); backward's own ops are other overloads
    # (mm, *_backward). The MLP's output projection is never recomputed: nothing saves it.
    assert backward["native_layer_norm"] == forward["native_layer_norm"] == 2
    assert backward["gelu"] == forward["gelu"] == 1
    assert backward["_scaled_dot_product_flash_attention_for_cpu"] == 1
    assert backward["addmm"] == 3 < forward["addmm"] == 4

    _, saved = _block_calls(remat.ops("save-matmuls", engine="tape"))
    assert "addmm" not in saved and "_scaled_dot_product_flash_attention_for_cpu" not in saved
    assert saved["native_layer_norm"] == 2 and saved["gelu"] == 1


def test_keeps_less_than_the_replay_for_save_matmuls():
    """The tape keeps a saved op's output only while something needs it: the MLP's output
    projection, which only the residual add reads, is not kept; the replay keeps it."""
    B, T, C, layers = 2, 16, 32, 2

    def live_after_forward(engine):
        w = _gpt(layers=layers)
        remat.apply(w.model, remat.by_type(Block) & remat.ops("save-matmuls", engine=engine))
        with remat.MemoryTracker(count_existing=[w.model, *w.inputs]) as tracker:
            loss = w.loss()
        loss.backward()
        return tracker.current_bytes

    assert live_after_forward("replay") - live_after_forward("tape") == layers * B * T * C * 4


def test_double_backward_autograd_grad_and_retain_graph():
    torch.manual_seed(0)
    lin = nn.Linear(5, 5)
    x = torch.randn(3, 5, requires_grad=True)

    def f(x):
        return torch.tanh(lin(x)).sin()

    treatment = remat.ops(engine="tape")
    results = []
    for run in (f, lambda x: treatment.run(f, (x,), {})):
        y = run(x)
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
        z = run(x)
        first = torch.autograd.grad(z.sum(), lin.weight, retain_graph=True)[0]
        second = torch.autograd.grad(z.sum(), lin.weight)[0]
        results.append((g.detach(), gg, first, second))
    torch.testing.assert_close(results[1], results[0], **EXACT)


def test_nested_checkpoint_and_autocast():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    outer = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
    x = torch.randn(4, 8, requires_grad=True)

    def f(x):
        return outer(remat.checkpoint(inner, x)).relu()

    treatment = remat.ops(engine="tape")
    results = []
    for run in (f, lambda x: treatment.run(f, (x,), {})):
        for p in (*inner.parameters(), *outer.parameters()):
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = run(x)
        (g,) = torch.autograd.grad(y.float().sum(), x, retain_graph=True)
        y.float().sum().backward()
        results.append((y, g, [p.grad for p in (*inner.parameters(), *outer.parameters())]))
    assert results[1][0].dtype == torch.bfloat16
    torch.testing.assert_close(results[1], results[0], **EXACT)


def test_tensor_changed_in_place_after_forward_is_an_error():
    x = torch.randn(4, 3, requires_grad=True)
    h = x * 1.0  # a non-leaf we may modify in place
    y = remat.ops(engine="tape").run(lambda t: (t * 2).sin(), (h,), {})
    with torch.no_grad():
        h.add_(1.0)  # sin's input is recomputed from h: no longer the forward's h
    with pytest.raises(remat.CheckpointError, match="modified by an in-place operation"):
        y.sum().backward()


def test_in_place_write_through_a_list_argument():
    """_foreach_mul_ writes to the tensors of its list argument: the written tensor is
    kept, not recomputed from the recipe of its value before the write."""
    x = torch.randn(5, requires_grad=True)

    def f(x):
        a = x.sin()
        torch._foreach_mul_([a], 2.0)
        return a.cos()

    want = torch.autograd.grad(f(x).sum(), x)[0]
    got = torch.autograd.grad(remat.ops(engine="tape").run(f, (x,), {}).sum(), x)[0]
    torch.testing.assert_close(got, want, **EXACT)


def test_bad_engine_names_the_argument():
    with pytest.raises(ValueError, match="engine='bogus'"):
        remat.ops("save-matmuls", engine="bogus")
    with pytest.raises(ValueError, match="op_engines='tape'"):
        w = _gpt(layers=1)
        remat.profile(w.model, *w.inputs, op_engines="tape")


def test_no_tensor_survives_the_step():
    """Recipes hold detached aliases: nothing forms a cycle through an autograd node."""
    import gc

    def live_tensors():
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    torch.manual_seed(0)
    block = _gpt().model.blocks[0]
    treatment = remat.ops("save-attention", engine="tape")
    counts = []
    for _ in range(3):
        x = torch.randn(2, 16, 32, requires_grad=True)
        y = treatment.run(block, (treatment.run(block, (x,), {}),), {})
        y.sum().backward()
        block.zero_grad(set_to_none=True)
        del x, y
        counts.append(live_tensors())
    assert counts[0] == counts[1] == counts[2]


def test_sparse_and_meta_tensors():
    """Sparse tensors are never dropped (no address); meta tensors are told apart by
    storage (they all have address 0), so on meta the tape keeps what it keeps on CPU."""
    torch.manual_seed(0)
    index = torch.tensor([[0, 1, 2], [2, 0, 1]])
    sparse = torch.sparse_coo_tensor(index, torch.ones(3), (3, 3))
    w = torch.randn(3, 4, requires_grad=True)
    out = remat.ops(engine="tape").run(lambda w: torch.sparse.mm(sparse, w).tanh(), (w,), {})
    out.sum().backward()
    expected = torch.autograd.grad(torch.sparse.mm(sparse, w).tanh().sum(), w)[0]
    torch.testing.assert_close(w.grad, expected, **EXACT)

    def kept_bytes(device):
        w, w2 = (torch.randn(4, 4, device=device, requires_grad=True) for _ in range(2))
        x, z = torch.randn(4, 4, device=device), torch.randn(4, 4, device=device)

        def f(x, z):
            a = x @ w  # kept, and saved by the next matmul
            n = z.neg()  # dropped, with a's shape: at address 0 on meta too
            return (a @ w2) + n

        with remat.MemoryTracker(count_existing=[w, w2, x, z]) as tracker:
            out = remat.ops(save=["mm"], engine="tape").run(f, (x, z), {})
            kept = tracker.current_bytes
        del out
        return kept

    assert kept_bytes("meta") == kept_bytes("cpu")


class _FilledThroughViews(nn.Module):
    """Tensors made by a factory op and then written through views, as transformers
    models do: DeepSeek-V3's MLA fills halves of a new tensor, recurrent and linear
    attention write one time step at a time into a preallocated output."""

    def __init__(self, pattern, d=8):
        super().__init__()
        self.pattern = pattern
        self.a, self.b = nn.Linear(d, d // 2), nn.Linear(d, d // 2)
        self.out = nn.Linear(d, d)

    def forward(self, x):  # (B, T, d)
        if self.pattern == "new_empty-halves":
            y = x.new_empty(x.shape)
            y[..., :4].copy_(self.a(x))
            y[..., 4:].copy_(self.b(x))
        elif self.pattern == "zeros-time-steps":
            y = torch.zeros_like(x)
            h = torch.zeros_like(x[:, 0])
            for t in range(x.shape[1]):
                h = torch.tanh(self.out(h) + x[:, t])
                y[:, t] = h
        else:  # "empty_like-view-then-write": a view taken before the write is read after
            y = torch.empty_like(x)
            flat = y.view(-1, x.shape[-1])
            y.copy_(torch.cat([self.a(x), self.b(x)], dim=-1))
            return x + self.out(flat).view(x.shape)
        return x + self.out(y)


@pytest.mark.parametrize("save", sorted(SAVE_SETS))
@pytest.mark.parametrize(
    "pattern", ["new_empty-halves", "zeros-time-steps", "empty_like-view-then-write"]
)
def test_tensor_filled_through_views_is_kept_not_recomputed(pattern, save):
    torch.manual_seed(0)
    net = nn.Sequential(_FilledThroughViews(pattern), _FilledThroughViews(pattern))
    x = torch.randn(2, 5, 8)
    want = _step(copy.deepcopy(net), x)
    got = _step(copy.deepcopy(net), x, remat.ops(**SAVE_SETS[save], engine="tape"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], **EXACT)


def test_kept_tensor_changed_in_place_after_forward_is_an_error():
    """A saved-tensor hook switches autograd's version check off: the tape checks what it
    keeps as it is, as autograd would (an optimizer step before backward)."""
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    y = remat.ops(engine="tape").run(lambda t: t * w, (x,), {})
    with torch.no_grad():
        w.mul_(2.0)  # mul saved w, a leaf kept as it is
    with pytest.raises(remat.CheckpointError, match="modified by an in-place operation"):
        y.sum().backward()


def test_held_tensor_written_during_the_forward_is_copied_first():
    """A recipe holds the region's input; the region then writes the input in place (as
    linear-attention layers write their cache state): the recipe reads the input as it was
    when it took it, not the written values."""

    def f(t):
        y = t * 3.0  # dropped: its recipe holds t; mul by a number saves nothing
        t.mul_(2.0)
        return y.cos() + t  # cos saves y, recomputed from the recipe

    x = torch.randn(5, requires_grad=True)
    want = torch.autograd.grad(f(x * 1.0).sum(), x)[0]
    got = torch.autograd.grad(remat.ops(engine="tape").run(f, (x * 1.0,), {}).sum(), x)[0]
    torch.testing.assert_close(got, want, **EXACT)
