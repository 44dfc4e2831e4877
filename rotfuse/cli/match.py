"""`rotfuse match` and `rotfuse scramble`: the CLI side only (flags in, report out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rotfuse.cli.common import (
    AllowNonfinite,
    Arch,
    ArchSpecFile,
    Debug,
    Device,
    DryRun,
    Fsync,
    JsonOut,
    Overwrite,
    Quiet,
    Ui,
    imports_done,
    parse_layers,
    run_command,
)
from rotfuse.symmetry.names import DEFAULT_SYMMETRIES

Symmetries = Annotated[str, typer.Option(
    "--symmetries", "-s",
    help="Comma-separated symmetries: perm (FFN neurons, each expert's own in MoE layers), heads (whole-head "
         "permutation), experts (whole MoE experts with their router rows), rot (per-head QK/VO "
         "rotation), scale (per-head QK/VO rescaling), residual (the residual stream; opt-in), default "
         "(perm,heads,experts,rot,scale), module names (qk.rot, vo.scale, ...), all, none.")]
Layers = Annotated[str | None, typer.Option("--layers", help="Only these layers, e.g. 0-5,8 (default: all).")]


AllowUntie = Annotated[bool, typer.Option(
    "--allow-untie", help="RMSNorm model with tied embeddings: fold the norm gains anyway so any orthogonal residual "
                          "map is allowed; the output gets its own lm_head and tie_word_embeddings: false.")]
AllowStreamOutput = Annotated[bool, typer.Option(
    "--allow-stream-output", help="Allow a residual map on a model without a head (e.g. BertModel): its hidden "
                                  "states then come out as x @ Q (cosine similarities and norms unchanged).")]


def match_command(
    anchor: Annotated[Path, typer.Argument(help="Checkpoint folder to align to (never modified).")],
    models: Annotated[list[Path], typer.Argument(
        help="Checkpoint folder(s) to align. With several, OUT gets one sub-folder per model and one report.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the aligned checkpoint(s).")],
    report: Annotated[Path | None, typer.Option("--report", help="Where to write the JSON report [default: OUT/rotfuse_report.json].")] = None,
    symmetries: Symmetries = DEFAULT_SYMMETRIES,
    layers: Layers = None,
    max_rounds: Annotated[int, typer.Option("--max-rounds", min=1, help="Most rotation/scale alternation rounds per circuit.")] = 20,
    data: Annotated[Path | None, typer.Option(
        "--data", help="With the residual symmetry: find the residual-stream map from both models' hidden states on "
                       "these inputs (.jsonl/.txt/.safetensors/.npz, as for `rotfuse stats`) instead of from weights.")] = None,
    data_samples: Annotated[int, typer.Option("--max-samples", min=1, help="With --data: inputs used.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="With --data: inputs per forward pass.")] = 16,
    residual_rounds: Annotated[int, typer.Option(
        "--residual-rounds", min=1, help="Weight matching of the residual stream: most alternations of the stream map "
                                         "and the per-layer maps.")] = 8,
    allow_untie: AllowUntie = False,
    allow_stream_output: AllowStreamOutput = False,
    arch: Arch = None,
    arch_spec: ArchSpecFile = None,
    device: Device = "auto",
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Layers read and solved concurrently [default: min(4, CPUs)].")] = None,
    overwrite: Overwrite = False,
    fsync: Fsync = True,
    allow_nonfinite: AllowNonfinite = False,
    dry_run: DryRun = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Write the functionally equivalent copy of each MODEL that lies closest to ANCHOR.

    \b
    rotfuse match anchor/ model/ -o aligned/
    rotfuse match anchor/ m1/ m2/ m3/ -o aligned/          # aligned/m1, aligned/m2, aligned/m3
    rotfuse match anchor/ model/ -o aligned/ -s default,residual                  # + the residual stream
    rotfuse match anchor/ model/ -o aligned/ -s default,residual --data inputs.jsonl
    """
    ui = Ui(quiet, json_out)

    def body() -> dict:
        from rotfuse.align.match import match, match_many
        from rotfuse.align.options import DEFAULT_WORKERS, MatchOptions
        from rotfuse.align.plan import prepare_match
        from rotfuse.core.report import render_match_table, render_plan
        from rotfuse.symmetry.names import symmetry_set

        imports_done()
        options = MatchOptions(
            symmetry_set(symmetries), parse_layers(layers), device, max_rounds, arch, arch_spec, allow_nonfinite,
            workers or DEFAULT_WORKERS, data, residual_rounds, data_samples, batch_size, allow_untie,
            allow_stream_output, fsync)
        if dry_run:
            plans = [prepare_match(anchor, model, out, options, overwrite).describe() for model in models]
            for plan in plans if not json_out else ():
                render_plan(plan, ui.console)
            return plans[0] if len(plans) == 1 else {"dry_run": True, "models": plans}
        with ui.progress("matching layers") as progress:
            if len(models) == 1:
                result = match(anchor, models[0], out, options, report, overwrite, progress)
            else:
                result = match_many(anchor, models, out, options, report, overwrite, progress)
        if not json_out:
            for single in result.get("models", [result]):
                render_match_table(single, ui.console)
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
    fsync: Fsync = True,
    allow_nonfinite: AllowNonfinite = False,
    allow_untie: AllowUntie = False,
    allow_stream_output: AllowStreamOutput = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Write a copy of MODEL moved by a random symmetry: same function, scrambled weights.

    Useful to check a matching pipeline end to end: `rotfuse match MODEL SCRAMBLED` must undo it.
    """
    ui = Ui(quiet, json_out)

    def body() -> dict:
        from rotfuse.align.options import MatchOptions
        from rotfuse.align.scramble import scramble
        from rotfuse.symmetry.names import symmetry_set

        imports_done()
        options = MatchOptions(symmetry_set(symmetries), parse_layers(layers), device, 1, arch, arch_spec,
                               allow_nonfinite, allow_untie=allow_untie, allow_stream_output=allow_stream_output,
                               fsync=fsync)
        with ui.progress("scrambling layers") as progress:
            result = scramble(model, out, options, seed, overwrite, progress)
        ui.console.print(f"wrote {out} ({result['arch']}, symmetries {','.join(result['symmetries'])}, seed {seed})")
        return result

    ui.emit(run_command(body, debug))
