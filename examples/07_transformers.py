"""Checkpoint a transformers model the two ways its users train it, and measure the bytes.

1. A raw training loop: ``remat.autoplan(model, budget="50%", **batch)`` profiles the model
   on the batch a training step gets (``labels`` give its own loss; the KV cache, on by
   default in train mode, is left to remat), plans, applies, and measures the plan's peak.
2. ``Trainer``: ``hf.enable(model)`` makes remat the model's own gradient-checkpointing
   function, so ``TrainingArguments(activation_checkpointing=True)`` (``gradient_checkpointing``
   in transformers 4.x) runs on remat.

Both are checked against the un-checkpointed model: loss and gradients bit for bit. A small
Llama from a config (random weights, nothing downloaded), float32 on the CPU.

Run: ``python examples/07_transformers.py`` (needs the ``hf`` extra: ``pip install 'remat[hf]'``).
"""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import remat
from remat.integrations import hf

B, T = 8, 128


def build() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    return LlamaForCausalLM(config).train()


def step(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> tuple[int, list]:
    """Peak new bytes of one training step (MemoryTracker), and the gradients."""
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    with remat.MemoryTracker(count_existing=[model, *batch.values()]) as tracker:
        model(**batch).loss.backward()
    existing = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *batch.values()])
    return tracker.peak_bytes - existing, [p.grad for p in model.parameters()]


def main() -> None:
    ids = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    reference = build()
    peak_none, grads_none = step(reference, batch)
    print(f"no checkpointing:   step peak {peak_none:>12,} B")

    model = build()
    result = remat.autoplan(model, budget="50%", **batch)  # 1. a raw training loop
    peak, grads = step(model, batch)
    print(f"remat.autoplan 50%: step peak {peak:>12,} B (budget {result.budget_bytes:,} B)")
    print(result.plan)
    print("gradients bitwise equal:", all(torch.equal(a, b) for a, b in zip(grads, grads_none)))

    model = copy.deepcopy(reference)
    hf.enable(model)  # 2. Trainer(args=TrainingArguments(activation_checkpointing=True))
    peak, grads = step(model, batch)
    print(f"hf.enable:          step peak {peak:>12,} B (every layer recomputed)")
    print("gradients bitwise equal:", all(torch.equal(a, b) for a, b in zip(grads, grads_none)))


if __name__ == "__main__":
    main()
