"""The engine against the un-checkpointed computation: outputs, gradients, buffers, RNG.

On CPU the recomputation runs the same kernels in the same order as the forward, so these
tests assert bitwise equality (``rtol=0, atol=0``) unless a case says otherwise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import remat

ENGINES = ["hooks", "function"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
EXACT = {"rtol": 0.0, "atol": 0.0}


def _mha_call(m, x):
    return m(x, x, x, need_weights=False)  # (out, None): a pytree with a non-tensor leaf


CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), (4, 6), None),
    "conv2d": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3)),
        (2, 3, 8, 8),
        None,
    ),
    "layernorm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU()), (4, 6), None),
    "batchnorm": (
        lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU()),
        (4, 6),
        None,
    ),
    "dropout": (
        lambda: nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3)),
        (4, 6),
        None,
    ),
    "mha": (
        lambda: nn.MultiheadAttention(8, 2, dropout=0.2, batch_first=True),
        (2, 5, 8),
        _mha_call,
    ),
    "lstm": (lambda: nn.LSTM(6, 5, batch_first=True), (2, 4, 6), None),
}


def _run(module, call, x, *, engine=None, seed=1):
    """One training step; returns outputs, grads, buffers and the RNG state after it."""
    torch.manual_seed(seed)
    if engine is None:
        out = call(module, x) if call else module(x)
    elif call:
        out = remat.checkpoint(call, module, x, engine=engine)
    else:
        out = remat.checkpoint(module, x, engine=engine)
    tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    # A fixed random projection, so every output element's gradient differs.
    gen = torch.Generator().manual_seed(7)
    loss = sum((t.float() * torch.randn(t.shape, generator=gen)).sum() for t in tensors)
    loss.backward()
    return {
        "out": [t.detach().clone() for t in tensors],
        "grads": [None if p.grad is None else p.grad.clone() for p in module.parameters()],
        "x_grad": None if x.grad is None else x.grad.clone(),
        "buffers": [b.clone() for b in module.buffers()],
        "rng_after": torch.get_rng_state(),
    }


def _assert_same(got, want, tol):
    torch.testing.assert_close(got["out"], want["out"], **tol)
    assert [g is None for g in got["grads"]] == [g is None for g in want["grads"]]
    torch.testing.assert_close(
        [g for g in got["grads"] if g is not None],
        [g for g in want["grads"] if g is not None],
        **tol,
    )
    torch.testing.assert_close(got["x_grad"], want["x_grad"], **tol)
    torch.testing.assert_close(got["buffers"], want["buffers"], **EXACT)
    assert torch.equal(got["rng_after"], want["rng_after"]), "global RNG stream changed"


@pytest.mark.parametrize("requires_grad", [True, False], ids=["x_grad", "x_frozen"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("engine", ENGINES)
def test_matches_uncheckpointed(engine, case, dtype, requires_grad):
    build, shape, call = CASES[case]
    torch.manual_seed(0)
    original = build().to(dtype).train()
    x = torch.randn(shape, dtype=dtype)
    ref_module, ckpt_module = copy.deepcopy(original), copy.deepcopy(original)
    want = _run(ref_module, call, x.clone().requires_grad_(requires_grad))
    got = _run(ckpt_module, call, x.clone().requires_grad_(requires_grad), engine=engine)
    _assert_same(got, want, EXACT)
    assert all(g is not None for g in got["grads"]), "a parameter got no gradient"


@pytest.mark.parametrize("engine", ENGINES)
def test_batchnorm_statistics_updated_once(engine):
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    x = torch.randn(8, 4, requires_grad=True)
    remat.checkpoint(bn, x, engine=engine).sum().backward()
    assert bn.num_batches_tracked.item() == 1
    ref = nn.BatchNorm1d(4)
    ref(x)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, **EXACT)
    torch.testing.assert_close(bn.running_var, ref.running_var, **EXACT)
    # PyTorch's own checkpoint updates them a second time during recomputation.
    torch_bn = nn.BatchNorm1d(4)
    torch.utils.checkpoint.checkpoint(torch_bn, x, use_reentrant=False).sum().backward()
    assert torch_bn.num_batches_tracked.item() == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_recompute_sees_pre_forward_buffers(engine):
    class Counter(nn.Module):
        """Reads a buffer after updating it: recomputation must see the forward's value."""

        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x):
            self.count += 1
            return x * self.count

    m = Counter()
    x = torch.ones(3, requires_grad=True)
    remat.checkpoint(m, x, engine=engine, determinism_check="values").sum().backward()
    assert m.count.item() == 1
    torch.testing.assert_close(x.grad, torch.ones(3))


