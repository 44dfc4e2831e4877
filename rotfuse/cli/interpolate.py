"""`rotfuse interpolate`: the CLI side only (flags in, curves, table and plot out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from rotfuse.cli.common import Debug, Device, JsonOut, Overwrite, Quiet, Ui, imports_done, require, run_command
from rotfuse.cli.verify import BatchSize


def interpolate_command(
    a: Annotated[Path, typer.Argument(help="Checkpoint at λ = 0 (e.g. the anchor).")],
    ends: Annotated[
        list[Path],
        typer.Argument(
            help="Checkpoint(s) at λ = 1: one curve from A to each, e.g. B and B matched to A.", show_default=False
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            dir_okay=False,
            show_default=False,
            help="Inputs with labels (.jsonl with a label field, or .safetensors/.npz with a labels tensor); "
            "unlabelled data works for causal LMs and classifiers (see below).",
        ),
    ],
    steps: Annotated[int, typer.Option("--steps", min=2, help="Grid points from λ = 0 to 1, both included.")] = 11,
    plot: Annotated[Path | None, typer.Option("--plot", dir_okay=False, help="Write a PNG of the curves here.")] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            help="Name of a curve in the table and legend; repeat once per end, in order [default: folder names].",
        ),
    ] = None,
    overlay: Annotated[
        list[Path] | None,
        typer.Option(
            "--overlay",
            dir_okay=False,
            help="Also plot the curves saved by an earlier run (its --out or --json file); repeatable.",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", dir_okay=False, help="Also write the JSON result to this file.")
    ] = None,
    title: Annotated[str | None, typer.Option("--title", help="Title of the plot.")] = None,
    samples: Annotated[
        int | None, typer.Option("--samples", min=1, help="Use only the first N samples of --data.")
    ] = None,
    batch_size: BatchSize = 32,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Loss (and accuracy) of (1-λ)·A + λ·B along a grid of λ, and the loss barrier.

    barrier = max over λ of L(λ) - [(1-λ) L(A) + λ L(B)]; 0 means linearly mode connected.

    Loss: the task loss with the labels in --data (cross-entropy); next-token loss for causal LMs.

    A classifier without labels is scored against the predictions of the A+B ensemble.

    Streaming: only one interpolated model is in memory at a time.
    """
    ui = Ui(quiet, json_out)

    def body() -> dict[str, Any]:
        require("transformers", "rotfuse interpolate")
        if plot is not None:  # checked now, not after minutes of computing
            require("matplotlib", "interpolate --plot")
        from rotfuse.core.device import resolve_device
        from rotfuse.core.errors import UsageError
        from rotfuse.eval.data import load_inputs
        from rotfuse.eval.interpolate import InterpolationSettings, grid, interpolate
        from rotfuse.io.staging import Target, check_outputs, write_json

        imports_done()

        names = list(label or [])
        if names and len(names) != len(ends):
            raise UsageError(f"--label given {len(names)} times for {len(ends)} curve(s): give one per end checkpoint")
        if overlay and plot is None:
            raise UsageError("--overlay adds curves to the plot: give --plot FILE.png too")
        check_outputs(
            [
                Target(plot, "--plot", folder=False, what="plot") if plot else None,
                Target(out, "--out", folder=False, what="result") if out else None,
            ],
            [a, *ends, data, *(overlay or [])],
            overwrite,
        )
        earlier = [curve for path in overlay or [] for curve in _read_curves(path)]
        inputs = load_inputs(data, a, samples)
        settings = InterpolationSettings(grid(steps), batch_size, resolve_device(device))
        curves = []
        for number, end in enumerate(ends):
            with ui.progress(f"curve {number + 1}/{len(ends)} ({end})", "lambda") as progress:
                curves.append(interpolate(a, end, inputs, settings, names[number] if names else None, progress))
        result: dict[str, Any] = {
            "tool": "rotfuse",
            "command": "interpolate",
            "data": str(data),
            "samples": next(iter(inputs.values())).shape[0],
            "curves": [curve.as_dict() for curve in curves],
            "plot": str(plot) if plot else None,
        }
        if out is not None:  # before the plot: a failing plot never costs the numbers
            write_json(out, result, output=True)
        if plot is not None:
            from rotfuse.eval.plot import plot_curves

            plot_curves(earlier + curves, plot, title, output=True)
        if not json_out:
            _render(curves, ui)
        if plot or out:
            ui.console.print("wrote " + " and ".join(str(p) for p in (plot, out) if p))
        return result

    ui.emit(run_command(body, debug))


def _read_curves(path: Path) -> list[Any]:
    """Curves saved by an earlier run: its whole result or a single curve."""
    from rotfuse.core.errors import InputError
    from rotfuse.eval.interpolate import Curve
    from rotfuse.io.untrusted import read_json

    saved = read_json(Path(path), "saved curves")
    items = saved.get("curves") if isinstance(saved, dict) and "curves" in saved else [saved]
    if not isinstance(items, list) or not items:
        raise InputError(f"{path}: no curves in this file (expected the output of interpolate --json)")
    return [Curve.from_dict(item if isinstance(item, dict) else {}, str(path)) for item in items]


def _render(curves: list[Any], ui: Ui) -> None:
    from rich.table import Table

    middle = len(curves[0].lambdas) // 2
    mid = f"{curves[0].lambdas[middle]:g}"
    table = Table(title=f"rotfuse interpolate (loss vs. {curves[0].labels} labels)")
    for column in ("curve", "L(A)", f"L({mid})", "L(B)", "barrier", "acc(A)", f"acc({mid})", "acc(B)"):
        table.add_column(column, justify="left" if column == "curve" else "right")
    for curve in curves:
        accs = curve.accuracies or [None] * len(curve.lambdas)
        table.add_row(
            curve.label,
            *(f"{x:.4f}" for x in (curve.losses[0], curve.losses[middle], curve.losses[-1], curve.barrier)),
            *("-" if x is None else f"{x:.3f}" for x in (accs[0], accs[middle], accs[-1])),
        )
    ui.console.print(table)
