"""Estimate a training step of a model that does not fit this machine: Llama 7B or 70B.

Builds a Hugging Face ``LlamaForCausalLM`` from a config with the real model's shapes on the
meta device (random weights never exist), then runs ``remat.estimate``: one forward and
backward under ``FakeTensorMode``, counting parameter, gradient and activation bytes exactly
as :class:`remat.MemoryTracker` would on a real device. Once without checkpointing and once
with every decoder layer checkpointed.

Attention is counted as this CPU build would run it (the math kernel, which saves the
attention matrix); flash attention on a GPU saves less.

Run: ``python examples/06_estimate_llama.py [--size 70b|7b] [--seq 4096]`` (needs the ``hf``
extra: ``pip install 'remat[hf]'``).
"""

from __future__ import annotations

import argparse
import time

import torch

import remat

SIZES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, intermediate_size=11008, vocab_size=32000),
    "70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, intermediate_size=28672, vocab_size=128256),
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="70b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SIZES[args.size], max_position_embeddings=args.seq)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    ids = torch.zeros(args.batch, args.seq, dtype=torch.long, device="meta")

    def decoder_layers(module: torch.nn.Module, fqn: str) -> bool:
        return type(module).__name__ == "LlamaDecoderLayer"

    for title, which in (("no checkpointing", None), ("every decoder layer", decoder_layers)):
        start = time.perf_counter()
        report = remat.estimate(model, ids, use_cache=False, checkpoint_modules=which)
        seconds = time.perf_counter() - start
        print(
            f"== Llama {args.size}, seq {args.seq}, batch {args.batch}: {title} ({seconds:.1f} s)"
        )
        print(report)
        print()


if __name__ == "__main__":
    main()