@pytest.mark.parametrize("engine", ENGINES)
def test_tutorial_function_trains_weights_with_frozen_input(engine):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    ref = copy.deepcopy(block)
    x = torch.randn(4, 5)  # a data batch: does not require grad
    if engine == "function":
        out = remat.CheckpointFunction.apply(block, x)
    else:
        out = remat.checkpoint(block, x)
    out.sum().backward()
    ref(x).sum().backward()
    for p, q in zip(block.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **EXACT)


@pytest.mark.parametrize("engine", ENGINES)
def test_kwargs_and_containers_receive_gradients(engine):
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)

    def fn(x, pair, *, scale, extra):
        a, b = pair
        return {"y": lin(x) * scale + a * b["w"], "tag": "not a tensor", "n": 3}, extra

    def make():
        return [torch.randn(2, 3, requires_grad=True) for _ in range(4)]

    x, a, w, s = make()
    ref_out, _ = fn(x, [a, {"w": w}], scale=s, extra=None)
    ref_out["y"].sum().backward()
    want = [t.grad.clone() for t in (x, a, w, s)]
    for t in (x, a, w, s):
        t.grad = None
    out, extra = remat.checkpoint(fn, x, [a, {"w": w}], scale=s, extra=None, engine=engine)
    assert out["tag"] == "not a tensor" and out["n"] == 3 and extra is None
    out["y"].sum().backward()
    torch.testing.assert_close([t.grad for t in (x, a, w, s)], want, **EXACT)


@pytest.mark.parametrize("engine", ENGINES)
def test_autograd_grad_and_backward_inputs(engine):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(3, 4, requires_grad=True)
    params = list(block.parameters())
    want = torch.autograd.grad(block(x).sum(), [x, *params])
    got = torch.autograd.grad(remat.checkpoint(block, x, engine=engine).sum(), [x, *params])
    torch.testing.assert_close(got, want, **EXACT)
    # backward(inputs=...) fills only the requested gradients
    remat.checkpoint(block, x, engine=engine).sum().backward(inputs=[params[0]])
    torch.testing.assert_close(params[0].grad, want[1], **EXACT)
    assert x.grad is None and params[1].grad is None


@pytest.mark.parametrize("engine", ENGINES)
def test_double_backward(engine):
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)

    def fn(x):
        return torch.tanh(lin(x)) ** 2

    x = torch.randn(2, 3, requires_grad=True)
    (g_ref,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.sum(), x)
    (g,) = torch.autograd.grad(remat.checkpoint(fn, x, engine=engine).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(g, g_ref, **EXACT)
    torch.testing.assert_close(gg, gg_ref, **EXACT)


@pytest.mark.parametrize("engine", ENGINES)
def test_retain_graph_two_backwards(engine):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), nn.Sigmoid())
    x = torch.randn(2, 4, requires_grad=True)
    torch.manual_seed(3)
    ref = block(x).sum()
    (want,) = torch.autograd.grad(ref, x)
    torch.manual_seed(3)
    out = remat.checkpoint(block, x, engine=engine).sum()
    (first,) = torch.autograd.grad(out, x, retain_graph=True)
    (second,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(first, want, **EXACT)
    torch.testing.assert_close(second, want, **EXACT)


@pytest.mark.parametrize("outer", ENGINES)
@pytest.mark.parametrize("inner", ENGINES)
def test_nesting_three_deep(outer, inner):
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2)) for _ in range(3))

    def level(i, x):
        if i == len(layers):
            return x
        h = layers[i](x)
        engine = outer if i == 0 else inner
        return remat.checkpoint(level, i + 1, h.tanh(), engine=engine)

    x = torch.randn(2, 4, requires_grad=True)
    torch.manual_seed(5)
    want_out = x
    for layer in layers:
        want_out = layer(want_out).tanh()
    want = torch.autograd.grad(want_out.sum(), [x, *layers.parameters()])
    torch.manual_seed(5)
    out = remat.checkpoint(level, 0, x, engine=outer)
    got = torch.autograd.grad(out.sum(), [x, *layers.parameters()])
    torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("early_stop,expected_runs", [(True, 1), (False, 2)])
def test_early_stop_skips_the_rest_of_the_region(early_stop, expected_runs):
    lin = nn.Linear(3, 3)
    runs = []

    def fn(x):
        y = torch.relu(lin(x))  # the last op that saves something
        runs.append(1)  # reached again only when recomputation runs to the end
        return y + 1

    x = torch.randn(2, 3, requires_grad=True)
    remat.checkpoint(fn, x, early_stop=early_stop).sum().backward()
    assert len(runs) == expected_runs


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_calls_fn_once(engine, mode):
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        out = remat.checkpoint(fn, torch.ones(2, requires_grad=True), engine=engine)
    assert len(calls) == 1 and out.grad_fn is None


