"""The ``remat bench`` table: one row per configuration, its units in the caption, and a
warning under it when a configuration's step times were too spread to be a result.
"""

from __future__ import annotations

import statistics
from typing import Any

from remat.bench.runner import NOISY_SPREAD, BenchResult
from remat.solver.units import fmt_small

__all__ = ["print_table"]


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _spread(times: list[float]) -> str:
    if len(times) < 2:
        return "-"
    median = statistics.median(times)
    far = max(abs(t - median) for t in times)
    return f"{far / median:.0%}" if median > 0 else "-"


def print_table(result: BenchResult) -> None:
    """Print the ``remat bench`` table of ``result``, and a warning when timings are noise."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    env = result.environment
    title = (
        f"remat bench: {env.model}, {env.parameters or 0:,} params, batch {env.batch}, "
        f"{env.dtype}, {env.device_name}, {env.steps} rounds"
    )
    cuda = any(r.cuda_max_allocated_bytes is not None for r in result.configs)
    caption = (
        "fwd/total MB: peak live memory in the forward pass / the whole training step "
        "(parameters, inputs, gradients included); step MB: the step's peak of new bytes "
        "(parameters and inputs excluded), what remat plan's percentages are of; "
        "saved MB: kept for backward; "
        + ("cuda/rsrvd MB: the CUDA allocator's max allocated/reserved; " if cuda else "")
        + "ms: median step time over the interleaved rounds, ± its spread (largest distance "
        "of a round from it); ×none: its ratio to none's; "
        "+GFLOP: recomputation; "
        "Δgrad: max |gradient - none's|"
    )
    table = Table(
        title=title,
        caption=caption,
        title_justify="left",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    headers = ["config", "fwd MB", "total MB", "step MB", "saved MB"]
    headers += ["cuda MB", "rsrvd MB"] if cuda else []
    headers += ["ms", "±", "×none", "+GFLOP", "Δgrad", "status"]
    for i, h in enumerate(headers):
        table.add_column(
            h,
            justify="left" if i == 0 or h == "status" else "right",
            min_width=max(len(r.name) for r in result.configs) if i == 0 else None,
        )
    for r in result.configs:
        row = [r.name, _mb(r.forward_peak_bytes), _mb(r.step_peak_bytes)]
        row += [_mb(r.step_new_peak_bytes), _mb(r.saved_bytes)]
        if cuda:
            row += [_mb(r.cuda_max_allocated_bytes), _mb(r.cuda_max_reserved_bytes)]
        row += [
            "-" if r.median_step_s is None else f"{r.median_step_s * 1e3:.1f}",
            _spread(r.step_times_s),
            "-" if r.time_ratio is None else f"{r.time_ratio:.2f}",
            "-" if r.extra_flops is None else f"{r.extra_flops / 1e9:+.2f}",
            "-" if r.max_grad_diff is None else fmt_small(r.max_grad_diff),
            _status(r),
        ]
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped or captured: rich would assume 80 columns
        console = Console(width=120)
    with console.capture() as captured:
        console.print(table)
    # rich pads every line to the table's width; a copied table should not carry that
    print("\n".join(line.rstrip() for line in captured.get().splitlines()))
    if result.noisy:
        console.print(
            f"[yellow]warning[/yellow]: {', '.join(result.noisy)}: a round took more than "
            f"{NOISY_SPREAD:g}× the median step time; the machine was busy, so the ms and ×none "
            "columns are noise, not a result (rerun with more --steps on a quiet machine)"
        )


def _status(r: Any) -> str:
    if r.status == "ok":
        # grads_match None: none did not finish, so there was nothing to compare with.
        return "[green]ok[/green]" if r.grads_match else "[yellow]ok, unchecked[/yellow]"
    if r.status == "FAIL":
        what = [
            w for w, ok in (("gradients", r.grads_match), ("buffers", r.buffers_match)) if not ok
        ]
        return f"[bold red]FAIL[/bold red]: {' and '.join(what) or 'loss'} differ"
    # oom / crashed: the row still appears, with the reason.
    return f"[yellow]{r.status}[/yellow]: {r.error}"
