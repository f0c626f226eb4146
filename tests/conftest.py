"""The tiny models the tests share (imported as ``from conftest import tiny_gpt``).

Byte-exact tests depend on their sizes, so every size is an argument: a test file passes
its own, and the defaults are the smallest GPT the engine tests use.
"""

from __future__ import annotations

from remat.bench.workloads import Workload, build_workload


def tiny_gpt(
    *,
    batch: int = 2,
    n_layers: int = 2,
    seq_len: int = 16,
    d_model: int = 32,
    n_heads: int = 4,
    vocab_size: int = 64,
    dropout: float = 0.0,
    **options: object,
) -> Workload:
    """A GPT-style stack (``remat.bench.workloads.GPT``) with its data, seeded; sizes as
    ``build_workload`` names them."""
    return build_workload(
        "gpt",
        batch=batch,
        n_layers=n_layers,
        seq_len=seq_len,
        d_model=d_model,
        n_heads=n_heads,
        vocab_size=vocab_size,
        dropout=dropout,
        **options,
    )
