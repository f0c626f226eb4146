"""The ``remat`` command's help: its description, each command's epilog (the examples
``tests/test_cli.py`` runs), and the model options' help."""

from __future__ import annotations

__all__ = [
    "BENCH_EPILOG",
    "DESCRIPTION",
    "FIT_EPILOG",
    "HEADROOM_DEFAULT",
    "MAIN_EPILOG",
    "MODEL_HELP",
    "PLAN_EPILOG",
    "SIZE_FLAGS",
    "SIZE_HELP",
]

DESCRIPTION = "remat: activation checkpointing for PyTorch, measured."

MAIN_EPILOG = """\
examples:
  remat bench                                    the tutorial's MLP, every configuration
  remat bench --model gpt --layers 6             a GPT-style stack
  remat bench --json out/bench.json --plot out/bench.png
  remat bench --help                             all options of the benchmark
  remat plan --model gpt --budget 40% --verify   the cheapest plan for a budget, checked
  remat fit --model gpt --target h100            the largest batch that fits an H100, its plan
"""

FIT_EPILOG = """\
examples:
  remat fit --model gpt --layers 2 --d-model 64 --seq-len 64 --budget 30MB
  remat fit --model gpt --layers 2 --d-model 64 --seq-len auto --budget 30MB --plot fit.png
  remat fit --model gpt --layers 24 --dtype bfloat16 --target h100 --world-size 8

exit status: 0 when some size fits, 1 when none does, 2 for bad arguments.
"""

BENCH_EPILOG = """\
configurations (--configs, comma-separated; none always runs, as the reference):
{configs}

examples:
  remat bench
  remat bench --configs remat,all-blocks --steps 10
  remat bench --model gpt --layers 4 --d-model 128 --seq-len 128 --batch 4
  remat bench --model hf:gpt2 --json gpt2.json --plot gpt2.png
  remat bench --model convnet --device cuda --dtype bfloat16
  remat bench --configs tutorial-reentrant      shows the reentrant bug: exits 1
  remat bench --model examples/08_my_model.py:build --model-arg layers=6
  remat bench --model hf:./config.json --model-arg num_key_value_heads=2 --configs remat
  remat bench --model examples/08_my_model.py:build --configs remat,plan:plan.json

exit status: 0 when every configuration matches none's loss and gradients (a configuration
that runs out of memory, or an auto:<budget> no plan meets, is a result, not a failure); 1
when one differs (FAIL) or its worker crashed, naming it; 2 for bad arguments.
"""

PLAN_EPILOG = """\
examples:
  remat plan --model gpt --budget 40%
  remat plan --model gpt --layers 48 --budget 2GiB --json plan.json
  remat plan --model gpt --budget 45% --solver sqrt --verify
  remat plan --model gpt --budget 50% --compile --verify
  remat plan --model examples/08_my_model.py:build --budget 50% --verify --json plan.json
  remat plan --model gpt --layers 24 --device meta --target h100 --budget 40%
  remat plan --model gpt --dtype bfloat16 --device meta --target l4 --optimizer adamw --budget 1GB
  remat plan --target list

exit status: 0 when a plan fits (and, with --verify, its measured peak fits and its gradients
equal the un-checkpointed model's); 1 when no plan fits or the check fails; 2 for bad
arguments.
"""

MODEL_HELP = (
    "{default}; also mlp, gpt, convnet; hf:<arch> (a transformers model type: hf:gpt2, "
    "hf:llama) or hf:./config.json; your own: path/to/file.py:factory or "
    "package.module:factory, where factory(**model_args) returns (model, inputs[, loss_fn])"
)

SIZE_FLAGS = {  # flag -> size option of GPTConfig (and of hf:<arch> models)
    "layers": "n_layers",
    "d_model": "d_model",
    "heads": "n_heads",
    "seq_len": "seq_len",
    "vocab": "vocab_size",
}
SIZE_HELP = {  # defaults: GPTConfig's, then remat.bench.hf_workloads.HF_DEFAULT_SIZES
    "layers": "blocks (gpt 12, hf 4)",
    "d_model": "width (gpt 256, hf 256)",
    "heads": "attention heads (gpt 8, hf 4)",
    "seq_len": "sequence length (gpt 256, hf 256)",
    "vocab": "vocabulary size (gpt 1024, hf 2048)",
}

HEADROOM_DEFAULT = (  # argparse help: % doubled
    "default on a GPU: 0.5 GB CUDA context, 0.5 GB NCCL with several ranks and 5%% for the "
    "allocator; 0 on the CPU"
)
