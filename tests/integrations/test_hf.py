"""remat in transformers models: hf.enable (the model's own checkpoint hook) and remat.apply.

GPT-2 and Llama built from small configs (random weights, nothing downloaded), in train mode
with dropout. On CPU the recomputation runs the same kernels in the same order, so losses
and gradients are asserted bitwise (``rtol=0, atol=0``).
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import remat

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("remat.integrations.hf")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # noqa: E402

EXACT = {"rtol": 0.0, "atol": 0.0}
B, T, C, VOCAB = 2, 16, 64, 128
HEADS, KV_HEADS, FFN = 4, 2, 128
LAYERS = 2


def build(arch: str, attn: str = "eager") -> nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":  # dropout 0.1 in embeddings, attention and residuals by default
        config = GPT2Config(
            n_layer=LAYERS, n_embd=C, n_head=HEADS, vocab_size=VOCAB, n_positions=64,
            bos_token_id=0, eos_token_id=0, attn_implementation=attn,
        )  # fmt: skip
        return GPT2LMHeadModel(config).train()
    config = LlamaConfig(
        hidden_size=C, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=VOCAB, attention_dropout=0.1,
        attn_implementation=attn,
    )  # fmt: skip
    return LlamaForCausalLM(config).train()


def layers_of(model: nn.Module) -> nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


IDS = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))


def train_step(model: nn.Module, **call_kwargs):
    """(loss, grads by name, saved bytes, saved bytes per module, live bytes after forward)."""
    torch.manual_seed(5)  # same dropout masks in every model
    model.zero_grad(set_to_none=True)
    with remat.MemoryTracker(module=model) as tracker:
        loss = model(input_ids=IDS, labels=IDS, **call_kwargs).loss
    live = tracker.current_bytes
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, tracker.saved_bytes, tracker.saved_bytes_by_module, live


def torch_checkpointing_enable(model: nn.Module, kwargs: dict | None = None) -> None:
    """transformers' own checkpointing (torch.utils.checkpoint), by its 5.x or 4.x name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


