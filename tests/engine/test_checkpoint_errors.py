"""Every error the engine raises on purpose, with its message; gradcheck; checkpoint_sequential."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import remat
from remat.engine.region_modules import register_module_names

ENGINES = ["hooks", "function"]


def test_non_callable_fn():
    with pytest.raises(TypeError, match="fn must be callable.*got Tensor"):
        remat.checkpoint(torch.ones(2), torch.ones(2))
    with pytest.raises(TypeError, match="fn must be callable"):
        remat.CheckpointFunction.apply(3, torch.ones(2))


def test_unknown_engine():
    with pytest.raises(ValueError, match="engine='reentrant' is not one of 'hooks', 'function'"):
        remat.checkpoint(nn.Linear(2, 2), torch.ones(2), engine="reentrant")


def test_unknown_determinism_check():
    with pytest.raises(ValueError, match="determinism_check='strict'"):
        remat.checkpoint(nn.Linear(2, 2), torch.ones(2), determinism_check="strict")


def test_option_with_wrong_type():
    with pytest.raises(TypeError, match="early_stop must be a bool"):
        remat.checkpoint(nn.Linear(2, 2), torch.ones(2), early_stop="yes")


def test_unknown_keyword_names_it():
    with pytest.raises(TypeError, match="unknown keyword argument 'preserve_rng'.*engine"):
        remat.checkpoint(nn.Linear(2, 2), torch.ones(2), preserve_rng=False)


def test_torch_only_option_is_explained():
    with pytest.raises(TypeError, match="'use_reentrant'.*torch.utils.checkpoint option"):
        remat.checkpoint(nn.Linear(2, 2), torch.ones(2), use_reentrant=False)


def test_keywords_fn_accepts_are_passed():
    def fn(x, *, use_reentrant):  # a user's own argument of that name is fine
        return x * use_reentrant

    x = torch.ones(2, requires_grad=True)
    remat.checkpoint(fn, x, use_reentrant=3.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2,), 3.0))


class _Flag:
    double = False


class Flaky(nn.Module):
    """Changes what it computes between forward and recompute, as buggy code does."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if _Flag.double:
            h = torch.cat([h, h], dim=0)
        return torch.relu(h).sum(0)


@pytest.mark.parametrize("engine", ENGINES)
def test_metadata_mismatch_names_region_position_and_op(engine):
    root = nn.Sequential(nn.Identity(), Flaky())
    register_module_names(root)
    x = torch.randn(3, 4, requires_grad=True)
    _Flag.double = False
    out = remat.checkpoint(root[1], x, engine=engine)
    _Flag.double = True
    try:
        with pytest.raises(remat.CheckpointError) as info:
            out.sum().backward()
    finally:
        _Flag.double = False
    message = str(info.value)
    assert "module '1' (Flaky)" in message
    assert "forward:" in message and "recompute:" in message
    # x and the weight (saved by addmm) are unchanged; relu's saved output is the first
    # tensor whose shape differs
    assert "saved tensor #2" in message and "produced by relu" in message
    assert "shape=[3, 4]" in message and "shape=[6, 4]" in message


class _Scale:
    value = 1.0


@pytest.mark.parametrize("engine", ENGINES)
def test_values_check_catches_same_shape_different_values(engine):
    lin = nn.Linear(3, 3)

    def fn(x):
        return torch.tanh(lin(x) * _Scale.value)

    x = torch.randn(2, 3, requires_grad=True)
    _Scale.value = 1.0
    out = remat.checkpoint(fn, x, engine=engine, determinism_check="values")
    _Scale.value = 2.0
    try:
        with pytest.raises(remat.CheckpointError, match="same metadata, different values"):
            out.sum().backward()
        # "none" skips every check; "metadata" only compares shapes, so both pass here.
        for check in ("none", "metadata"):
            _Scale.value = 1.0
            out = remat.checkpoint(fn, x, engine=engine, determinism_check=check)
            _Scale.value = 2.0
            out.sum().backward()
    finally:
        _Scale.value = 1.0


def test_count_mismatch():
    lin = nn.Linear(3, 3)

    def fn(x):
        h = lin(x)
        return torch.sigmoid(h) if _Flag.double else h * 1.0

    x = torch.randn(2, 3, requires_grad=True)
    out = remat.checkpoint(fn, x, early_stop=False, determinism_check="none")
    _Flag.double = True
    try:
        with pytest.raises(remat.CheckpointError, match="saved 3 tensors.*forward saved 2"):
            out.sum().backward()
    finally:
        _Flag.double = False


