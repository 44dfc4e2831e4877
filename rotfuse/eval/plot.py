"""Loss-barrier plots: several interpolation curves on one figure, with a legend.

matplotlib is imported only here and only when a plot is asked for; the Agg canvas is used
directly (no pyplot, no global backend switch), so it works headless and inside other programs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rotfuse.eval.interpolate import Curve
from rotfuse.io.staging import write_file_atomically


def plot_curves(
    curves: Sequence[Curve], path: Path, title: str | None = None, barrier_in_legend: bool = True, output: bool = False
) -> Path:
    """Write a PNG with loss (and, when every curve has it, accuracy) against lambda.

    The legend gives each curve's barrier unless `barrier_in_legend` is off (e.g. for averaged
    curves, whose label already carries the mean barrier of the runs they average). `output`:
    the plot is a command's output (see io/staging.write_file_atomically).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("nothing to plot")
    with_accuracy = all(curve.accuracies is not None for curve in curves)
    figure = Figure(figsize=(11 if with_accuracy else 6, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2 if with_accuracy else 1, squeeze=False)[0]
    for curve in curves:
        legend = f"{curve.label} (barrier {curve.barrier:.3g})" if barrier_in_legend else curve.label
        line = _draw(axes[0], curve.lambdas, curve.losses, curve.loss_spread, legend)
        if with_accuracy:  # same colour, no second legend entry
            _draw(axes[1], curve.lambdas, curve.accuracies or [], curve.accuracy_spread, "_nolegend_", line.get_color())
    labels = {curve.labels for curve in curves}
    axes[0].set_ylabel("loss" + (" (vs. endpoint ensemble labels)" if labels == {"ensemble"} else ""))
    if with_accuracy:
        axes[1].set_ylabel("accuracy" + (" (agreement with ensemble)" if labels == {"ensemble"} else ""))
    for axis in axes:
        axis.set_xlabel("λ: weights (1-λ)·A + λ·B")
        axis.grid(alpha=0.3)
    # below the panels, where it never hides the barrier it describes
    figure.legend(loc="outside lower center", ncols=min(3, len(curves)), fontsize="small", frameon=False)
    if title:
        figure.suptitle(title)
    path = Path(path)  # written whole or not at all, as every output
    write_file_atomically(path, lambda handle: figure.savefig(handle, dpi=110, format="png"), "plot", output)
    return path


def _draw(
    axis, xs: list[float], ys: list[float], spread: list[float] | None, label: str, color: str | None = None
):  # matplotlib objects are untyped
    (line,) = axis.plot(xs, ys, marker="o", markersize=3, label=label, color=color)
    if spread is not None:
        low = [y - s for y, s in zip(ys, spread)]
        high = [y + s for y, s in zip(ys, spread)]
        axis.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    return line
