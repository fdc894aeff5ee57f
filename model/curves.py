"""Training curves as one PNG: the loss and the AP of each run against iterations and against training time.

Used by `compare` (validation AP of each backbone) and by the overfit benchmark (AP on the training tiles).
Time is the sum of the optimizer steps (OUT.losses.csv's `seconds`), so validation and checkpoint writes do
not count and two runs compare at equal compute. matplotlib's Agg canvas, no pyplot: no display, no global
state, safe in any thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from core.files import atomic_path

KINDS = (("segm", "-", "o"), ("bbox", "--", "s"))  # (metrics key, line style, marker)


@dataclass(frozen=True)
class Curves:
    """One run: `history` are the training loop's rows (iteration, loss, seconds of that step), `val` its
    validations (iteration, seconds of training so far, {"bbox": {"AP": ..}, "segm": {..}})."""

    label: str
    history: Sequence[dict[str, Any]]
    val: Sequence[dict[str, Any]]


def moving_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start): the trend of a noisy loss."""
    sums = [0.0, *accumulate(values)]
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]


def time_scale(runs: Sequence[Curves]) -> tuple[float, str]:
    """Seconds, or minutes once the longest run passes 10 minutes."""
    longest = max((sum(float(r["seconds"]) for r in run.history) for run in runs), default=0.0)
    return (60.0, "minutes") if longest > 600 else (1.0, "seconds")


def plot_curves(runs: Sequence[Curves], path: str | Path, *, metric: str = "AP", target: float | None = None,
                title: str = "", ap_label: str = "validation") -> Path:
    """Write the 2 x 2 figure (loss and `metric` against iterations and training time) to `path`, atomically.

    `target` draws a horizontal line on the AP panels (the overfit proof's 0.5)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 8), dpi=100, facecolor="white", layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    scale, unit = time_scale(runs)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for run, colour in zip(runs, colours):
        iterations = [int(r["iteration"]) for r in run.history]
        clock = [s / scale for s in accumulate(float(r["seconds"]) for r in run.history)]
        losses = [float(r["loss"]) for r in run.history]
        trend = moving_mean(losses, max(1, len(losses) // 50))
        for ax, x in zip(axes[0], (iterations, clock)):
            ax.plot(x, losses, color=colour, alpha=0.2, linewidth=0.8)
            ax.plot(x, trend, color=colour, linewidth=1.8, label=run.label)
        val_iterations = [int(v["iteration"]) for v in run.val]
        val_clock = [float(v["seconds"]) / scale for v in run.val]
        for kind, style, marker in KINDS:
            values = [float(v[kind][metric]) for v in run.val]
            for ax, x in zip(axes[1], (val_iterations, val_clock)):
                ax.plot(x, values, color=colour, linestyle=style, marker=marker, markersize=3,
                        label=f"{run.label} {kind}")
    for ax in axes[0]:
        ax.set_ylabel("training loss (sum of the five)")
        ax.set_yscale("log")
    for ax in axes[1]:
        ax.set_ylabel(f"{metric} ({ap_label})")
        ax.set_ylim(0, 1)
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_xlabel("iteration")
    for ax in axes[:, 1]:
        ax.set_xlabel(f"training {unit} (optimizer steps)")
    axes[0][0].legend(loc="upper right")
    axes[1][0].legend(loc="lower right" if target is not None else "upper left", fontsize=8)
    if title:
        figure.suptitle(title)
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
