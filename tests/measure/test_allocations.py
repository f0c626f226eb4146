"""AllocationTracker: the allocators' events give MemoryTracker's figure on eager models, to
the byte where every allocation is a tensor's storage, and see inside compiled code."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import remat
from conftest import NEEDS_COMPILER, mean_square, tiny_gpt
from remat import RematError
from remat.measure.allocations import AllocationTracker, allocated_step_peak
from remat.profiling.step import measure_step_peak


def test_window_counts_new_blocks_only() -> None:
    before = torch.randn(1000)  # 4,000 B allocated before the window
    with AllocationTracker() as at:
        a = torch.empty(256)  # 1,024 B
        b = torch.empty(512)  # 2,048 B: both live, 3,072 B
        del a
        del before  # a block the window did not make: not subtracted
        c = torch.empty(128)  # 512 B: 2,560 B live
    assert (at.peak_bytes, at.current_bytes, at.allocations) == (3072, 2560, 3)
    assert at.peak_by_device == {"cpu": 3072}
    assert at.cuda_max_allocated is None
    del b, c


def test_device_filter() -> None:
    with AllocationTracker("cuda") as at:
        torch.empty(256)
    assert at.peak_bytes == 0
    with AllocationTracker(torch.device("cpu")) as at:
        torch.empty(256)
    assert at.peak_bytes == 1024


def test_refuses_nesting_and_bad_device() -> None:
    with pytest.raises(TypeError, match="device"):
        AllocationTracker(0)
    outer, inner = AllocationTracker(), AllocationTracker()
    with outer, pytest.raises(RematError, match="profiler is already running"), inner:
        pass
    with torch.profiler.profile(), pytest.raises(RematError, match="does not nest"):
        AllocationTracker().__enter__()


def test_eager_steps_agree_with_memory_tracker() -> None:
    """An un-checkpointed step of a GPT: every allocation is a storage, so the allocators'
    figure is the tracker's to the byte (the profile's convention: gradients count). With
    recomputed regions the allocator also sees the CPU RNG state each checkpoint keeps to
    replay dropout (``torch.get_rng_state()``, made without dispatching), and nothing else."""
    rng_state = torch.get_rng_state().nbytes
    workload = tiny_gpt(n_layers=3, seq_len=32, d_model=64)
    model, inputs = workload.model, workload.inputs
    prof = remat.profile(model, *inputs, loss_fn=mean_square)
    for choices in (None, ["recompute", "store", "recompute"], ["recompute"] * 3):
        m = copy.deepcopy(model)
        if choices:
            remat.apply_plan(m, remat.plan_from_choices(prof, choices))
        expected = measure_step_peak(m, inputs, mean_square)
        extra = allocated_step_peak(m, inputs, mean_square) - expected
        recomputed = (choices or []).count("recompute")
        assert extra % rng_state == 0 and 0 <= extra <= recomputed * rng_state, choices
        assert extra <= 0.01 * expected


def test_kernel_workspaces_are_seen() -> None:
    """A oneDNN convolution allocates a buffer no tensor holds; the allocator sees it,
    a dispatch mode cannot."""
    conv, x = nn.Conv2d(3, 16, 3), torch.randn(8, 3, 32, 32)
    with remat.MemoryTracker() as mt:
        y = conv(x)
    with AllocationTracker() as at:
        z = conv(x)
    assert mt.peak_bytes == y.nbytes == z.nbytes
    assert at.peak_bytes >= mt.peak_bytes


@NEEDS_COMPILER
@pytest.mark.slow
def test_compiled_step_is_seen() -> None:
    """A compiled step allocates inside Inductor's code: the tracker sees it, within 1% of
    the eager step's peak without recomputation, and lower with compile's own budget."""
    import torch._functorch.config as functorch_config

    workload = tiny_gpt(n_layers=3, seq_len=64, d_model=64)
    model, inputs = workload.model, workload.inputs
    eager = measure_step_peak(model, inputs, mean_square)
    peaks = {}
    for budget in (1.0, 0.1):
        torch._dynamo.reset()
        with functorch_config.patch(activation_memory_budget=budget):
            compiled = torch.compile(copy.deepcopy(model))
            mean_square(compiled(*inputs)).backward()  # compile
            peaks[budget] = allocated_step_peak(compiled, inputs, mean_square)
    torch._dynamo.reset()
    assert abs(peaks[1.0] - eager) <= 0.01 * eager, (peaks, eager)
    assert peaks[0.1] < 0.9 * peaks[1.0], peaks


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_allocator_figures_beside() -> None:
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)).cuda()
    x = torch.randn(512, 256, device="cuda")
    expected = measure_step_peak(model, (x,), mean_square)
    model.zero_grad(set_to_none=True)
    with AllocationTracker("cuda") as at:
        mean_square(model(x)).backward()
    # the caching allocator rounds blocks up to 512 B
    assert expected <= at.peak_bytes <= expected * 1.01
    assert at.cuda_max_allocated == at.peak_bytes
    assert at.cuda_max_reserved >= at.cuda_max_allocated