MODELS = [("gpt2", "eager"), ("gpt2", "sdpa"), ("llama", "eager"), ("llama", "sdpa")]
POLICIES = {
    "default": lambda: None,
    "function-engine": lambda: remat.recompute(engine="function"),
    "save-matmuls": lambda: remat.ops("save-matmuls"),
    "save-matmuls-tape": lambda: remat.ops("save-matmuls", engine="tape"),
    "every2": lambda: remat.every(2),
    "by_type-ops": lambda: remat.by_name("*.1") & remat.ops("save-matmuls"),
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize(("arch", "attn"), MODELS)
def test_enable_gradients_equal_uncheckpointed(arch, attn, policy):
    reference = build(arch, attn)
    model = copy.deepcopy(reference)
    assert hf.enable(model, POLICIES[policy]()) is model
    assert checkpointing_on(model)
    loss_ref, grads_ref, *_ = train_step(reference)
    loss, grads, *_ = train_step(model)
    torch.testing.assert_close(loss, loss_ref, **EXACT)
    torch.testing.assert_close(grads, grads_ref, **EXACT)
    assert all(g is not None for g in grads.values())


def _layer_inputs(model: nn.Module) -> list[tuple[int, int]]:
    """Per layer: (bytes of its positional tensor inputs, bytes of all its tensor inputs).

    Unique storages, recorded by a forward pre-hook on an un-checkpointed model.
    """
    found = []

    def hook(module, args, kwargs):
        def nbytes(values):
            storages = {
                t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in values
                if isinstance(t, torch.Tensor)
            }
            return sum(storages.values())

        flat_kwargs = torch.utils._pytree.tree_leaves(kwargs)
        found.append((nbytes(args), nbytes([*args, *flat_kwargs])))

    handles = [
        layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers_of(model)
    ]
    train_step(model, use_cache=False)
    for handle in handles:
        handle.remove()
    return found


@pytest.mark.parametrize(("arch", "attn"), MODELS)
def test_enable_keeps_only_layer_inputs(arch, attn):
    reference = build(arch, attn)
    inputs = _layer_inputs(copy.deepcopy(reference))
    *_, saved_none, by_module_none, _ = train_step(reference)
    model = copy.deepcopy(reference)
    hf.enable(model)
    *_, saved, by_module, _ = train_step(model)
    torch_ckpt = copy.deepcopy(reference)
    torch_checkpointing_enable(torch_ckpt, {"use_reentrant": False})
    *_, saved_torch, by_module_torch, _ = train_step(torch_ckpt)
    prefix = "transformer.h" if arch == "gpt2" else "model.layers"
    names = [f"{prefix}.{i}" for i in range(LAYERS)]
    for name, (positional, everything) in zip(names, inputs):
        # remat saves every tensor the layer receives; torch.utils.checkpoint saves the
        # positional ones and keeps the keyword ones (mask, rotary cos/sin) alive in a closure.
        assert by_module[name] == everything
        assert by_module_torch[name] == positional
        assert by_module_none[name] > 4 * everything
    assert positional >= B * T * C * 4  # the hidden states at least
    assert saved < saved_none / 4
    keyword_only = sum(everything - positional for positional, everything in inputs)
    assert saved_torch <= saved <= saved_torch + keyword_only


def test_save_matmuls_keeps_matmul_outputs_llama():
    full, selective = build("llama"), build("llama")
    hf.enable(full)
    hf.enable(selective, remat.ops("save-matmuls"))
    *_, live_full = train_step(full)
    *_, live_selective = train_step(selective)
    head_dim = C // HEADS
    per_layer = 4 * (
        B * T * (C + 2 * KV_HEADS * head_dim + C)  # q, k, v, o projections (mm)
        + B * T * (2 * FFN + C)  # gate, up, down projections (mm)
        + B * HEADS * T * T  # eager attention scores (bmm)
        + B * HEADS * T * head_dim  # attention @ values (bmm)
    )
    assert live_selective - live_full == LAYERS * per_layer


def test_every2_checkpoints_only_selected_layers():
    model = build("llama")
    *_, by_none, _ = train_step(copy.deepcopy(model))
    hf.enable(model, remat.every(2))
    *_, by_module, _ = train_step(model)
    assert by_module["model.layers.0"] < by_none["model.layers.0"] / 4
    assert by_module["model.layers.1"] == by_none["model.layers.1"]


def test_plain_apply_path_with_checkpointing_flag_off():
    reference = build("llama")
    model = copy.deepcopy(reference)
    remat.apply(model, remat.by_type(LlamaDecoderLayer))
    assert not checkpointing_on(model)
    assert set(remat.applied(model)) == {"model.layers.0", "model.layers.1"}
    loss_ref, grads_ref, *_ = train_step(reference, use_cache=False)
    loss, grads, _, by_module, _ = train_step(model, use_cache=False)
    torch.testing.assert_close(loss, loss_ref, **EXACT)
    torch.testing.assert_close(grads, grads_ref, **EXACT)
    inputs = _layer_inputs(copy.deepcopy(reference))
    assert by_module["model.layers.0"] == inputs[0][1]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "treatment",
    [remat.recompute(), remat.recompute(engine="function"), remat.ops("save-matmuls")],
    ids=["hooks", "function", "ops-replay"],
)
def test_kv_cache_is_appended_to_once(attn, treatment):
    """transformers' default (``use_cache`` on in train mode) under remat.apply: the forward
    appends to the cache; the recomputation runs on a copy of the cache as it was, so the
    cache ends as without remat and attention sees the same positions."""
    reference = build("llama", attn)
    model = copy.deepcopy(reference)
    remat.apply(model, remat.by_type(LlamaDecoderLayer) & treatment)
    outputs = []
    for m in (reference, model):
        torch.manual_seed(5)
        m.zero_grad(set_to_none=True)
        out = m(input_ids=IDS, labels=IDS, use_cache=True)
        out.loss.backward()
        outputs.append((out, {n: p.grad for n, p in m.named_parameters()}))
    (want, want_grads), (got, got_grads) = outputs
    torch.testing.assert_close(got.loss, want.loss, **EXACT)
    torch.testing.assert_close(got_grads, want_grads, **EXACT)
    cache, want_cache = got.past_key_values, want.past_key_values
    assert cache.get_seq_length() == want_cache.get_seq_length() == T
    for layer, want_layer in zip(cache.layers, want_cache.layers):
        torch.testing.assert_close(layer.keys, want_layer.keys, **EXACT)