@pytest.mark.parametrize("engine", ENGINES)
def test_cpu_autocast_replayed(engine):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = block(x)
    (want,) = torch.autograd.grad(ref.float().sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = remat.checkpoint(block, x, engine=engine)
    assert out.dtype == torch.bfloat16
    (got,) = torch.autograd.grad(out.float().sum(), x)  # backward outside autocast
    torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("engine", ENGINES)
def test_default_device_context_replayed(engine):
    def fn(x):
        return x * torch.ones(x.shape[-1])  # created on the default device

    with torch.device("meta"):
        w = torch.empty(3, requires_grad=True)
        out = remat.checkpoint(fn, w, engine=engine)
    assert out.is_meta
    (g,) = torch.autograd.grad(out.sum(), w)  # recomputation must create ones on meta
    assert g.is_meta and g.shape == (3,)


def test_pytorch_checkpoint_keeps_same_bytes_as_hooks_engine():
    """What autograd keeps after forward, seen by an outer saved_tensors_hooks."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.GELU())
    x = torch.randn(32, 64, requires_grad=True)

    def kept_bytes(run):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
        out.sum().backward()
        return sum(storages.values())

    plain = kept_bytes(lambda: block(x))
    ours = kept_bytes(lambda: remat.checkpoint(block, x))
    theirs = kept_bytes(lambda: torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False))
    function = kept_bytes(lambda: remat.checkpoint(block, x, engine="function"))
    x_bytes = 32 * 64 * 4
    assert ours == theirs == x_bytes  # the region keeps its input, nothing else
    params = sum(p.numel() * 4 for p in block.parameters())
    assert function == x_bytes + params  # inputs and parameters: no new bytes
    weights = (64 * 128 + 128 * 64) * 4  # addmm saves both weights (biases: no)
    # un-checkpointed: x, the weights, relu's output (32x128) and gelu's input (32x64)
    assert plain == x_bytes + weights + (32 * 128 + 32 * 64) * 4


@pytest.mark.parametrize("engine", ENGINES)
def test_no_tensor_survives_the_step(engine):
    """Regression: a saved output packed with its history formed an uncollectable cycle."""
    import gc

    def live_tensors():
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    def attention(x):  # sdpa saves its outputs (out, logsumexp) for backward
        return nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)

    counts = []
    for _ in range(3):
        x = torch.randn(2, 4, 8, requires_grad=True)
        h = x * 2
        for _ in range(2):
            h = remat.checkpoint(attention, h, engine=engine)
        h.sum().backward()
        del h, x
        counts.append(live_tensors())
    assert counts[0] == counts[1] == counts[2]


# ---- what recomputation reads must be what the forward read (issue #12) -----------------


@pytest.mark.parametrize("engine", ENGINES)
def test_parameter_stepped_before_backward_is_an_error(engine):
    """A GAN's ``optD.step()`` between ``D(G(z))`` and ``backward``: plain PyTorch raises
    (a weight saved for backward was modified); a recomputation would silently use the
    stepped weights."""
    torch.manual_seed(0)
    disc = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    z = torch.randn(5, 4, requires_grad=True)
    plain = disc(z).sum()
    loss = remat.checkpoint(disc, z, engine=engine).sum()
    optimizer = torch.optim.SGD(disc.parameters(), lr=0.5)
    for p in disc.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        plain.backward()
    # The function engine saves the weights as its inputs: autograd's own check fires.
    error = RuntimeError if engine == "function" else remat.CheckpointError
    with pytest.raises(error, match=r"modified by an in-?place operation"):
        loss.backward()


def test_bias_stepped_before_backward_is_an_error_though_autograd_saved_it_not():
    """A bias only added is never saved by autograd, so plain PyTorch accepts the step; but
    the recomputed activation that a later op saved would be computed with the new bias."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    loss = remat.checkpoint(lambda t: lin(t).tanh(), x).sum()
    with torch.no_grad():
        lin.bias.add_(1.0)
    with pytest.raises(remat.CheckpointError, match="a parameter or buffer it reads"):
        loss.backward()


@pytest.mark.parametrize("engine", ENGINES)
def test_region_writing_its_input_in_place_is_an_error(engine):
    """Recomputing from an input the forward overwrote would apply the write twice."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    with pytest.raises(remat.CheckpointError, match=r"writes its input tensor #0 .*in place"):
        remat.checkpoint(lambda t, m: m(t.mul_(2)), x, lin, engine=engine)


class _Steps(nn.Module):
    """Reassigns a buffer in forward (``self.steps = self.steps + 1``) and reads it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        self.steps = self.steps + 1
        return torch.tanh(self.lin(x) * self.steps)


@pytest.mark.parametrize("engine", ENGINES)
def test_reassigned_buffer_is_replayed(engine):
    torch.manual_seed(0)
    reference = _Steps()
    model = copy.deepcopy(reference)
    x = torch.randn(3, 4, requires_grad=True)
    want = torch.autograd.grad(reference(x).sum(), [x, *reference.parameters()])
    got = torch.autograd.grad(
        remat.checkpoint(model, x, engine=engine).sum(), [x, *model.parameters()]
    )
    torch.testing.assert_close(got, want, **EXACT)
    assert model.steps.item() == reference.steps.item() == 1


class _Alternating(nn.Module):
    """A module attribute changed in forward picks the op (state kept on the module, as
    RecurrentGemma keeps its recurrent state): replayed like a buffer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0
        self.state = None

    def forward(self, x):
        self.calls += 1
        h = self.lin(x) if self.state is None else self.lin(x) + self.state
        self.state = h.detach()
        return (torch.tanh if self.calls % 2 else torch.sigmoid)(h)


@pytest.mark.parametrize("engine", ENGINES)
def test_module_attributes_changed_in_forward_are_replayed(engine):
    torch.manual_seed(0)
    reference = _Alternating()
    model = copy.deepcopy(reference)
    for _ in range(3):  # a state and a parity that change every call
        x = torch.randn(3, 4, requires_grad=True)
        want = torch.autograd.grad(reference(x).sum(), [x, *reference.parameters()])
        y = remat.checkpoint(model, x, engine=engine)
        torch.testing.assert_close(torch.autograd.grad(y.sum(), [x, *model.parameters()]), want)
        assert model.calls == reference.calls
        torch.testing.assert_close(model.state, reference.state, **EXACT)


@pytest.mark.parametrize("engine", ENGINES)
def test_default_check_compares_the_producing_op(engine):
    """A branch on state recomputation cannot replay (a list the function pops from) goes
    the other way: same shapes, another op (``tanh`` and ``sigmoid`` both save their
    output)."""
    lin = nn.Linear(4, 4)
    branches = [torch.tanh, torch.sigmoid]

    def f(x, lin):
        return branches.pop(0)(lin(x))

    y = remat.checkpoint(f, torch.randn(3, 4, requires_grad=True), lin, engine=engine)
    with pytest.raises(remat.CheckpointError, match="produced by another op"):
        y.sum().backward()


def test_views_under_a_dispatch_mode_in_forward_only_are_the_same_op():
    """``reshape`` is a ``view`` under a dispatch mode and ``_reshape_alias`` without: a
    forward under a MemoryTracker recomputed outside it is the same computation."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(2, 4, 8, requires_grad=True)

    def f(t, lin):
        return lin(t).reshape(8, 8).tanh()

    want = torch.autograd.grad(f(x, lin).sum(), x)
    with remat.MemoryTracker():
        y = remat.checkpoint(f, x, lin)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x), want, **EXACT)


