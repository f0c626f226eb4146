"""Figures of ``remat bench`` results (matplotlib, Agg backend, imported only when plotting).

One figure, two panels: live memory over one training step for every configuration (the
tracker's timeline: forward rises, backward falls, recomputation shows as extra ops), and the
trade-off, training-step peak against median step time, one point per configuration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from remat.bench.runner import BenchResult

__all__ = ["plot_bench"]

MB = 1e6


def plot_bench(result: BenchResult, path: str, *, dpi: int = 120) -> None:
    """Write the two-panel figure of ``result`` to ``path`` (PNG unless the suffix says else).

    Args:
        result: what :func:`remat.bench.runner.run_bench` returned (or one read back from its JSON).
        path: output file.
        dpi: resolution.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (the ``cli`` extra provides it).
    """
    # Figure + Agg canvas directly: no pyplot global state, no GUI backend, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    timeline_ax, tradeoff_ax = fig.subplots(1, 2)
    cycle = [f"C{i}" for i in range(10)]

    for i, row in enumerate(result.configs):
        color = cycle[i % len(cycle)]
        label = row.name if row.status == "ok" else f"{row.name} ({row.status})"
        if row.timeline:
            xs = [p[0] for p in row.timeline]
            ys = [p[1] / MB for p in row.timeline]
            timeline_ax.plot(
                xs, ys, color=color, label=label, linewidth=1.3, drawstyle="steps-post"
            )
            if row.backward_start is not None:
                # Live bytes where backward begins: what the forward kept, weights included.
                before = [p[1] for p in row.timeline if p[0] <= row.backward_start]
                y0 = before[-1] if before else 0
                timeline_ax.plot(
                    [row.backward_start],
                    [y0 / MB],
                    "o",
                    color=color,
                    markersize=6,
                    markeredgecolor="black",
                    zorder=5,
                )
        if row.median_step_s is not None and row.step_peak_bytes is not None:
            x, y = row.median_step_s * 1e3, row.step_peak_bytes / MB
            marker = "o" if row.status == "ok" else "x"
            tradeoff_ax.plot([x], [y], marker, color=color, markersize=8, label=label)

    env = result.environment
    timeline_ax.set_title("live memory over one training step (dot: backward starts)")
    timeline_ax.set_xlabel("op index (forward, then backward with recomputation)")
    timeline_ax.set_ylabel("live memory (MB)")
    timeline_ax.set_ylim(bottom=0)
    timeline_ax.grid(alpha=0.3)
    timeline_ax.legend(fontsize=8)

    tradeoff_ax.set_title("trade-off: training-step peak vs median step time")
    tradeoff_ax.set_xlabel(f"median step time (ms, {env.steps} interleaved rounds)")
    tradeoff_ax.set_ylabel("training-step peak (MB)")
    tradeoff_ax.grid(alpha=0.3)
    tradeoff_ax.legend(fontsize=8, loc="best")  # a legend: close points stay readable
    points = _points(result)
    if points:  # axes from zero: savings and slowdowns at their true size
        tradeoff_ax.set_xlim(0, 1.3 * max(p[0] for p in points) * 1e3)
        tradeoff_ax.set_ylim(0, 1.15 * max(p[1] for p in points) / MB)

    fig.suptitle(
        f"remat bench: {env.model} ({env.parameters or 0:,} parameters), batch {env.batch}, "
        f"{env.dtype} on {env.device_name}",
        fontsize=11,
    )
    fig.savefig(path, dpi=dpi)


def _points(result: BenchResult) -> list[tuple[float, int]]:
    return [
        (r.median_step_s, r.step_peak_bytes)
        for r in result.configs
        if r.median_step_s is not None and r.step_peak_bytes is not None
    ]
