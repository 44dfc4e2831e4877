"""`rotfuse match` and `rotfuse scramble`: the CLI side only (flags in, report out)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

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
    job_file_option,
    parse_layers,
    require,
    run_command,
)
from rotfuse.cli.jobfile import BOOL, LIST, TEXT, Kind
from rotfuse.core.errors import InputError, UsageError
from rotfuse.symmetry.names import DEFAULT_SYMMETRIES

Symmetries = Annotated[
    str,
    typer.Option(
        "--symmetries",
        "-s",
        help="Comma-separated symmetries: perm (FFN neurons, each expert's own in MoE layers), heads (whole-head "
        "permutation), experts (whole MoE experts with their router rows), rot (per-head QK/VO "
        "rotation), scale (per-head QK/VO rescaling), residual (the residual stream; opt-in), default "
        "(perm,heads,experts,rot,scale), module names (qk.rot, vo.scale, ...), all, none.",
    ),
]
Layers = Annotated[str | None, typer.Option("--layers", help="Only these layers, e.g. 0-5,8  [default: all]")]


AllowUntie = Annotated[
    bool,
    typer.Option(
        "--allow-untie",
        help="RMSNorm model with tied embeddings: fold the norm gains anyway so any orthogonal residual "
        "map is allowed; the output gets its own lm_head and tie_word_embeddings: false.",
    ),
]
AllowStreamOutput = Annotated[
    bool,
    typer.Option(
        "--allow-stream-output",
        help="Allow a residual map on a model without a head (e.g. BertModel): its hidden "
        "states then come out as x @ Q (cosine similarities and norms unchanged).",
    ),
]


# each job-file key of `match --config` with its flag's type and range (cli/jobfile.Kind)
MATCH_SETTINGS: dict[str, Kind] = {
    "anchor": TEXT,
    "models": LIST,
    "models_from": TEXT,
    "out": TEXT,
    "report": TEXT,
    "symmetries": TEXT,
    "layers": TEXT,
    "max_rounds": Kind("int", 1),
    "data": TEXT,
    "max_samples": Kind("int", 1),
    "batch_size": Kind("int", 1),
    "residual_rounds": Kind("int", 1),
    "allow_untie": BOOL,
    "allow_stream_output": BOOL,
    "arch": TEXT,
    "arch_spec": TEXT,
    "device": TEXT,
    "workers": Kind("int", 1),
    "shard": TEXT,
    "skip_existing": BOOL,
    "overwrite": BOOL,
    "fsync": BOOL,
    "allow_nonfinite": BOOL,
    "dry_run": BOOL,
    "quiet": BOOL,
    "json": BOOL,
    "debug": BOOL,
    "learn": BOOL,
    "eval_data": TEXT,
    "learn_steps": Kind("int", 0),
    "learn_rate": Kind("float", 0.0),
    "lambda_schedule": TEXT,
    "seed": Kind("int"),
    "learn_keep": TEXT,
    "learn_decay": TEXT,
    "learn_log_every": Kind("int", 1),
    "learn_perm_rate": Kind("float", 0.0),
}
PARAMETER_OF = {"json": "json_out", "max_samples": "data_samples"}  # job key -> the function's parameter


def match_command(
    ctx: typer.Context,
    anchor: Annotated[
        Path | None, typer.Argument(help="Checkpoint folder to align to (never modified).", show_default=False)
    ] = None,
    models: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Checkpoint folder(s) to align. With several, OUT gets one sub-folder per model (each with its "
            "report) and a combined report.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder for the aligned checkpoint(s).")
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Where to write the JSON report  [default: OUT/rotfuse_report.json]")
    ] = None,
    config: Annotated[Path | None, job_file_option("anchor: a/, models: [b/, c/], out: aligned/")] = None,
    models_from: Annotated[
        Path | None,
        typer.Option(
            "--models-from",
            dir_okay=False,
            help="Also align the models listed in this file, one folder a line (blank lines and # comments skipped).",
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="I/N: align only every N-th model from the I-th (0-based) of the full list -- one task "
            "of an array job (SLURM_ARRAY_TASK_ID/N, RANK/WORLD_SIZE); each task writes "
            "OUT/rotfuse_report.shard-I-of-N.json.",
        ),
    ] = None,
    skip_existing: Annotated[
        bool,
        typer.Option(
            "--skip-existing",
            help="Keep an output whose report shows it finished with the same inputs and "
            'settings ("skipped" in the report); redo a stale or incomplete one.',
        ),
    ] = False,
    symmetries: Symmetries = DEFAULT_SYMMETRIES,
    layers: Layers = None,
    max_rounds: Annotated[
        int, typer.Option("--max-rounds", min=1, help="Most rotation/scale alternation rounds per circuit.")
    ] = 20,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="With the residual symmetry: find the residual-stream map from both models' hidden states on "
            "these inputs (.jsonl/.txt/.safetensors/.npz, as for `rotfuse stats`) instead of from weights.",
        ),
    ] = None,
    data_samples: Annotated[int, typer.Option("--max-samples", min=1, help="With --data: inputs used.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="With --data: inputs per forward pass.")] = 16,
    residual_rounds: Annotated[
        int,
        typer.Option(
            "--residual-rounds",
            min=1,
            help="Weight matching of the residual stream: most alternations of the stream map and the per-layer maps.",
        ),
    ] = 8,
    allow_untie: AllowUntie = False,
    allow_stream_output: AllowStreamOutput = False,
    learn: Annotated[
        bool,
        typer.Option(
            "--learn",
            help="Learned matching: then optimise the same exact symmetries for the loss of the "
            "average (1-l) ANCHOR + l MODEL on --data (GLMC); the output still computes MODEL's "
            "function.",
        ),
    ] = False,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval-data",
            help="With --learn: held-out inputs, scored at l = 0.5 at every logged step (never optimised).",
        ),
    ] = None,
    learn_steps: Annotated[int, typer.Option("--learn-steps", min=0, help="With --learn: optimiser steps.")] = 300,
    learn_rate: Annotated[
        float, typer.Option("--learn-rate", min=0.0, help="With --learn: Adam's learning rate.")
    ] = 1e-2,
    lambda_schedule: Annotated[
        str,
        typer.Option(
            "--lambda-schedule",
            help="With --learn: fixed (l = 0.5), uniform (l drawn in [0.3, 0.7] each step) or full (in [0, 1]).",
        ),
    ] = "uniform",
    seed: Annotated[
        int, typer.Option("--seed", help="With --learn: random seed (batches, l); same seed, same output.")
    ] = 0,
    learn_keep: Annotated[
        str,
        typer.Option(
            "--learn-keep",
            help="With --learn: the maps of the last step, or (best, needs --eval-data) of the logged step "
            "with the lowest held-out loss.",
        ),
    ] = "last",
    learn_decay: Annotated[
        str,
        typer.Option(
            "--learn-decay",
            help="With --learn: constant learning rate, or cosine (decayed to 0 over the steps).",
        ),
    ] = "constant",
    learn_log_every: Annotated[
        int,
        typer.Option(
            "--learn-log-every",
            min=1,
            help="With --learn: steps between logged steps (scored on 512 training inputs and on "
            "--eval-data; --learn-keep best chooses among them).",
        ),
    ] = 25,
    learn_perm_rate: Annotated[
        float | None,
        typer.Option(
            "--learn-perm-rate",
            min=0.0,
            help="With --learn: Adam's rate for the relaxed matrices behind the learned FFN-neuron and head "
            "permutations; higher lets the hard permutations change sooner.  [default: --learn-rate]",
            show_default=False,
        ),
    ] = None,
    arch: Arch = None,
    arch_spec: ArchSpecFile = None,
    device: Device = "auto",
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="Layers read and solved concurrently  [default: min(4, this process's CPUs / ranks sharing them)]",
        ),
    ] = None,
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
    rotfuse match anchor/ model/ -o aligned/ -s default,residual --data train.jsonl --learn --eval-data held.jsonl
    rotfuse match --config job.yaml --skip-existing      # resume a batch: finished models are kept
    rotfuse match --config job.yaml --shard $SLURM_ARRAY_TASK_ID/8                  # one task of 8
    """
    from rotfuse.cli.jobfile import load_config

    given = dict(locals())
    job = run_command(lambda: load_config(config, "match", MATCH_SETTINGS), debug)
    value = _resolver(ctx, given, job)
    ui = Ui(bool(value("quiet")), bool(value("json")))

    def body() -> dict:
        from rotfuse.cli.jobfile import as_list

        target = value("out")
        first = value("anchor")
        paths = [Path(p) for p in as_list(value("models"), split=False)]
        listed = value("models_from")
        if listed is not None:
            paths += _read_model_list(Path(listed))
        if first is None or not paths or target is None:
            raise UsageError(
                "give ANCHOR, at least one MODEL (or --models-from FILE) and --out DIR, on the command "
                "line or as anchor:, models: and out: in a --config job file"
            )
        if value("data") is not None:
            require("transformers", "match --data")
        from rotfuse.align.match import Batch
        from rotfuse.align.options import MatchOptions, default_workers
        from rotfuse.align.plan import prepare_match
        from rotfuse.align.scaleout import match, match_many  # shared among torchrun / srun ranks
        from rotfuse.core.report import render_match_table, render_plan
        from rotfuse.symmetry.names import symmetry_set

        imports_done()
        path = _optional_path
        options = MatchOptions(
            symmetry_set(str(value("symmetries"))),
            parse_layers(value("layers")),
            str(value("device")),
            int(value("max_rounds")),
            value("arch"),
            path(value("arch_spec")),
            bool(value("allow_nonfinite")),
            int(value("workers") or default_workers()),
            path(value("data")),
            int(value("residual_rounds")),
            int(value("max_samples")),
            int(value("batch_size")),
            bool(value("allow_untie")),
            bool(value("allow_stream_output")),
            bool(value("fsync")),
            bool(value("learn")),
            path(value("eval_data")),
            int(value("learn_steps")),
            float(value("learn_rate")),
            str(value("lambda_schedule")),
            int(value("seed")),
            str(value("learn_keep")),
            str(value("learn_decay")),
            int(value("learn_log_every")),
            _optional_float(value("learn_perm_rate")),
        )
        anchor_path, out_path, report_path = Path(first), Path(target), path(value("report"))
        several = len(paths) > 1 or listed is not None or value("shard") is not None
        batch = Batch(
            bool(value("overwrite")), bool(value("skip_existing")), _parse_shard(value("shard")), ui.model_started
        )
        if value("dry_run"):
            plans = [
                prepare_match(anchor_path, model, out_path, options, batch.overwrite).describe() for model in paths
            ]
            for plan in plans if not ui.json else ():
                render_plan(plan, ui.console)
            return plans[0] if len(plans) == 1 else {"dry_run": True, "models": plans}
        with ui.progress("matching layers") as progress:
            if not several:
                log = ui.console.print if ui.console.is_terminal else None
                result = match(
                    anchor_path,
                    paths[0],
                    out_path,
                    options,
                    report_path,
                    batch.overwrite,
                    progress,
                    log,
                    batch.skip_existing,
                )
            else:
                result = match_many(anchor_path, paths, out_path, options, report_path, batch, progress)
        for single in result.get("models", [result]) if not ui.json else ():
            if single.get("skipped"):
                ui.console.print(
                    f"skipped {single['output']['path']}: finished earlier with the same inputs and settings"
                )
            else:
                render_match_table(single, ui.console)
        ui.console.print(f"wrote {out_path}" + (f" and {report_path}" if report_path else ""))
        return result

    ui.emit(run_command(body, bool(value("debug"))))


