"""The tiny models the tests share (imported as ``from conftest import tiny_gpt``), and the
check that every plan of a profile measures its predicted peak to the byte.

Byte-exact tests depend on their sizes, so every size is an argument: a test file passes
its own, and the defaults are the smallest GPT the engine tests use.
"""

from __future__ import annotations

import copy
import itertools
import shutil
from collections.abc import Sequence
from typing import Any

import pytest
import torch

import remat
from remat.bench.workloads import Workload, build_workload
from remat.profiling.step import measure_step_peak


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


def mean_square(out: Any) -> Any:
    """The loss the planner tests train with."""
    return out.square().mean()


def every_plan(n: int) -> list[list[str]]:
    """Every block-level plan of ``n`` regions: each stored or recomputed."""
    return [list(c) for c in itertools.product(["store", "recompute"], repeat=n)]


def assert_predicted_to_the_byte(
    model: Any, inputs: tuple[Any, ...], prof: Any, plans: Sequence[Sequence[str]]
) -> None:
    """Each plan (per region choices) applied to a copy of ``model`` measures its
    predicted step peak to the byte (loss: ``mean_square``)."""
    for choices in plans:
        plan = remat.plan_from_choices(prof, list(choices))
        m = copy.deepcopy(model)
        remat.apply_plan(m, plan)
        assert measure_step_peak(m, inputs, mean_square) == plan.predicted_peak_bytes, choices


# torch.compile's CPU backend (inductor) writes and builds C++.
NEEDS_COMPILER = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="inductor on CPU needs a C++ compiler",
)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters cleared around a compile test, and compiled dropout
    drawing from the eager RNG (``fallback_random``), so that masks match an eager run."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()
