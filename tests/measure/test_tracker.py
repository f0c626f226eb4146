"""MemoryTracker and saved_activations, pinned to the byte against hand-counted expectations.

Float32 everywhere: 4 bytes an element. A Linear saves its input (for the weight gradient),
ReLU/Tanh/Sigmoid save their output, GELU saves its input; parameters are never activations.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.utils.checkpoint as tuc
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

import remat
from remat import MemoryTracker, RematError, saved_activations

F32 = 4
B, A, H, C = 6, 5, 7, 3  # batch, in, hidden, out


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def chain(act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(A, H), nn.ReLU(), nn.Linear(H, C), act())


def assert_clean() -> None:
    """No dispatch mode and no saved-tensor hooks left behind."""
    assert _get_current_dispatch_mode() is None
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_linear_chain_saved_and_forward_peak() -> None:
    model, x = chain(nn.Tanh), torch.randn(B, A)
    params = nbytes(*model.parameters())
    with MemoryTracker(module=model, count_existing=[model, x]) as mt:
        out = model(x)
    # saved: x (Linear 0), ReLU out (also Linear 2's input, counted once), Tanh out
    assert mt.saved_bytes == F32 * B * (A + H + C)
    assert mt.saved_bytes_by_module == {
        "": F32 * B * (A + H + C),
        "0": F32 * B * A,
        "1": F32 * B * H,
        "2": F32 * B * H,
        "3": F32 * B * C,
    }
    # peak: Linear 2's output and the Tanh output live together; Linear 0's output is freed
    # once ReLU has run (ReLU keeps only its own output).
    assert mt.peak_bytes == params + F32 * B * (A + max(2 * H, H + 2 * C))
    assert mt.current_bytes == params + F32 * B * (A + H + C)  # x, ReLU out, Tanh out (= out)
    assert mt.peak_by_phase == {"forward": mt.peak_bytes, "backward": 0}
    assert mt.peak_by_module["3"] == params + F32 * B * (A + H + 2 * C)
    del out


def test_gelu_saves_its_input_not_output() -> None:
    model, x = chain(nn.GELU), torch.randn(B, A)
    with MemoryTracker(module=model, count_existing=[model, x]) as mt:
        out = model(x)
    assert mt.saved_bytes_by_module["3"] == F32 * B * C  # Linear 2's output
    assert mt.saved_bytes == F32 * B * (A + H + C)
    del out


def test_backward_frees_graph_and_keeps_grads() -> None:
    model, x = chain(nn.Sigmoid), torch.randn(B, A)
    params = nbytes(*model.parameters())
    with MemoryTracker(module=model, count_existing=[model, x]) as mt:
        loss = model(x).sum()
        loss.backward()
        del loss
    # only parameters, their gradients and the input remain
    assert mt.current_bytes == 2 * params + nbytes(x)
    assert mt.peak_by_phase["backward"] >= 2 * params + nbytes(x)
    phases = {e.phase for e in mt.timeline}
    assert phases == {"forward", "backward"}
    assert any(e.module == "2" and e.op.startswith("aten.addmm") for e in mt.timeline)
    assert {e.module for e in mt.timeline if e.phase == "backward"} == {"<backward>"}


def test_views_and_inplace_count_once() -> None:
    with MemoryTracker() as mt:
        a = torch.zeros(10, 10)
        views = [a.view(100), a[2:], a.t(), a.detach(), a.unsqueeze(0)]
        a.add_(1).mul_(2)
        torch.add(a, 1, out=a)
        assert mt.current_bytes == 400
        b = a + 1  # new storage
        assert mt.current_bytes == 800
        del views, b
    assert mt.peak_bytes == 800
    assert mt.current_bytes == 400
    del a


def test_freed_tensors_leave_the_count() -> None:
    with MemoryTracker() as mt:
        x = torch.ones(256)
        y = x * 2
        del x
        assert mt.current_bytes == 1024
        v = y[:10]
        del y
        assert mt.current_bytes == 1024  # the view keeps the storage alive
        del v
        assert mt.current_bytes == 0
    assert mt.peak_bytes == 2048


def test_resize_in_place_is_counted() -> None:
    with MemoryTracker() as mt:
        x = torch.empty(4)
        x.resize_(100)
        assert mt.current_bytes == 400
    del x


def test_existing_tied_storage_counts_once() -> None:
    w = torch.randn(8, 8)
    with MemoryTracker(count_existing=[w, w.t(), w[0]]) as mt:
        pass
    assert mt.peak_bytes == mt.current_bytes == nbytes(w)


def test_cpu_and_meta_give_equal_figures() -> None:
    model, x = chain(nn.Tanh), torch.randn(B, A)
    figures = []
    for m, inp in ((model, x), (copy.deepcopy(model).to("meta"), x.to("meta"))):
        with MemoryTracker(module=m, count_existing=[m, inp]) as mt:
            loss = m(inp).sum()
            loss.backward()
            del loss
        figures.append(mt.summary())
    assert figures[0] == figures[1]
    assert figures[0]["saved_bytes"] == F32 * B * (A + H + C)


class _Wrapped(nn.Module):
    """Runs ``inner`` under a checkpoint function, so what it saves is attributed to us."""

    def __init__(self, inner: nn.Module, ckpt) -> None:
        super().__init__()
        self.inner, self.ckpt = inner, ckpt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ckpt(self.inner, x)


@pytest.mark.parametrize(
    "ckpt",
    [
        pytest.param(lambda f, x: tuc.checkpoint(f, x, use_reentrant=False), id="torch"),
        pytest.param(lambda f, x: tuc.checkpoint(f, x, use_reentrant=True), id="torch-reentrant"),
        pytest.param(lambda f, x: remat.checkpoint(f, x), id="remat-hooks"),
        pytest.param(lambda f, x: remat.checkpoint(f, x, engine="function"), id="remat-function"),
    ],
)
def test_checkpointed_block_holds_only_its_inputs(ckpt) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Wrapped(chain(nn.Tanh), ckpt), nn.Linear(C, 2))
    x = torch.randn(B, A, requires_grad=True)
    with MemoryTracker(module=model, count_existing=[model, x]) as mt:
        loss = model(x).sum()
        fwd_saved = mt.saved_bytes_by_module
        loss.backward()
    assert fwd_saved == {}  # not taken until backward starts
    assert mt.saved_bytes_by_module["0"] == nbytes(x)  # the block's input, nothing else
    assert mt.saved_bytes_by_module["1"] == F32 * B * C  # the last Linear saves its input
    assert mt.saved_bytes == nbytes(x) + F32 * B * C
    assert not any(k.startswith("0.inner") for k in mt.saved_bytes_by_module)
    # recompute runs the block's modules again, in backward
    assert any(e.phase == "backward" and e.module == "0.inner.2" for e in mt.timeline)


def test_exception_inside_forward_leaves_nothing_active() -> None:
    class Boom(nn.Module):
        def forward(self, x):
            raise ValueError("boom in forward")

    model = nn.Sequential(nn.Linear(A, A), Boom())
    with (
        pytest.raises(ValueError, match="boom in forward"),
        MemoryTracker(module=model, count_existing=[model]),
    ):
        model(torch.randn(2, A))
    assert_clean()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with MemoryTracker() as mt:  # and a fresh tracker works afterwards
        torch.ones(3)
    assert mt.peak_bytes == 12


def test_bad_arguments_name_the_problem() -> None:
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        MemoryTracker(module=lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"count_existing\[1\]"):
        MemoryTracker(count_existing=[torch.ones(1), "weights"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        saved_activations(lambda x: x, torch.ones(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"different devices: inputs\[0\] is on cpu"):
        saved_activations(nn.Bilinear(2, 2, 2), torch.ones(1, 2), torch.ones(1, 2, device="meta"))
    with pytest.raises(ValueError, match="parameters of Linear are on cpu"):
        saved_activations(nn.Linear(2, 2), torch.ones(1, 2, device="meta"))
    assert_clean()


def test_saved_activations_table() -> None:
    model, x = chain(nn.Tanh), torch.randn(B, A)
    table = saved_activations(model, x)
    assert [r.module for r in table] == ["", "0", "1", "2", "3"]
    assert [r.type for r in table] == ["Sequential", "Linear", "ReLU", "Linear", "Tanh"]
    assert [r.saved_bytes for r in table] == [F32 * B * n for n in (A + H + C, A, H, H, C)]
    assert all(r.stores_activations for r in table)
    assert table.total_bytes == F32 * B * (A + H + C)
    assert json.loads(table.to_json())["rows"][1] == {
        "module": "0",
        "type": "Linear",
        "saved_bytes": F32 * B * A,
        "stores_activations": True,
    }
    text = str(table)
    assert "Tanh" in text and f"{F32 * B * (A + H + C):,}" in text
    with torch.no_grad():  # saved_activations enables grad itself
        assert saved_activations(model, x).total_bytes == table.total_bytes
    assert_clean()


def test_saved_activations_sees_no_saves_under_a_frozen_model() -> None:
    model, x = chain(nn.Identity), torch.randn(B, A)
    model.requires_grad_(False)
    table = saved_activations(model, x)
    assert table.total_bytes == 0
    assert not any(r.stores_activations for r in table)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_allocator_figures_beside_ours() -> None:
    model, x = chain(nn.Tanh).cuda(), torch.randn(512, A, device="cuda")
    with MemoryTracker(module=model, count_existing=[model, x]) as mt:
        loss = model(x).sum()
        loss.backward()
    assert mt.cuda_max_allocated is not None and mt.cuda_max_reserved is not None
    assert mt.cuda_max_allocated >= mt.peak_bytes  # the allocator rounds up, never down
    cpu_model = copy.deepcopy(model).cpu()
    with MemoryTracker(module=cpu_model, count_existing=[cpu_model, x.cpu()]) as cpu:
        loss = cpu_model(x.cpu()).sum()
        fwd = cpu.peak_bytes
        loss.backward()
    assert mt.peak_by_phase["forward"] == fwd


def test_window_peak_starts_over():
    with MemoryTracker(timeline=False) as mt:
        big = torch.ones(1000)  # 4000 bytes
        del big
        mt.start_window()
        small = torch.ones(10)  # 40 bytes
    assert mt.peak_bytes == 4000
    assert mt.window_peak_bytes == 40
    del small


def test_entering_a_tracker_inside_itself_raises_and_leaves_nothing_active() -> None:
    tracker = MemoryTracker()
    with tracker, pytest.raises(RematError, match="already active"), tracker:
        pass
    assert_clean()


def test_parameter_stepped_before_backward_is_an_error_under_the_tracker() -> None:
    """The tracker's saved-tensor hook switches autograd's version check off: it checks."""
    model, x = chain(nn.Tanh), torch.randn(B, A)
    with MemoryTracker(module=model):
        loss = model(x).sum()
    with torch.no_grad():
        model[2].weight.add_(1.0)
    with pytest.raises(RematError, match="modified by an in-place operation"):
        loss.backward()