def test_trainer_entry_points_install_remat_not_torch(monkeypatch):
    reference = build("gpt2")
    model = copy.deepcopy(reference)
    hf.enable(model)
    # What Trainer(activation_checkpointing=True) and PEFT call after the model is built:
    monkeypatch.setattr(hf, "_warned", set())
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:  # transformers 4.x: Trainer calls gradient_checkpointing_enable
        enable = functools.partial(_v4_enable, model)
    with pytest.warns(UserWarning, match="use_reentrant=True is ignored"):
        enable(
            activation_checkpointing_kwargs={"use_reentrant": True, "preserve_rng_state": True},
            every_n_layers=2,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning through remat's entry point
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=2
        )
    for layer in model.transformer.h:
        assert isinstance(layer._gradient_checkpointing_func, hf.HFCheckpointFunction)
    assert [layer.gradient_checkpointing for layer in model.transformer.h] == [True, False]
    loss_ref, grads_ref, *_ = train_step(reference)
    loss, grads, _, by_module, _ = train_step(model)
    torch.testing.assert_close((loss, grads), (loss_ref, grads_ref), **EXACT)
    assert by_module["transformer.h.0"] < by_module["transformer.h.1"] / 4
    with pytest.raises(TypeError, match="'context_fn'.*remat.ops"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"context_fn": None})
    # transformers' offload=True: checkpoint, and offload what the checkpoint keeps.
    enable(offload=True)
    assert set(remat.applied(model).values()) == {"offload+recompute"}
    loss, grads, *_ = train_step(model)
    torch.testing.assert_close((loss, grads), (loss_ref, grads_ref), **EXACT)


def _v4_enable(model, activation_checkpointing_kwargs=None, **kwargs):
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs
    )


def test_checkpoint_function_accepts_torch_kwargs():
    model = build("gpt2")
    hf.enable(model)
    function = model.transformer.h[0]._gradient_checkpointing_func
    layer = model.transformer.h[1]
    x = torch.randn(B, T, C, requires_grad=True)
    call = functools.partial(type(layer).forward.__wrapped__, layer)
    out = function(call, x, use_reentrant=False, determinism_check="default", debug=False)[0]
    out.sum().backward()
    assert x.grad is not None
    with pytest.raises(TypeError, match="'bogus'"):
        function(call, x, bogus=1)
    with pytest.raises(TypeError, match="'early_stop'.*'ops'"):
        hf.HFCheckpointFunction(remat.ops("save-matmuls"))(call, x, early_stop=False)


def test_disable_restores_transformers_defaults():
    model = build("llama")
    keys = list(model.state_dict())
    *_, saved_none, _, _ = train_step(copy.deepcopy(model))
    hf.enable(model, remat.every(2))
    assert hf.is_enabled(model)
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)  # enabled state survives a deep copy
    assert hf.is_enabled(clone) and clone.model.layers[0].__dict__.get(hf._SELECTED)
    assert hf.disable(model) is model
    assert not hf.is_enabled(model) and not checkpointing_on(model)
    assert "gradient_checkpointing_enable" not in model.__dict__
    assert not any(hf._SELECTED in m.__dict__ for m in model.modules())
    *_, saved, _, _ = train_step(model)
    assert saved == saved_none
    hf.disable(model)  # twice: nothing to undo
    torch_checkpointing_enable(model)  # transformers' own again: torch.utils.checkpoint
    func = model.model.layers[0]._gradient_checkpointing_func
    assert not isinstance(func, hf.HFCheckpointFunction)


