"""Figures of ``remat bench`` results (matplotlib, Agg backend, imported only when plotting).

One figure, two panels: live memory over one training step for every configuration (the
tracker's timeline: forward rises, backward falls, recomputation shows as extra ops), and the
trade-off, training-step peak against median step time, one point per configuration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from remat.bench import BenchResult

__all__ = ["plot_bench"]

MB = 1e6


def plot_bench(result: BenchResult, path: str, *, dpi: int = 120) -> None:
    """Write the two-panel figure of ``result`` to ``path`` (PNG unless the suffix says else).

    Args:
        result: what :func:`remat.bench.run_bench` returned (or one read back from its JSON).
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

    labels = _label_offsets(result)
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
            tradeoff_ax.annotate(
                row.name, (x, y), textcoords="offset points", xytext=labels[i], fontsize=8
            )

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
    tradeoff_ax.margins(x=0.25, y=0.15)

    fig.suptitle(
        f"remat bench: {env.model} ({env.parameters or 0:,} parameters), batch {env.batch}, "
        f"{env.dtype} on {env.device_name}",
        fontsize=11,
    )
    fig.savefig(path, dpi=dpi)


def _label_offsets(result: BenchResult) -> list[tuple[int, int]]:
    """Label offsets (points) for the trade-off panel: stack labels of near-coincident points."""
    pts = [
        (r.median_step_s, r.step_peak_bytes)
        if r.median_step_s is not None and r.step_peak_bytes is not None
        else None
        for r in result.configs
    ]
    placed = [p for p in pts if p is not None]
    if not placed:
        return [(6, 4)] * len(pts)
    xr = (max(p[0] for p in placed) - min(p[0] for p in placed)) or 1.0
    yr = (max(p[1] for p in placed) - min(p[1] for p in placed)) or 1.0
    offsets: list[tuple[int, int]] = []
    for i, p in enumerate(pts):
        near = sum(
            1
            for q in pts[:i]
            if p is not None
            and q is not None
            and abs(p[0] - q[0]) / xr < 0.12
            and abs(p[1] - q[1]) / yr < 0.06
        )
        offsets.append((6, 4 - 11 * near))
    return offsets
