"""Hugging Face causal language models with random weights, as ``remat bench`` workloads.

``hf:<arch>`` names a ``transformers`` model type (``gpt2``, ``llama``, ``mistral``,
``qwen2``...). The model is built from that architecture's default config with small sizes,
so a CPU benchmark takes seconds; the size flags override them. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from remat.bench.workloads import Workload
from remat.errors import MissingExtraError

# Small enough for a CPU run in seconds, large enough that activations dominate memory.
HF_DEFAULT_SIZES = {"n_layers": 4, "d_model": 256, "n_heads": 4, "seq_len": 256, "vocab_size": 2048}
HF_DEFAULT_BATCH = 8


def _require_transformers() -> None:
    if importlib.util.find_spec("transformers") is None:
        raise MissingExtraError("hf:<arch> models need transformers: pip install 'remat[hf]'")


def is_config_path(arch: str) -> bool:
    """``hf:./config.json`` (or a folder holding one) rather than a model type."""
    return arch.endswith(".json") or os.sep in arch or arch.startswith(".")


def _config_file(arch: str) -> str:
    return os.path.join(arch, "config.json") if os.path.isdir(arch) else arch


def check_arch(arch: str) -> None:
    """Raise unless ``arch`` is a transformers model type (the message lists a few) or a local
    ``config.json`` naming one."""
    _require_transformers()
    from transformers import CONFIG_MAPPING

    if is_config_path(arch):
        path = _config_file(arch)
        try:
            with open(path) as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f"hf:{arch}: cannot read a config from {path} ({err})") from None
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"hf:{arch}: {path} names no known model_type ({model_type!r})")
        return
    if arch not in CONFIG_MAPPING:
        raise ValueError(
            f"unknown Hugging Face architecture {arch!r}; use a transformers model type such as "
            "gpt2, llama, mistral, qwen2 (any key of transformers.CONFIG_MAPPING), or a local "
            "config.json (hf:./config.json)"
        )


def _lm_loss(output: Any, targets: Tensor) -> Tensor:
    logits = output.logits  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _sizes_of(config: Any) -> dict[str, int]:
    """A config's sizes under the size flags' names (a local config.json's defaults)."""
    return {
        "n_layers": config.num_hidden_layers,
        "d_model": config.hidden_size,
        "n_heads": config.num_attention_heads,
        "seq_len": min(HF_DEFAULT_SIZES["seq_len"], config.max_position_embeddings),
        "vocab_size": config.vocab_size,
    }


def _read_config_file(arch: str) -> tuple[str, dict[str, Any], Any]:
    """(model type, the file's other fields, its transformers config)."""
    from transformers import AutoConfig

    with open(_config_file(arch)) as f:
        fields = json.load(f)
    model_type = fields.pop("model_type")
    return model_type, fields, AutoConfig.for_model(model_type, **fields)


def config_file_sizes(arch: str) -> dict[str, int]:
    """The sizes a local ``config.json`` builds with, under the size flags' names."""
    return _sizes_of(_read_config_file(arch)[2])


def _layer_names(model: nn.Module) -> tuple[str, ...]:
    """The transformer layers: the children of the longest ``nn.ModuleList``."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return ()
    name, layers = max(lists, key=lambda nm: len(nm[1]))
    return tuple(f"{name}.{i}" for i in range(len(layers)))


def build_hf_workload(
    arch: str,
    *,
    batch: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    **sizes: int,
) -> Workload:
    """A randomly initialised ``AutoModelForCausalLM`` of type ``arch`` with LM inputs.

    Args:
        arch: transformers model type, e.g. ``"gpt2"`` or ``"llama"``, or the path of a local
            ``config.json`` (its sizes are kept unless ``sizes`` override them); weights are
            never downloaded.
        batch: batch size (default 8).
        device: where the model and data live.
        dtype: parameter dtype.
        seed: seeds weights and data.
        config: further config fields (``{"num_key_value_heads": 8}``), applied last.
        **sizes: ``n_layers``, ``d_model``, ``n_heads``, ``seq_len``, ``vocab_size``
            overriding :data:`HF_DEFAULT_SIZES` (for a model type) or the file's sizes.

    Returns:
        A :class:`~remat.bench.workloads.Workload` whose blocks are the transformer layers.

    Raises:
        MissingExtraError: transformers is not installed.
        ValueError: unknown architecture or size option.
    """
    check_arch(arch)
    from transformers import AutoConfig, AutoModelForCausalLM

    unknown = set(sizes) - set(HF_DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"hf:{arch}: unknown size options {sorted(unknown)}")
    from_file = is_config_path(arch)
    if from_file:  # the file's sizes, where the flags do not say otherwise
        model_type, fields, default = _read_config_file(arch)
        s = {**_sizes_of(default), **sizes}
    else:
        model_type, fields = arch, {}
        default = AutoConfig.for_model(arch)
        s = {**HF_DEFAULT_SIZES, **sizes}
    if s["d_model"] % s["n_heads"]:
        raise ValueError(
            f"hf:{arch}: d_model={s['d_model']} not divisible by n_heads={s['n_heads']}"
        )
    batch = HF_DEFAULT_BATCH if batch is None else batch
    # Standard config names; each config's attribute_map translates (gpt2: n_embd, n_layer...).
    # Passing them to the constructor lets it derive the rest (llama's head_dim).
    # A file's model keeps its position table; a model type gets one as long as the inputs.
    positions = max(s["seq_len"], default.max_position_embeddings) if from_file else s["seq_len"]
    overrides: dict[str, Any] = {
        "hidden_size": s["d_model"],
        "num_hidden_layers": s["n_layers"],
        "num_attention_heads": s["n_heads"],
        "max_position_embeddings": positions,
        "vocab_size": s["vocab_size"],
        "use_cache": False,
    }
    if not from_file:
        if hasattr(default, "num_key_value_heads"):
            overrides["num_key_value_heads"] = s["n_heads"]
        if hasattr(default, "intermediate_size"):
            overrides["intermediate_size"] = 4 * s["d_model"]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            # Default special tokens lie outside the small vocabulary.
            if isinstance(getattr(default, key, None), int):
                overrides[key] = 0
    model_config = AutoConfig.for_model(model_type, **{**fields, **overrides, **(config or {})})
    # On meta the model is built there (a 70B-shaped one in seconds, nothing allocated)
    on_meta = torch.device(device).type == "meta"
    with torch.random.fork_rng(devices=[]), torch.device("meta" if on_meta else "cpu"):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(model_config)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, s["vocab_size"], (batch, s["seq_len"]), generator=gen)  # (B, T)
    targets = torch.randint(0, s["vocab_size"], (batch, s["seq_len"]), generator=gen)
    model = model.to(device=device, dtype=dtype)
    return Workload(
        name=f"hf:{arch}",
        model=model,
        inputs=(idx.to(device),),
        targets=targets.to(device),
        loss_fn=_lm_loss,
        blocks=_layer_names(model),
    )
