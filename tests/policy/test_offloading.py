"""remat.offload on CPU through CpuStore: bitwise gradients, exact bytes moved, freed originals.

Offloading copies whole storages and restores each saved tensor's exact geometry, so the
backward runs the same kernels: gradients are asserted bitwise (rtol=0, atol=0). Float32
everywhere, 4 bytes an element. In the tutorial MLP a Linear saves its input, a ReLU its
output; the ReLU output that is also the next Linear's input is one storage, offloaded once.
"""

from __future__ import annotations

import copy
import json
import pickle
import runpy
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import remat
from conftest import tiny_gpt
from remat import CpuStore, MemoryTracker
from remat.bench.workloads import build_workload

F32 = 4
B, IN, HID, WID = 8, 96, 40, 24  # small tutorial MLP: IN -> HID -> WID, ...
MLP_SIZES = {"in_features": IN, "hidden": HID, "width": WID}
GPT_SIZES = {"n_layers": 3, "d_model": 32, "n_heads": 4, "seq_len": 16, "vocab_size": 64}
BLOCKS = remat.by_name("block1", "block2", "block3")
# Saved inside the MLP's blocks, unique storages: block1 x, h1, out1; block2 h2, out2 (its
# input is out1); block3 h3 (its input is out2, its last Linear's input is h3 again).
MLP_OFFLOADED = F32 * B * (IN + 3 * HID + 2 * WID)
BENCH = Path(__file__).parents[2] / "benchmarks" / "gpu_offload.py"


def mlp():
    return build_workload("mlp", batch=B, **MLP_SIZES)


def gpt(dropout: float = 0.0):
    return tiny_gpt(dropout=dropout, **GPT_SIZES)


def grads_of(workload, *, backwards: int = 1) -> dict[str, torch.Tensor]:
    workload.model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # dropout masks
    loss = workload.loss()
    for i in range(backwards):
        loss.backward(retain_graph=i < backwards - 1)
    return {n: p.grad.clone() for n, p in workload.model.named_parameters()}


