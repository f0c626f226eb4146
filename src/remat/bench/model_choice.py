"""What ``--model`` names, checked before any worker starts and built inside each one: the
demo models (``mlp``, ``gpt``, ``convnet``), ``hf:<arch>`` or ``hf:./config.json``, and a
user's ``path/to/file.py:factory`` or ``package.module:factory``.
"""

from __future__ import annotations

from typing import Any

import torch

from remat.bench.hf_workloads import (
    HF_DEFAULT_SIZES,
    build_hf_workload,
    check_arch,
    config_file_sizes,
    is_config_path,
)
from remat.bench.user_models import build_user_workload, is_user_model, load_factory
from remat.bench.workloads import MODEL_NAMES, GPTConfig, Workload, build_workload

__all__ = [
    "DTYPES",
    "build_bench_workload",
    "check_model",
    "check_model_options",
    "check_sizes",
    "effective_sizes",
]
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def check_model(name: str) -> None:
    """Validate a ``--model`` value before any worker starts.

    Raises:
        ValueError: unknown model or Hugging Face architecture (the message lists valid ones).
        MissingExtraError: ``hf:<arch>`` without transformers installed.
    """
    if name in MODEL_NAMES:
        return
    if name.startswith("hf:"):
        check_arch(name[3:])
        return
    if is_user_model(name):
        load_factory(name)  # raises naming what is missing
        return
    raise ValueError(
        f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}, "
        "hf:<arch> (e.g. hf:gpt2, hf:llama, hf:./config.json), path/to/file.py:factory or "
        "package.module:factory"
    )


def check_sizes(model: str, sizes: dict[str, int]) -> None:
    """Raise ``ValueError`` for model sizes that cannot build, before any worker starts."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"size option {name}={value!r} must be a positive integer")
    if model == "gpt":
        defaults = {"d_model": GPTConfig.d_model, "n_heads": GPTConfig.n_heads}
    elif model.startswith("hf:") and not is_config_path(model[3:]):
        defaults = HF_DEFAULT_SIZES
    elif model.startswith("hf:"):
        return  # a config file's sizes are checked when it is built
    else:
        if sizes:
            raise ValueError(
                f"size options {sorted(sizes)} apply to gpt and hf:<arch>, not {model!r}"
            )
        return
    d_model, heads = (sizes.get(k, defaults[k]) for k in ("d_model", "n_heads"))
    if d_model % heads:
        raise ValueError(
            f"--d-model {d_model} is not divisible by --heads {heads}: every head gets "
            "d_model / heads features"
        )


def check_model_options(
    model: str, *, batch: int | None, sizes: dict[str, int], model_args: dict[str, Any]
) -> None:
    """Validate the options that go with ``--model`` before any worker or profile starts.

    Raises:
        ValueError: a size flag or ``--batch`` for a user factory (it makes its own inputs:
            pass ``--model-arg batch=N``), ``--model-arg`` for a built-in demo model, bad
            sizes.
    """
    check_sizes(model, sizes)
    if is_user_model(model) and batch is not None:
        raise ValueError(
            f"--batch applies to mlp, gpt, convnet and hf:<arch>, not {model!r}: the factory "
            "makes its own inputs (pass its option instead: --model-arg batch=N)"
        )
    if model_args and model in MODEL_NAMES:
        raise ValueError(
            f"--model-arg applies to hf:<arch> and file.py:factory models, not {model!r}"
        )


def effective_sizes(model: str, sizes: dict[str, int]) -> dict[str, int]:
    """The sizes a model is built with, the defaults (or a config file's) under the flags,
    for the JSON's environment; none for the mlp, convnet and user factories."""
    if model == "gpt":
        base = {k: getattr(GPTConfig, k) for k in ("n_layers", "d_model", "n_heads", "seq_len")}
        return {**base, "vocab_size": GPTConfig.vocab_size, **sizes}
    if model.startswith("hf:") and not is_config_path(model[3:]):
        return {**HF_DEFAULT_SIZES, **sizes}
    if model.startswith("hf:"):
        return {**config_file_sizes(model[3:]), **sizes}
    return dict(sizes)


def build_bench_workload(
    model: str,
    *,
    batch: int | None,
    device: str,
    dtype: str,
    seed: int,
    sizes: dict[str, int],
    model_args: dict[str, Any] | None = None,
) -> Workload:
    """Build the workload ``remat bench`` runs: a demo model, ``hf:<arch>`` (``model_args``
    are config fields) or a user's ``file.py:factory`` (``model_args`` are its options)."""
    model_args = model_args or {}
    if model.startswith("hf:"):
        return build_hf_workload(
            model[3:],
            batch=batch,
            device=device,
            dtype=DTYPES[dtype],
            seed=seed,
            config=model_args,
            **sizes,
        )
    if is_user_model(model):
        return build_user_workload(
            model, options=model_args, device=device, dtype=DTYPES[dtype], seed=seed
        )
    if model_args:
        raise ValueError(
            f"--model-arg applies to hf:<arch> and file.py:factory models, not {model!r}"
        )

    if sizes and model != "gpt":
        raise ValueError(f"size options {sorted(sizes)} apply to gpt and hf:<arch>, not {model!r}")
    return build_workload(
        model, batch=batch, device=device, dtype=DTYPES[dtype], seed=seed, **sizes
    )
