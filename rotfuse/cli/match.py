"""`rotfuse match` and `rotfuse scramble`: the CLI side only (flags in, report out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rotfuse.symmetries import DEFAULT_SYMMETRIES
from rotfuse.cli.common import (
    AllowNonfinite,
    Arch,
    ArchSpecFile,
    Debug,
    Device,
    DryRun,
    JsonOut,
    Overwrite,
    Quiet,
    Ui,
    parse_layers,
    run_command,
)

Symmetries = Annotated[str, typer.Option(
    "--symmetries", "-s",
    help="Comma-separated symmetries to use: perm (FFN neurons), heads (whole-head permutation), rot (per-head QK/VO rotation), "
         "scale (per-head QK/VO rescaling), or qk.rot, vo.scale, ... ; 'all' or 'none'.")]
Layers = Annotated[str | None, typer.Option("--layers", help="Only these layers, e.g. 0-5,8 (default: all).")]


def match_command(
    anchor: Annotated[Path, typer.Argument(help="Checkpoint folder to align to (never modified).")],
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to align.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the aligned checkpoint.")],
    report: Annotated[Path | None, typer.Option("--report", help="Where to write the JSON report [default: OUT/rotfuse_report.json].")] = None,
    symmetries: Symmetries = DEFAULT_SYMMETRIES,
    layers: Layers = None,
    max_rounds: Annotated[int, typer.Option("--max-rounds", min=1, help="Most rotation/scale alternation rounds per circuit.")] = 20,
    arch: Arch = None,
    arch_spec: ArchSpecFile = None,
    device: Device = "auto",
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Layers read and solved concurrently [default: min(4, CPUs)].")] = None,
    overwrite: Overwrite = False,
    allow_nonfinite: AllowNonfinite = False,
    dry_run: DryRun = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Write the functionally equivalent copy of MODEL that lies closest to ANCHOR."""
    ui = Ui(quiet, json_out)

    def body() -> dict:
        from rotfuse.symmetries import symmetry_set
        from rotfuse.pipeline import DEFAULT_WORKERS, MatchOptions, match, prepare_match
        from rotfuse.report import render_plan, render_match_table

        options = MatchOptions(symmetry_set(symmetries), parse_layers(layers), device, max_rounds, arch, arch_spec,
                               allow_nonfinite, workers or DEFAULT_WORKERS)
        if dry_run:
            plan = prepare_match(anchor, model, out, options, overwrite).describe()
            if not json_out:
                render_plan(plan, ui.console)
            return plan
        with ui.progress("matching layers") as progress:
            result = match(anchor, model, out, options, report, overwrite, progress)
        if not json_out:
            render_match_table(result, ui.console)
        ui.console.print(f"wrote {out}" + (f" and {report}" if report else ""))
        return result

    ui.emit(run_command(body, debug))


def scramble_command(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to copy.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same output).")] = 0,
    symmetries: Symmetries = DEFAULT_SYMMETRIES,
    layers: Layers = None,
    arch: Arch = None,
    arch_spec: ArchSpecFile = None,
    device: Device = "cpu",
    overwrite: Overwrite = False,
    allow_nonfinite: AllowNonfinite = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Write a copy of MODEL moved by a random symmetry: same function, scrambled weights.

    Useful to check a matching pipeline end to end: `rotfuse match MODEL SCRAMBLED` must undo it.
    """
    ui = Ui(quiet, json_out)

    def body() -> dict:
        from rotfuse.symmetries import symmetry_set
        from rotfuse.pipeline import MatchOptions, scramble

        options = MatchOptions(symmetry_set(symmetries), parse_layers(layers), device, 1, arch, arch_spec, allow_nonfinite)
        with ui.progress("scrambling layers") as progress:
            result = scramble(model, out, options, seed, overwrite, progress)
        ui.console.print(f"wrote {out} ({result['arch']}, symmetries {','.join(result['symmetries'])}, seed {seed})")
        return result

    ui.emit(run_command(body, debug))
