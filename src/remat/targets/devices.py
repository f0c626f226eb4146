"""The device a plan is for, and how long an op takes there: a roofline cost model.

An op's predicted time on a :class:`Target` is ``max(FLOPs / peak FLOP/s for its dtype,
bytes read and written / memory bandwidth) + launch``: a matmul is bound by the tensor
cores, a pointwise op or a norm by memory, and every kernel pays a launch. FLOPs come from
``torch.utils.flop_counter``'s formulas (matmuls, convolutions, attention), bytes from the
op's tensor arguments and outputs, so the model works on the meta device: ``remat.profile(
model, *inputs, target_device="h100")`` plans for a GPU this machine does not have.

The figures are the vendors' published dense (no sparsity) peaks; ``cpu`` is measured on
the spot. ``Target(...)`` with your own figures works everywhere a name does.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

__all__ = ["TARGETS", "Target", "describe_targets", "get_target", "measure_cpu_target", "op_flops"]

TERA = 1e12


@dataclass(frozen=True, kw_only=True)
class Target:
    """A device's peak rates, for predicted op times.

    Attributes:
        name: what ``target_device=`` and ``--target`` accept.
        flops_per_s: peak dense FLOP/s per dtype name (``"float32"``, ``"bfloat16"``...);
            a dtype not listed gets the ``"float32"`` rate.
        memory_bandwidth: device memory bytes per second.
        memory_bytes: device memory (the budget ``100%`` of the device means).
        launch_s: fixed cost of one op (kernel launch and eager dispatch).
        host_bandwidth: bytes per second between device and host memory, one direction
            (offloading).
        source: where the figures come from.
        kernels: whose kernels run there, ``"cuda"`` or ``"cpu"``: on meta, dropout and
            attention keep for backward what those kernels keep (``target_kernels``).
    """

    name: str
    flops_per_s: dict[str, float] = field(default_factory=dict)
    memory_bandwidth: float
    memory_bytes: int
    launch_s: float = 5e-6
    host_bandwidth: float = 0.0
    source: str = ""
    kernels: str = "cuda"

    def __post_init__(self) -> None:
        if not self.flops_per_s or any(v <= 0 for v in self.flops_per_s.values()):
            raise ValueError(f"Target {self.name!r}: flops_per_s needs positive rates")
        if "float32" not in self.flops_per_s:
            raise ValueError(f"Target {self.name!r}: flops_per_s needs a 'float32' rate")
        if self.memory_bandwidth <= 0 or self.memory_bytes <= 0 or self.launch_s < 0:
            raise ValueError(f"Target {self.name!r}: bandwidth and memory must be positive")
        if self.kernels not in ("cuda", "cpu"):
            raise ValueError(f"Target {self.name!r}: kernels must be 'cuda' or 'cpu'")

    def peak_flops(self, dtype: torch.dtype) -> float:
        """The peak FLOP/s for ``dtype`` (the float32 rate for a dtype not listed)."""
        return self.flops_per_s.get(str(dtype).removeprefix("torch."), self.flops_per_s["float32"])

    def op_seconds(self, flops: int, bytes_moved: int, dtype: torch.dtype) -> float:
        """Predicted time of one op: the slower of compute and memory traffic, plus launch."""
        return max(flops / self.peak_flops(dtype), bytes_moved / self.memory_bandwidth) + (
            self.launch_s
        )


# Vendor datasheets, dense peaks (the sparsity figures are twice these). float32 matmuls
# run without TF32, PyTorch's default (torch.backends.cuda.matmul.allow_tf32 is False).
# Host links: PCIe Gen5 x16 is 64 GB/s a direction, Gen4 x16 32 GB/s.
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            name="h100",  # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM5 80GB
            flops_per_s={
                "float32": 67 * TERA,
                "float64": 34 * TERA,
                "bfloat16": 989 * TERA,
                "float16": 989 * TERA,
            },
            memory_bandwidth=3.35e12,
            memory_bytes=80 * 10**9,
            host_bandwidth=64e9,
            source="NVIDIA H100 datasheet (SXM5): FP32 67, FP64 34, BF16/FP16 989 TFLOPS "
            "dense; HBM3 3.35 TB/s; PCIe Gen5",
        ),
        Target(
            name="h200",  # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM 141GB
            flops_per_s={
                "float32": 67 * TERA,
                "float64": 34 * TERA,
                "bfloat16": 989 * TERA,
                "float16": 989 * TERA,
            },
            memory_bandwidth=4.8e12,
            memory_bytes=141 * 10**9,
            host_bandwidth=64e9,
            source="NVIDIA H200 datasheet (SXM): H100's compute; HBM3e 141 GB, 4.8 TB/s",
        ),
        Target(
            name="a100",  # NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM
            flops_per_s={
                "float32": 19.5 * TERA,
                "float64": 9.7 * TERA,
                "bfloat16": 312 * TERA,
                "float16": 312 * TERA,
            },
            memory_bandwidth=2.039e12,
            memory_bytes=80 * 10**9,
            host_bandwidth=32e9,
            source="NVIDIA A100 datasheet (80GB SXM): FP32 19.5, FP64 9.7, BF16/FP16 312 "
            "TFLOPS dense; HBM2e 2,039 GB/s; PCIe Gen4",
        ),
        Target(
            name="l4",  # NVIDIA L4 Tensor Core GPU datasheet
            flops_per_s={
                "float32": 30.3 * TERA,
                "float64": 0.49 * TERA,
                "bfloat16": 121 * TERA,
                "float16": 121 * TERA,
            },
            memory_bandwidth=300e9,
            memory_bytes=24 * 10**9,
            host_bandwidth=32e9,
            source="NVIDIA L4 datasheet: FP32 30.3, BF16/FP16 121 TFLOPS dense; GDDR6 24 GB, "
            "300 GB/s; PCIe Gen4",
        ),
        Target(
            name="rtx4090",  # NVIDIA Ada Lovelace GPU architecture whitepaper, appendix A
            flops_per_s={
                "float32": 82.6 * TERA,
                "float64": 1.29 * TERA,
                "bfloat16": 165.2 * TERA,
                "float16": 165.2 * TERA,
            },
            memory_bandwidth=1008e9,
            memory_bytes=24 * 10**9,
            host_bandwidth=32e9,
            source="NVIDIA Ada whitepaper, GeForce RTX 4090: FP32 82.6, BF16/FP16 tensor with "
            "FP32 accumulate 165.2 TFLOPS dense; GDDR6X 24 GB, 1,008 GB/s; PCIe Gen4",
        ),
    )
}


def get_target(target: str | Target) -> Target:
    """A :class:`Target` from its name (``"cpu"`` is measured, once per process).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if isinstance(target, Target):
        return target
    if not isinstance(target, str):
        raise TypeError(f"target must be a name or a remat Target, got {type(target).__name__}")
    if target == "cpu":
        return measure_cpu_target()
    if target not in TARGETS:
        raise ValueError(
            f"unknown target {target!r}; known targets: {', '.join([*TARGETS, 'cpu'])}, or "
            "pass remat.Target(...) with your own figures"
        )
    return TARGETS[target]