_GLOBAL_LAYER = nn.Linear(3, 3)


def _uses_global(x):
    return _GLOBAL_LAYER(x)


def test_function_engine_refuses_invisible_parameters():
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(remat.CheckpointError, match='engine="hooks"'):
        remat.checkpoint(_uses_global, x, engine="function")
    # the hooks engine needs no knowledge of parameters
    remat.checkpoint(_uses_global, x).sum().backward()
    assert _GLOBAL_LAYER.weight.grad is not None


def test_function_engine_refuses_outside_non_leaf():
    w = torch.randn(3, requires_grad=True)
    scaled = w * 2  # computed outside the region, reached through a global
    globals()["_OUTSIDE"] = scaled
    try:
        with pytest.raises(remat.CheckpointError, match="computed outside it"):
            remat.checkpoint(lambda x: x * globals()["_OUTSIDE"], torch.ones(3), engine="function")
    finally:
        del globals()["_OUTSIDE"]


def test_function_engine_finds_closure_tensors():
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(3, requires_grad=True)
    out = remat.CheckpointFunction.apply(lambda t: (t * w).sin(), x)
    out.sum().backward()
    torch.testing.assert_close(w.grad, (x * w).cos() * x)


@pytest.mark.parametrize("engine", ENGINES)
def test_gradcheck_float64(engine):
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()

    def fn(x, w):
        return torch.tanh(lin(x) * w)

    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: remat.checkpoint(fn, a, b, engine=engine), (x, w))
    assert torch.autograd.gradgradcheck(
        lambda a, b: remat.checkpoint(fn, a, b, engine=engine), (x, w)
    )


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("segments", [1, 2, 3, 5])
def test_checkpoint_sequential_matches(engine, segments):
    torch.manual_seed(0)
    chain = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 8), nn.BatchNorm1d(8)
    )
    ref = copy.deepcopy(chain)
    x = torch.randn(6, 4, requires_grad=True)
    torch.manual_seed(1)
    want = torch.autograd.grad(ref(x).sum(), [x, *ref.parameters()])
    torch.manual_seed(1)
    out = remat.checkpoint_sequential(chain, segments, x, engine=engine)
    got = torch.autograd.grad(out.sum(), [x, *chain.parameters()])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(list(chain.buffers()), list(ref.buffers()), rtol=0, atol=0)


def test_checkpoint_sequential_multiple_values_between_stages():
    class Split(nn.Module):
        def forward(self, x):
            return x.sin(), x.cos()

    class Join(nn.Module):
        def forward(self, a, b):
            return a * b

    stages = [nn.Linear(3, 3), Split(), Join(), nn.Linear(3, 1)]
    x = torch.randn(2, 3, requires_grad=True)
    want = torch.autograd.grad(stages[3](stages[2](*stages[1](stages[0](x)))).sum(), x)
    got = torch.autograd.grad(remat.checkpoint_sequential(stages, 2, x).sum(), x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_checkpoint_sequential_bad_input():
    chain = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    x = torch.ones(1, 2)
    with pytest.raises(ValueError, match="segments=3 must be between 1 and the number of modules"):
        remat.checkpoint_sequential(chain, 3, x)
    with pytest.raises(TypeError, match="segments must be an int"):
        remat.checkpoint_sequential(chain, 1.5, x)
    with pytest.raises(TypeError, match="must be an nn.Sequential"):
        remat.checkpoint_sequential(nn.Linear(2, 2), 1, x)
    with pytest.raises(TypeError, match="unknown option.*'use_reentrant'"):
        remat.checkpoint_sequential(chain, 1, x, use_reentrant=False)


@pytest.mark.parametrize(
    "make",
    [
        lambda: remat.checkpoint(nn.Linear(2, 2), torch.ones(2), engine=1),
        lambda: remat.recompute(engine=None),
        lambda: remat.ops("save-matmuls", engine=2),
        lambda: remat.ops("save-matmuls", determinism_check=True),
    ],
)
def test_every_engine_option_of_the_wrong_type_is_a_type_error_named_the_same_way(make):
    with pytest.raises(TypeError, match=r"(engine|determinism_check) must be a str, one of"):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: remat.recompute(engine="reentrant"),
        lambda: remat.ops("save-matmuls", engine="hooks"),
    ],
)
def test_every_unknown_engine_is_a_value_error_listing_the_choices(make):
    with pytest.raises(ValueError, match=r"engine='\w+' is not one of '"):
        make()
