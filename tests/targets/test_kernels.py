"""On meta, dropout and attention keep what the target's kernels keep: CUDA's one-byte dropout
mask and flash attention's log-sum-exp, the CPU's flash kernel; real tensors are untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend

import remat
from remat.bench.megatron_layer import MegatronLayer, layer_input, paper_bytes
from remat.bench.workloads import build_workload
from remat.targets.devices import TARGETS
from remat.targets.kernels import cuda_sdpa_backend, target_kernels


@pytest.mark.parametrize("recompute_core", [False, True])
def test_a_megatron_layer_on_h100_holds_the_papers_bytes(recompute_core):
    """Korthikanti et al. 2022, s=2048, b=2, h=1024, a=16: within 5% on the target; the meta
    kernels (2-byte dropout masks) are off by 17.5% and 5.9%."""
    s, b, h, a = 2048, 2, 1024, 16
    with torch.device("meta"):
        layer = MegatronLayer(h, a).half()
    x = layer_input(s, b, h)
    core = ["core"] if recompute_core else None
    on_h100 = remat.estimate(layer, x, checkpoint_modules=core, target_device="h100")
    on_meta = remat.estimate(layer, x, checkpoint_modules=core)
    paper = paper_bytes(s, b, h, a, recompute_core)
    assert on_h100.saved_bytes / paper == pytest.approx(1.0, abs=0.05)
    # what remains is the LayerNorms' fp32 mean and rstd: 2 norms x 2 x 4 bytes x s x b
    assert on_h100.saved_bytes - paper == 16 * s * b
    mask_bytes = (a * s * s * b if not recompute_core else 0) + 2 * s * b * h
    assert on_meta.saved_bytes - on_h100.saved_bytes == mask_bytes


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_gpt_on_meta_for_the_cpu_keeps_the_cpus_bytes(dropout):
    """The CPU runs its flash kernel without dropout and math with it; meta matches both."""
    profiles = [
        remat.profile(w.model, *w.inputs, loss_fn=w.loss_of, target_device="cpu")
        for w in (
            build_workload("gpt", batch=2, device=d, n_layers=2, dropout=dropout)
            for d in ("cpu", "meta")
        )
    ]
    fields = ("input_bytes", "saved_bytes", "output_bytes", "transient_bytes", "input_saved")
    cpu, meta = profiles
    for rc, rm in zip(cpu.regions, meta.regions, strict=True):
        assert [getattr(rc, f) for f in fields] == [getattr(rm, f) for f in fields], rc.name
    assert (cpu.step_peak_bytes, cpu.tail_bytes) == (meta.step_peak_bytes, meta.tail_bytes)


class _Attention(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        # unused: it puts the model on meta, whose kernels run without a target
        self.anchor = nn.Parameter(torch.empty((), device="meta"))

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout)


def _qkv(dtype, d=64, b=2, heads=4, s=256):
    return [
        torch.empty(b, heads, s, d, dtype=dtype, device="meta", requires_grad=True)
        for _ in range(3)
    ]


def test_flash_attention_on_the_target_keeps_a_log_sum_exp_not_the_matrices():
    b, heads, s, d = 2, 4, 256, 64
    q, k, v = _qkv(torch.bfloat16, d, b, heads, s)
    flash = remat.estimate(_Attention(), q, k, v, target_device="h100").saved_bytes
    # q, k, v (inputs, kept), the output, a float32 log-sum-exp per row, the RNG seed and
    # offset (3 uint64)
    assert flash == 4 * b * heads * s * d * 2 + 4 * b * heads * s + 24
    math = remat.estimate(_Attention(), q, k, v).saved_bytes  # meta: the math kernel
    assert math > b * heads * s * s * 4  # a float32 s x s matrix at least


def test_the_cuda_backend_follows_pytorchs_rules():
    bf16, fp32 = _qkv(torch.bfloat16), _qkv(torch.float32)
    mask = torch.empty(256, 256, dtype=torch.bool, device="meta")
    assert cuda_sdpa_backend(*bf16) == SDPBackend.FLASH_ATTENTION
    assert cuda_sdpa_backend(*bf16, attn_mask=mask) == SDPBackend.EFFICIENT_ATTENTION
    assert cuda_sdpa_backend(*fp32) == SDPBackend.EFFICIENT_ATTENTION
    assert cuda_sdpa_backend(*_qkv(torch.float32, d=6)) == SDPBackend.MATH  # not aligned
    q = torch.empty(2, 8, 256, 64, dtype=torch.bfloat16, device="meta")
    kv = torch.empty(2, 2, 256, 64, dtype=torch.bfloat16, device="meta")
    assert cuda_sdpa_backend(q, kv, kv) == SDPBackend.FLASH_ATTENTION  # grouped-query


def test_math_attention_with_dropout_on_the_target_keeps_a_one_byte_mask():
    q, k, v = _qkv(torch.float32, d=6)  # the math kernel on CUDA too
    b, heads, s = 2, 4, 256
    on_gpu = remat.estimate(_Attention(0.1), q, k, v, target_device="h100").saved_bytes
    on_meta = remat.estimate(_Attention(0.1), q, k, v).saved_bytes
    assert on_meta - on_gpu == 3 * b * heads * s * s  # a float32 mask against a bool one


def test_tensors_with_data_run_their_own_kernels():
    x = torch.randn(64, 64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        plain = F.dropout(x, 0.5)
    with target_kernels(TARGETS["h100"]), torch.random.fork_rng():
        torch.manual_seed(0)
        swapped = F.dropout(x, 0.5)
        q = k = v = torch.randn(1, 2, 8, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(swapped, plain, rtol=0, atol=0)
    torch.testing.assert_close(attn, F.scaled_dot_product_attention(q, k, v))
    assert F.dropout.__module__ == "torch.nn.functional"  # put back


def test_a_meta_model_is_profiled_on_fake_tensors_with_inputs_from_the_cpu():
    """Models that branch on data (``.all()``, ``.item()``) can tell they are traced, and
    ``input_ids`` made on the CPU go to meta with the model, as in ``estimate``."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

        def forward(self, x):
            from torch._subclasses.fake_tensor import is_fake

            if not is_fake(x) and bool((x > 0).all()):  # meta tensors cannot answer this
                x = x * 2
            for layer in self.layers:
                x = layer(x).tanh()
            return x

    with torch.device("meta"):
        model = Branchy()
    prof = remat.profile(model, torch.randn(4, 8), target_device="h100")
    assert [r.name for r in prof.regions] == ["layers.0", "layers.1"]
    assert all(p.is_meta and not type(p).__name__.startswith("Fake") for p in model.parameters())