def assert_same_grads(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("prefetch", [True, False, "own"])
def test_mlp_gradients_bitwise_and_bytes_exact(prefetch: bool | str) -> None:
    reference = grads_of(mlp())
    workload, policy = mlp(), remat.offload(min_bytes=0, store=CpuStore(), prefetch=prefetch)
    remat.apply(workload.model, BLOCKS & policy)
    assert_same_grads(grads_of(workload), reference)
    stats = policy.stats
    assert (stats.bytes_out, stats.tensors_out) == (MLP_OFFLOADED, 6)
    assert (stats.bytes_in, stats.tensors_in) == (MLP_OFFLOADED, 6)
    assert stats.bytes_held == 0 and stats.peak_bytes_held == MLP_OFFLOADED
    # Backward reaching block3 prefetches block2's (out1, h2, out2), reaching block2 the
    # rest of block1's (x, h1); only h3 is fetched on demand. With "own", each block brings
    # back the rest of its own once its backward starts: block3 out2 after h3, block2
    # (out1, h2) after out2 (back already), block1 (x, h1) after out1: again only h3 waits.
    assert stats.tensors_prefetched == (5 if prefetch else 0)


def test_gpt_gradients_bitwise_and_bytes_match_the_tracker() -> None:
    plain = gpt(dropout=0.1)
    reference = grads_of(plain)
    # What autograd keeps per block without offloading, per remat's tracker (parameters
    # excluded). No storage is saved by two blocks, so the rows add up to the union.
    torch.manual_seed(1)
    with MemoryTracker(module=plain.model, count_existing=[plain.model, *plain.inputs]) as mt:
        out = plain.model(*plain.inputs)  # noqa: F841 (the graph must live until exit)
    blocks_saved = sum(mt.saved_bytes_by_module[f"blocks.{i}"] for i in range(3))

    workload, policy = gpt(dropout=0.1), remat.offload(min_bytes=0, store=CpuStore())
    remat.apply(workload.model, policy)
    assert remat.applied(workload.model) == {f"blocks.{i}": "offload" for i in range(3)}
    assert_same_grads(grads_of(workload), reference)
    assert policy.stats.bytes_out == blocks_saved > 0
    assert policy.stats.bytes_in == blocks_saved


def test_parameters_and_buffers_are_never_offloaded() -> None:
    class Scale(nn.Module):  # x * buffer: mul saves the (large) buffer for x's gradient
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.rand(64, 64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    class Borrow(nn.Module):  # uses a weight it does not own (tied, as in a LM head)
        def __init__(self, owner: nn.Linear) -> None:
            super().__init__()
            self.owner = [owner]  # a list: not registered as a submodule

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.owner[0].weight)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), Scale(), nn.Linear(64, 64))
    model.append(Borrow(model[0]))
    x = torch.randn(64, 64, requires_grad=True)
    reference = copy.deepcopy(model)
    policy = remat.offload(min_bytes=0, store=CpuStore())
    remat.apply(model, remat.by_type(nn.Linear, Scale, Borrow) & policy)
    assert len(remat.applied(model)) == 4
    model(x).sum().backward()
    # Linear 0 saves x (and weight.t(), a view of a parameter), Scale saves its buffer,
    # Linear 2 saves Scale's output, Borrow Linear 2's output and a view of Linear 0's
    # weight: only x and the two outputs move.
    assert (policy.stats.bytes_out, policy.stats.tensors_out) == (3 * F32 * 64 * 64, 3)
    x_grad = x.grad.clone()
    x.grad = None
    reference(x).sum().backward()
    torch.testing.assert_close(x_grad, x.grad, rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_min_bytes_leaves_smaller_storages_in_place() -> None:
    reference = grads_of(mlp())
    workload = mlp()
    # (B, WID) storages and larger move; the (B, HID) ReLU outputs stay.
    assert F32 * B * HID > F32 * B * WID
    policy = remat.offload(min_bytes=F32 * B * HID + 1, store=CpuStore())
    remat.apply(workload.model, BLOCKS & policy)
    assert_same_grads(grads_of(workload), reference)
    assert (policy.stats.bytes_out, policy.stats.tensors_out) == (F32 * B * IN, 1)

    workload = mlp()
    policy = remat.offload(min_bytes=F32 * B * WID, store=CpuStore())
    remat.apply(workload.model, BLOCKS & policy)
    assert_same_grads(grads_of(workload), reference)
    assert policy.stats.bytes_out == F32 * B * (IN + 3 * HID + 2 * WID)  # all >= the bound

    workload = mlp()
    policy = remat.offload(min_bytes=F32 * B * WID + 1, store=CpuStore())
    remat.apply(workload.model, BLOCKS & policy)
    assert_same_grads(grads_of(workload), reference)
    assert (policy.stats.bytes_out, policy.stats.tensors_out) == (F32 * B * (IN + 3 * HID), 4)


def _forward_tracked(workload, policy=None):
    """Forward only, tracked; weak references to the block1 ReLU and block2 outputs."""
    if policy is not None:
        remat.apply(workload.model, BLOCKS & policy)
    model, refs = workload.model, []

    def keep_weakly(module, args, out):
        refs.append(weakref.ref(out.untyped_storage()))

    handles = [model.block1[1].register_forward_hook(keep_weakly)]
    handles.append(model.block2.register_forward_hook(keep_weakly))
    with MemoryTracker(module=model, count_existing=[model, *workload.inputs]) as mt:
        out = model(*workload.inputs)
    for h in handles:
        h.remove()
    return mt, refs, out


def test_originals_are_freed_and_the_store_holds_exactly_the_offloaded_bytes() -> None:
    mt_plain, refs_plain, _ = _forward_tracked(mlp())
    assert all(ref() is not None for ref in refs_plain)  # the graph holds them
    assert mt_plain.saved_bytes == MLP_OFFLOADED

    policy = remat.offload(min_bytes=0, store=CpuStore())
    mt, refs, out = _forward_tracked(mlp(), policy)
    assert all(ref() is None for ref in refs)  # copied out and dropped
    assert policy.stats.bytes_held == MLP_OFFLOADED
    assert mt.saved_bytes == 0  # nothing left for autograd outside the store
    # The device lost what moved, except the model input, which the user still holds; the
    # store's buffers are host memory, counted apart.
    assert mt.current_bytes == mt_plain.current_bytes - MLP_OFFLOADED + F32 * B * IN
    assert mt.host_bytes == mt.host_peak_bytes == MLP_OFFLOADED
    assert mt_plain.host_peak_bytes == 0
    out.sum().backward()
    assert policy.stats.bytes_held == 0


def test_pool_reuses_host_buffers_across_steps() -> None:
    workload, policy = gpt(), remat.offload(min_bytes=0, store=CpuStore())
    remat.apply(workload.model, policy)
    grads_of(workload)
    first = policy.stats
    assert first.buffers_allocated == first.tensors_out > 0
    assert first.bytes_allocated == first.bytes_out and first.bytes_held == 0
    for _ in range(2):
        grads_of(workload)
    assert policy.stats.buffers_allocated == first.buffers_allocated
    assert policy.stats.bytes_allocated == first.bytes_allocated
    assert policy.stats.bytes_out == 3 * first.bytes_out
    # A forward whose graph is dropped without backward gives its buffers back too.
    workload.loss()
    assert policy.stats.bytes_held == 0
    grads_of(workload)
    assert policy.stats.buffers_allocated == first.buffers_allocated


def test_retain_graph_and_no_grad() -> None:
    reference = grads_of(mlp(), backwards=2)
    workload, policy = mlp(), remat.offload(min_bytes=0, store=CpuStore())
    remat.apply(workload.model, BLOCKS & policy)
    assert_same_grads(grads_of(workload, backwards=2), reference)
    assert policy.stats.tensors_in == policy.stats.tensors_out == 6  # second pass reuses
    with torch.no_grad():
        workload.loss()
    assert policy.stats.tensors_out == 6  # nothing is saved without grad


def test_model_with_offload_deepcopies_and_pickles() -> None:
    workload, policy = gpt(), remat.offload(min_bytes=0, store=CpuStore())
    remat.apply(workload.model, policy)
    reference = grads_of(workload)
    for clone in (copy.deepcopy(workload.model), pickle.loads(pickle.dumps(workload.model))):
        copied = gpt()
        copied.model = clone
        assert remat.applied(clone) == remat.applied(workload.model)
        assert_same_grads(grads_of(copied), reference)


def test_cpu_model_with_default_store_warns_once_and_changes_nothing() -> None:
    reference = grads_of(gpt())
    workload, policy = gpt(), remat.offload(min_bytes=0)
    with pytest.warns(UserWarning, match="offloading a CPU model to CPU has no effect") as rec:
        remat.apply(workload.model, policy)
        remat.apply(workload.model, policy)
    assert len([w for w in rec if "offload" in str(w.message)]) == 1
    assert_same_grads(grads_of(workload), reference)
    assert policy.stats == remat.OffloadStats()


def test_explicit_cpu_store_does_not_warn(recwarn: pytest.WarningsRecorder) -> None:
    remat.apply(gpt().model, remat.offload(store=CpuStore()))
    assert not [w for w in recwarn if "offload" in str(w.message)]


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="min_bytes must be >= 0"):
        remat.offload(min_bytes=-1)
    for bad in (1.5, True, "1MB"):
        with pytest.raises(TypeError, match="min_bytes must be an int"):
            remat.offload(min_bytes=bad)
    with pytest.raises(TypeError, match="store must be an OffloadStore"):
        remat.offload(store="cpu")
    for bad in (1, "previous", None):
        with pytest.raises(TypeError, match="prefetch must be True, False or 'own'"):
            remat.offload(prefetch=bad)
    with pytest.raises(TypeError, match="min_bytes must be an int"):
        remat.Offload(min_bytes=None)
    with pytest.raises(ValueError, match="stash must be a positive integer"):
        remat.CudaPinnedStore(stash=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_store_without_cuda_raises() -> None:
    with pytest.raises(remat.RematError, match="CUDA is not available"):
        remat.CudaPinnedStore()


def test_gpu_offload_benchmark_dry_run_on_cpu(tmp_path: Path, capsys) -> None:
    main = runpy.run_path(str(BENCH))["main"]
    path = tmp_path / "gpu_offload.json"
    assert main(["--device", "cpu", "--tiny", "--json", str(path)]) == 0
    assert "hidden behind compute" in capsys.readouterr().out
    result = json.loads(path.read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == ["none", "recompute", "offload"]
    assert all(r["max_grad_diff"] == 0 for r in rows.values())  # bitwise on CPU
    off = rows["offload"]
    assert off["bytes_out_per_step"] == off["bytes_in_per_step"] > 0
    assert off["prefetched_per_step"] * 2 == off["tensors_per_step"]  # 2 blocks: 1 prefetched
    assert 0 <= result["overlap"]["overlap_fraction"] <= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without CUDA")
def test_gpu_offload_benchmark_exits_2_without_cuda(capsys) -> None:
    main = runpy.run_path(str(BENCH))["main"]
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "CUDA is not available" in captured.err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("store", ["default", "pinned"])
def test_cuda_pinned_store(store: str) -> None:
    sizes = {**GPT_SIZES, "n_layers": 4, "d_model": 256, "seq_len": 128}

    def workload():
        return build_workload("gpt", batch=4, device="cuda", **sizes)

    plain = workload()
    reference = grads_of(plain)
    policy = remat.offload(
        min_bytes=0, store=None if store == "default" else remat.CudaPinnedStore()
    )
    offloaded = workload()
    remat.apply(offloaded.model, policy)
    for _ in range(2):  # the second step reuses every pinned buffer
        got = grads_of(offloaded)
        torch.cuda.synchronize()
        for name in reference:  # not bitwise: CUDA attention backward may use atomics
            torch.testing.assert_close(got[name], reference[name], msg=name)
    stats = policy.stats
    assert stats.bytes_out == stats.bytes_in > 0 and stats.bytes_held == 0
    assert stats.buffers_allocated == stats.tensors_out // 2
    assert stats.tensors_prefetched > 0
    # Device memory held after the forward: offloading must keep less than the plain model.
    held = []
    for w in (plain, offloaded):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        loss = w.loss()
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated() - base)
        loss.backward()
    assert held[1] < held[0] / 2


def test_parameter_stepped_before_backward_is_an_error() -> None:
    """Parameters stay where they are; a saved-tensor hook switches autograd's version
    check off, so offload checks them: a step before backward raises, as without remat."""
    workload = mlp()
    remat.apply(workload.model, BLOCKS & remat.offload(min_bytes=0, store=CpuStore()))
    loss = workload.loss()
    with torch.no_grad():
        workload.model.block2[0].weight.add_(1.0)
    with pytest.raises(remat.CheckpointError, match="modified by an in-place operation"):
        loss.backward()
