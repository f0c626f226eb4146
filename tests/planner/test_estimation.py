"""remat.estimate (FakeTensorMode, nothing allocated) against the CPU tracker, to the byte."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import remat
from remat import MemoryTracker, estimate
from remat.bench.workloads import build_workload

SMALL = {
    "mlp": {"batch": 16, "in_features": 300, "hidden": 64, "width": 70},
    "gpt": {
        "batch": 2,
        "n_layers": 3,
        "seq_len": 32,
        "d_model": 64,
        "n_heads": 4,
        "vocab_size": 100,
    },
    "convnet": {"batch": 4, "channels": 8, "n_blocks": 2},
}


def cpu_step(model: nn.Module, inputs: tuple, checkpointed: list[str]) -> dict:
    """The reference: the same training step on real CPU tensors under MemoryTracker."""
    for name in checkpointed:
        block = model.get_submodule(name)
        block.forward = functools.partial(remat.checkpoint, block.forward)
    try:
        with MemoryTracker(module=model, count_existing=[model, *inputs]) as mt:
            out = model(*inputs)
            forward_peak = mt.peak_bytes
            loss = out.float().sum()
            del out
            loss.backward()
            del loss
    finally:
        for name in checkpointed:
            del model.get_submodule(name).forward
    grad_bytes = sum(p.grad.untyped_storage().nbytes() for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return {
        "forward_peak_bytes": forward_peak,
        "peak_bytes": mt.peak_bytes,
        "saved_bytes": mt.saved_bytes,
        "saved_bytes_by_module": mt.saved_bytes_by_module,
        "peak_by_module": mt.peak_by_module,
        "grad_bytes": grad_bytes,
    }


@pytest.mark.parametrize("with_checkpoint", [False, True], ids=["plain", "blocks-checkpointed"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_estimate_equals_cpu_tracker(name: str, with_checkpoint: bool) -> None:
    sizes = dict(SMALL[name])
    w = build_workload(name, batch=sizes.pop("batch"), **sizes)
    names = list(w.blocks[:-1]) if with_checkpoint else []
    expected = cpu_step(w.model, w.inputs, names)
    report = estimate(w.model, *w.inputs, checkpoint_modules=names or None)
    got = {k: getattr(report, k) for k in expected}
    assert got == expected
    params = sum(p.numel() * p.element_size() for p in w.model.parameters())
    assert report.param_bytes == report.grad_bytes == params
    assert report.checkpointed == tuple(names)


def test_checkpoint_lowers_saved_bytes_to_block_inputs() -> None:
    w = build_workload("mlp", **SMALL["mlp"])
    plain = estimate(w.model, *w.inputs)
    ckpt = estimate(w.model, *w.inputs, checkpoint_modules=lambda m, n: n in ("block1", "block2"))
    x_bytes = w.inputs[0].numel() * 4
    assert ckpt.saved_bytes_by_module["block1"] == x_bytes
    assert ckpt.saved_bytes_by_module["block2"] == 16 * 70 * 4  # block1's output
    assert ckpt.saved_bytes < plain.saved_bytes
    assert ckpt.forward_peak_bytes < plain.forward_peak_bytes


def test_model_is_left_untouched() -> None:
    w = build_workload("mlp", **SMALL["mlp"])
    before = copy.deepcopy(w.model.state_dict())
    estimate(w.model, *w.inputs, checkpoint_modules=["block1"])
    assert all(p.grad is None and p.device.type == "cpu" for p in w.model.parameters())
    assert "forward" not in w.model.block1.__dict__
    for k, v in w.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_shapes_and_meta_models_give_the_same_report() -> None:
    w = build_workload("mlp", **SMALL["mlp"])
    ref = estimate(w.model, *w.inputs).to_dict()
    assert estimate(w.model, (16, 300)).to_dict() == ref
    assert estimate(w.model, torch.Size([16, 300])).to_dict() == ref
    meta = copy.deepcopy(w.model).to("meta")
    assert estimate(meta, torch.empty(16, 300, device="meta")).to_dict() == ref


def test_report_prints_and_serialises() -> None:
    w = build_workload("mlp", **SMALL["mlp"])
    report = estimate(w.model, *w.inputs, timeline=True)
    assert "step peak (new bytes)" in str(report) and "GiB" not in str(report)
    assert f"{report.peak_bytes:,}" in str(report)
    # the step's peak is the profile's: new bytes, parameters and inputs excluded
    prof = remat.profile(w.model, *w.inputs, loss_fn=lambda out: out.sum(), repeats=1)
    assert report.step_peak_bytes == prof.step_peak_bytes
    assert '"saved_bytes"' in report.to_json()
    assert {e.phase for e in report.timeline} == {"forward", "backward"}


def test_bad_input_names_the_problem() -> None:
    w = build_workload("mlp", **SMALL["mlp"])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        estimate("mlp", (16, 300))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no module 'block9'"):
        estimate(w.model, *w.inputs, checkpoint_modules=["block9"])
    with pytest.raises(TypeError, match=r"inputs\[0\] must be a tensor or a shape"):
        estimate(w.model, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="different devices"):
        estimate(nn.Bilinear(2, 2, 2), torch.ones(1, 2), torch.ones(1, 2, device="meta"))
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        estimate(w.model, *w.inputs, loss_fn=lambda out: out)


def test_llama_checkpointing_every_decoder_layer() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=64,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    ids = torch.zeros(2, 32, dtype=torch.long, device="meta")
    plain = estimate(model, ids, use_cache=False)
    layers = [f"model.layers.{i}" for i in range(3)]
    ckpt = estimate(model, ids, use_cache=False, checkpoint_modules=layers)
    hidden = 2 * 32 * 64 * 4
    saved = [ckpt.saved_bytes_by_module[n] for n in layers]
    assert saved[0] == saved[1] == saved[2] >= hidden  # each layer holds only its inputs
    assert all(s < plain.saved_bytes_by_module[n] for s, n in zip(saved, layers))
    assert plain.param_bytes == ckpt.param_bytes == plain.grad_bytes
    assert plain.param_bytes == sum(p.numel() * 4 for p in model.parameters())


def test_policy_gives_the_same_report_as_the_module_list() -> None:
    import remat

    sizes = dict(SMALL["gpt"])
    w = build_workload("gpt", batch=sizes.pop("batch"), **sizes)
    by_names = estimate(w.model, *w.inputs, checkpoint_modules=list(w.blocks))
    by_policy = estimate(w.model, *w.inputs, policy=remat.every(1))
    assert by_policy.peak_bytes == by_names.peak_bytes
    assert by_policy.saved_bytes == by_names.saved_bytes
    assert by_policy.checkpointed == tuple(w.blocks)
    assert remat.applied(w.model) == {}  # applied for the estimate only
    with pytest.raises(ValueError, match="either policy= or checkpoint_modules="):
        estimate(w.model, *w.inputs, policy=remat.every(1), checkpoint_modules=["blocks.0"])