def test_bad_input_names_the_problem():
    with pytest.raises(remat.RematError, match="no transformers gradient-checkpointing hook"):
        hf.enable(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        hf.enable("gpt2")
    with pytest.raises(ValueError, match=r"q_proj' \(Linear\) is not a checkpointable"):
        hf.enable(build("llama"), remat.by_type(nn.Linear))
    with pytest.raises(remat.PlanError, match="selected no layer"):
        hf.enable(build("llama"), remat.by_name("nothing.*"))
    with pytest.raises(TypeError, match="only apply without a treatment"):
        hf.enable(build("llama"), remat.ops("save-matmuls"), engine="function")
    with pytest.raises(TypeError, match="unknown option"):
        hf.enable(build("llama"), engine_="hooks")
    applied = remat.apply(build("llama"), remat.by_type(LlamaDecoderLayer))
    with pytest.raises(ValueError, match="remat.apply already wraps"):
        hf.enable(applied)

    class OldFormatGPT2(GPT2LMHeadModel):
        # transformers < 4.35 models override the hook in this form
        def _set_gradient_checkpointing(self, module, value=False):
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = value

    old = OldFormatGPT2(build("gpt2").config)
    with pytest.raises(remat.RematError, match="pre-4.35 checkpointing format"):
        hf.enable(old)


def test_options_configure_the_default_recompute():
    reference = build("gpt2")
    model = copy.deepcopy(reference)
    hf.enable(model, remat.every(2), engine="function", determinism_check="values")
    treatment = model.transformer.h[0]._gradient_checkpointing_func.treatment
    assert treatment == remat.recompute(engine="function", determinism_check="values")
    torch.testing.assert_close(train_step(model)[:2], train_step(reference)[:2], **EXACT)


def test_peft_lora_trains_through_remat():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    reference = peft.get_peft_model(build("llama"), config)
    base = build("llama")
    hf.enable(base)
    # PEFT's preparation calls the model's gradient_checkpointing_enable: remat stays.
    peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    model = peft.get_peft_model(base, config)
    assert hf.is_enabled(model)
    layer = model.get_base_model().model.layers[0]
    assert isinstance(layer._gradient_checkpointing_func, hf.HFCheckpointFunction)
    assert layer.gradient_checkpointing
    loss_ref, grads_ref, saved_ref, *_ = train_step(reference)
    loss, grads, saved, *_ = train_step(model)
    assert saved < saved_ref / 4  # the layers really were checkpointed
    lora = {n: g for n, g in grads.items() if "lora_" in n}
    assert len(lora) == 4 * LAYERS and all(g is not None for g in lora.values())
    torch.testing.assert_close(loss, loss_ref, **EXACT)
    torch.testing.assert_close(lora, {n: grads_ref[n] for n in lora}, **EXACT)


def test_trainer_with_activation_checkpointing_trains_on_remat(tmp_path):
    pytest.importorskip("accelerate")  # Trainer needs it
    import inspect

    from transformers import Trainer, TrainingArguments

    reference = build("llama")
    model = copy.deepcopy(reference)
    hf.enable(model)
    data = [{"input_ids": IDS[i], "labels": IDS[i]} for i in range(B)] * 2
    params = inspect.signature(TrainingArguments).parameters
    flag = (
        "activation_checkpointing"
        if "activation_checkpointing" in params
        else ("gradient_checkpointing")
    )

    def train(m, checkpointing):
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=B, seed=0,
            report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
            disable_tqdm=True, dataloader_num_workers=0, **{flag: checkpointing},
        )  # fmt: skip
        Trainer(model=m, args=args, train_dataset=data).train()
        return {n: p.detach() for n, p in m.named_parameters()}

    before = model.lm_head.weight.detach().clone()
    expected = train(reference, False)
    got = train(model, True)  # Trainer calls the model's checkpointing entry point
    layer = model.model.layers[0]
    assert isinstance(layer._gradient_checkpointing_func, hf.HFCheckpointFunction)
    assert layer.gradient_checkpointing
    assert not torch.equal(got["lm_head.weight"], before)
    torch.testing.assert_close(got, expected, **EXACT)  # two AdamW steps, same dropout


@pytest.mark.parametrize("when", ["before get_peft_model", "on the PeftModel"])
def test_peft_model_enabled_either_way_trains_through_trainer_on_remat(when, tmp_path, monkeypatch):
    """hf.enable on the PeftModel (or on its base before wrapping), then Trainer with
    checkpointing on, as users do: the layers recompute on remat's engine, exactly."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    import inspect

    from transformers import Trainer, TrainingArguments

    from remat.engine.hooks import Frame

    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    reference = peft.get_peft_model(build("llama"), config)
    base = build("llama")
    if when == "before get_peft_model":
        hf.enable(base)
        model = peft.get_peft_model(base, config)
    else:
        model = peft.get_peft_model(base, config)
        hf.enable(model)
    assert hf.is_enabled(model)
    assert set(remat.applied(model)) == {f"base_model.model.model.layers.{i}" for i in range(2)}
    recomputed = []
    original = Frame.recompute

    def counting(frame, gid):
        recomputed.append(frame.region)
        return original(frame, gid)

    monkeypatch.setattr(Frame, "recompute", counting)
    data = [{"input_ids": IDS[i], "labels": IDS[i]} for i in range(B)] * 2
    params = inspect.signature(TrainingArguments).parameters
    flag = (
        "activation_checkpointing"
        if "activation_checkpointing" in params
        else "gradient_checkpointing"
    )

    def train(m, checkpointing):
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=B, seed=0,
            report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
            disable_tqdm=True, dataloader_num_workers=0, **{flag: checkpointing},
        )  # fmt: skip
        Trainer(model=m, args=args, train_dataset=data).train()
        return {n: p.detach() for n, p in m.named_parameters() if "lora_" in n}

    expected = train(reference, False)
    assert not recomputed
    got = train(model, True)
    assert len(recomputed) == 2 * LAYERS  # two steps, every layer recomputed once a step
    assert all("model.layers" in region for region in recomputed)
    torch.testing.assert_close(got, expected, **EXACT)
    model.gradient_checkpointing_disable()
    assert not hf.is_enabled(model) and not remat.applied(model)