@functools.cache
def measure_cpu_target() -> Target:
    """This CPU, measured: float32 matmul FLOP/s, copy bandwidth, one small op's time."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul = _best_of(lambda: torch.mm(a, b))
    big = torch.empty(32 * 2**20 // 4)  # 32 MiB: beyond the caches
    copy = _best_of(lambda: big.clone())
    small = torch.ones(8)
    launch = _best_of(lambda: small.add(1.0), repeats=200)
    flops = 2 * n**3 / matmul
    return Target(
        name="cpu",
        flops_per_s={
            "float32": flops,
            "float64": flops / 2,
            "bfloat16": flops / 2,
            "float16": flops / 4,
        },
        memory_bandwidth=2 * big.nbytes / copy,  # read and write
        memory_bytes=_host_memory_bytes(),
        launch_s=launch,
        host_bandwidth=2 * big.nbytes / copy,
        source="measured on this machine: a 1024x1024 float32 matmul, a 32 MiB copy, one "
        "8-element add (best of several)",
        kernels="cpu",
    )


def describe_targets() -> str:
    """The table ``remat plan --target list`` prints: each target's figures and source."""
    lines = []
    for t in TARGETS.values():
        rates = ", ".join(f"{k} {v / 1e12:g}" for k, v in t.flops_per_s.items())
        lines.append(
            f"{t.name:<8} {t.memory_bytes / 1e9:g} GB, {t.memory_bandwidth / 1e12:g} TB/s, "
            f"TFLOP/s {rates}; host {t.host_bandwidth / 1e9:g} GB/s\n         {t.source}"
        )
    lines.append("cpu      this machine, measured when used (a matmul, a large copy, a small op)")
    return "\n".join(lines)


def _best_of(fn: Any, repeats: int = 5) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def _host_memory_bytes() -> int:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def _attention_flops(query: Tensor, key: Tensor, value: Tensor) -> int:
    """Scaled-dot-product attention, any kernel: Q @ K^T and the weights @ V."""
    *batch, s_q, d = query.shape
    s_k, d_v = key.shape[-2], value.shape[-1]
    heads = 1
    for size in batch:
        heads *= size
    return 2 * heads * s_q * s_k * d + 2 * heads * s_q * s_k * d_v


_ATTENTION = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def op_flops(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """The FLOPs of one aten op call: ``torch.utils.flop_counter``'s formula, or attention's
    for the kernels it has none for (the CPU flash kernel); 0 for ops without one."""
    from torch.utils.flop_counter import flop_registry

    packet = getattr(func, "_overloadpacket", func)
    name = getattr(packet, "__name__", str(packet))
    if name in _ATTENTION:
        return _attention_flops(*args[:3])
    formula = flop_registry.get(packet)
    if formula is None:
        return 0
    try:
        return int(formula(*args, **kwargs, out_val=out))
    except (TypeError, ValueError, IndexError):
        return 0


def bytes_moved(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """Bytes an op reads and writes: its tensor arguments and outputs, each tensor once."""
    seen: dict[int, int] = {}
    for t in tree_leaves((args, kwargs, out)):
        if isinstance(t, Tensor):
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())