def _resolver(ctx: typer.Context, given: dict[str, Any], job: dict[str, Any]) -> Callable[[str], Any]:
    """The value of a setting by its job-file key: the command line's when the flag was given
    there, else the job file's, else the flag's default."""

    def value(key: str) -> Any:
        name = PARAMETER_OF.get(key, key)
        source = ctx.get_parameter_source(name)  # by name: typer may ship its own copy of click
        typed = getattr(source, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP") and given[name] not in ([], ())
        if typed or key not in job:
            return given[name]
        return job[key]

    return value


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _optional_path(value: Any) -> Path | None:
    return None if value is None else Path(value)


def _read_model_list(path: Path) -> list[Path]:
    """--models-from: one checkpoint folder a line; blank lines and # comments skipped."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path}: --models-from: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{path}: --models-from: cannot read ({exc.strerror or exc})") from None
    found = [Path(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]
    if not found:
        raise InputError(f"{path}: --models-from: lists no model folder")
    return found


def _parse_shard(text: Any) -> tuple[int, int] | None:
    """'I/N' -> (I, N), 0 <= I < N."""
    if text is None:
        return None
    index, _, count = str(text).partition("/")
    if not (index.strip().isdigit() and count.strip().isdigit()) or not 0 <= int(index) < int(count):
        raise UsageError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4 (I is 0-based)")
    return int(index), int(count)


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
        options = MatchOptions(
            symmetry_set(symmetries),
            parse_layers(layers),
            device,
            1,
            arch,
            arch_spec,
            allow_nonfinite,
            allow_untie=allow_untie,
            allow_stream_output=allow_stream_output,
            fsync=fsync,
        )
        with ui.progress("scrambling layers") as progress:
            result = scramble(model, out, options, seed, overwrite, progress)
        ui.console.print(f"wrote {out} ({result['arch']}, symmetries {','.join(result['symmetries'])}, seed {seed})")
        return result

    ui.emit(run_command(body, debug))