# ---- the function engine (issue #12) ----------------------------------------------------


@pytest.mark.parametrize("create_graph", [False, True])
def test_function_engine_runs_tensor_hooks_once(create_graph):
    """Gradients are taken with respect to aliases in the recomputation, so a hook on a
    weight or an input runs once, when the gradient reaches the tensor itself."""
    results = []
    for engine in (None, "function"):
        torch.manual_seed(1)
        lin = nn.Linear(4, 4)
        lin.weight.register_hook(lambda g: g * 0.5)
        x = torch.randn(3, 4, requires_grad=True)
        x.register_hook(lambda g: g * 3.0)

        def f(t, m):
            return torch.tanh(m(t))

        y = f(x, lin) if engine is None else remat.checkpoint(f, x, lin, engine=engine)
        if create_graph:
            (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
            results.append(torch.autograd.grad(g.pow(2).sum(), [lin.weight, x]))
        else:
            y.sum().backward()
            results.append((lin.weight.grad, lin.bias.grad, x.grad))
    torch.testing.assert_close(results[1], results[0], **EXACT)


def test_function_engine_passes_containers_without_tensors_as_they_are():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    log: list[str] = []

    def f(t, m, log):
        log.append("ran")
        return m(t)

    remat.checkpoint(f, torch.randn(3, 4, requires_grad=True), lin, log, engine="function")
    assert log == ["ran"]
    held: list[torch.Tensor] = [torch.randn(3, 4, requires_grad=True)]

    def g(ts, m):
        ts.append(m(ts[0]))
        return ts[-1]

    with pytest.raises(remat.CheckpointError, match="changed its argument #0"):
        remat.checkpoint(g, held, lin, engine="function")


@pytest.mark.parametrize("engine", ENGINES)
def test_random_ops_without_preserve_rng_state_warn(engine, recwarn):
    """The one case left to the user: no RNG replay asked for, and the region draws."""
    drop = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="drew random numbers .* preserve_rng_state=False"):
        remat.checkpoint(drop, x, engine=engine, preserve_rng_state=False)
    remat.checkpoint(drop.eval(), x, engine=engine, preserve_rng_state=False)  # draws nothing
    assert not [w for w in recwarn if "random numbers" in str(w.message)]
