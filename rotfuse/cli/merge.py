"""`rotfuse merge`: the CLI side only (flags and job file in, report out)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rotfuse.cli.common import (
    FSYNC_HELP,
    Debug,
    DryRun,
    JsonOut,
    Overwrite,
    Quiet,
    Ui,
    imports_done,
    job_file_option,
    run_command,
)
from rotfuse.cli.jobfile import BOOL, LIST, TEXT, Kind
from rotfuse.core.errors import UsageError
from rotfuse.merge.methods import REGISTRY

if TYPE_CHECKING:
    from rotfuse.cli.jobfile import Settings
    from rotfuse.merge.engine import MergeOptions

# flags that are settings of one method or another (the method's Settings dataclass validates them)
METHOD_SETTINGS = (
    "alpha",
    "fisher_floor",
    "fisher_normalize",
    "scale",
    "density",
    "seed",
    "normalize",
    "t",
    "filter_wise",
)

# each job-file key with its flag's type and range (cli/jobfile.Kind); a method's own settings are
# validated again by its Settings dataclass
MERGE_SETTINGS: dict[str, Kind] = {
    "models": LIST,
    "out": TEXT,
    "method": TEXT,
    "weights": LIST,
    "stats": LIST,
    "base": TEXT,
    "alpha": Kind("float", 0.0, 1.0),
    "fisher_floor": Kind("float", 0.0),
    "fisher_normalize": BOOL,
    "scale": Kind("float"),
    "density": Kind("float", 0.0, 1.0),
    "seed": Kind("int"),
    "normalize": BOOL,
    "t": Kind("float", 0.0, 1.0),
    "filter_wise": BOOL,
    "exclude": LIST,
    "head_from": TEXT,
    "match": BOOL,
    "symmetries": TEXT,
    "max_rounds": Kind("int", 1),
    "dtype": TEXT,
    "report": TEXT,
    "arch": TEXT,
    "arch_spec": TEXT,
    "device": TEXT,
    "allow_nonfinite": BOOL,
    "dry_run": BOOL,
    "overwrite": BOOL,
    "fsync": BOOL,
    "quiet": BOOL,
    "json": BOOL,
    "debug": BOOL,
}

JobFile = Annotated[Path | None, job_file_option("models: [...], method: regmean")]


def merge_command(
    models: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Checkpoint folders (two or more, one architecture). The output has the first one's layout, dtype, "
            "config and tokenizer.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder for the merged checkpoint.")] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            "-m",
            help=f"One of {', '.join(REGISTRY)}; fisher and regmean need --stats, task-arithmetic, "
            "ties, dare-linear, dare-ties and model-stock need --base "
            "(`rotfuse merge` README section)  [default: simple]",
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            "-w",
            help="Per-model weights, comma-separated: normalised to sum 1 for simple, fisher, regmean; "
            "task-vector weights as given (negatives allowed) for task-arithmetic, ties, dare-*; "
            "slerp and model-stock take none  [default: uniform; 1 each for task vectors]",
        ),
    ] = None,
    stats: Annotated[
        list[Path] | None,
        typer.Option(
            "--stats",
            help="Statistics folders from `rotfuse stats`, one per model, in the models' order: "
            "--stats A B, --stats A --stats B or --stats A,B.",
            show_default=False,
        ),
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            help="The fine-tunes' common base model (task vectors are model minus base): task-arithmetic, "
            "ties, dare-linear, dare-ties, model-stock. With --match it is aligned like the models.",
            show_default=False,
        ),
    ] = None,
    scale: Annotated[
        float | None,
        typer.Option(
            "--scale",
            help="task-arithmetic, ties, dare-*: lambda, the factor on the combined task vector  [default: 1.0]",
        ),
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            "--density",
            help="ties: fraction of each task vector kept (largest magnitudes, per tensor); dare-*: "
            "probability of keeping each entry; in (0, 1]  [default: ties 0.2, dare-* 0.1]",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", help="dare-*: seed of the drop masks (same seed, same checkpoint on any device)  [default: 0]"
        ),
    ] = None,
    normalize: Annotated[
        bool | None,
        typer.Option(
            "--normalize/--no-normalize",
            help="ties, dare-ties: divide the agreeing entries' sum by their weights' sum "
            "(the disjoint mean)  [default: ties on, dare-ties off, as mergekit]",
            show_default=False,
        ),
    ] = None,
    t: Annotated[
        float | None,
        typer.Option("--t", help="slerp: position between the two models in [0, 1], 0 = the first  [default: 0.5]"),
    ] = None,
    filter_wise: Annotated[
        bool | None,
        typer.Option(
            "--filter-wise/--no-filter-wise",
            help="model-stock: one angle per row instead of per tensor  [default: off]",
            show_default=False,
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            "--alpha", help="RegMean: scale of the Grams' off-diagonal entries (0 = diagonal only)  [default: 0.9]"
        ),
    ] = None,
    fisher_floor: Annotated[
        float | None,
        typer.Option(
            "--fisher-floor",
            help="Fisher: lower bound on each model's Fisher, so that parameters without signal "
            "fall back to the weighted average  [default: 1e-6]",
        ),
    ] = None,
    fisher_normalize: Annotated[
        bool | None,
        typer.Option(
            "--fisher-normalize/--no-fisher-normalize",
            help="Fisher: divide each model's Fisher by its global norm first (models whose Fishers differ in scale, "
            "e.g. different tasks)  [default: off]",
            show_default=False,
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            "-x",
            help="Regex (searched in tensor names; repeatable) of tensors kept out of the merge, "
            "e.g. task heads with different label spaces: copied from --head-from.",
            show_default=False,
        ),
    ] = None,
    head_from: Annotated[
        str | None,
        typer.Option(
            "--head-from",
            help="Model that excluded tensors (and config.json's labels) come from: its index "
            "(0 = first) or its folder  [default: 0]",
        ),
    ] = None,
    match: Annotated[
        bool | None,
        typer.Option(
            "--match/--no-match",
            help="Align every model to the first one (as `rotfuse match`, in memory) before "
            "merging (with --base, the base too). Not fisher/regmean: statistics must be "
            "computed on aligned checkpoints, so for those run match, then stats, then merge.",
            show_default=False,
        ),
    ] = None,
    symmetries: Annotated[
        str | None,
        typer.Option(
            "--symmetries",
            "-s",
            help="With --match: symmetries to use, as for `rotfuse match`  [default: that of `rotfuse match`]",
        ),
    ] = None,
    max_rounds: Annotated[
        int | None,
        typer.Option("--max-rounds", min=1, help="With --match: most rotation/scale rounds per circuit  [default: 20]"),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype", help="Dtype of the merged floating tensors: fp32, fp16, bf16  [default: the first model's]"
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Also write the JSON report here (it is always in OUT/rotfuse_merge.json)."),
    ] = None,
    config: JobFile = None,
    arch: Annotated[
        str | None, typer.Option("--arch", help="With --match: architecture spec to use (see `rotfuse archs`).")
    ] = None,
    arch_spec: Annotated[
        Path | None,
        typer.Option("--arch-spec", dir_okay=False, help="With --match: your own architecture spec (YAML)."),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="Where RegMean solves and --match run: auto (CUDA when available), cpu or cuda  [default: auto]",
        ),
    ] = None,
    allow_nonfinite: Annotated[
        bool,
        typer.Option(
            "--allow-nonfinite", help="Accept checkpoint tensors holding NaN or Inf instead of refusing them."
        ),
    ] = False,
    dry_run: DryRun = False,
    overwrite: Overwrite = False,
    fsync: Annotated[
        bool | None, typer.Option("--fsync/--no-fsync", help=FSYNC_HELP + "  [default: fsync]", show_default=False)
    ] = None,
    quiet: Quiet = False,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Merge checkpoints of one architecture, tensor by tensor (memory: one tensor per model).

    \b
    rotfuse merge a/ b_aligned/ c/ --weights 0.5,0.3,0.2 -o merged/
    rotfuse merge --method regmean a/ b_aligned/ --stats a_stats/ b_stats/ -o merged/
    rotfuse merge --method fisher a/ b_aligned/ --stats a_fisher/ b_fisher/ --exclude classifier -o merged/
    rotfuse merge --match a/ b/ -o merged/
    rotfuse merge --method ties ft1/ ft2/ --base base/ --density 0.2 -o merged/
    rotfuse merge --method slerp a/ b/ --t 0.3 -o merged/
    rotfuse merge --config job.yaml
    """
    from rotfuse.cli.jobfile import Settings, load_config

    job = run_command(lambda: load_config(config, "merge", MERGE_SETTINGS), debug)
    settings = Settings(
        {
            "models": models or None,
            "out": out,
            "method": method,
            "weights": weights,
            "stats": stats or None,
            "base": base,
            "scale": scale,
            "density": density,
            "seed": seed,
            "normalize": normalize,
            "t": t,
            "filter_wise": filter_wise,
            "alpha": alpha,
            "fisher_floor": fisher_floor,
            "fisher_normalize": fisher_normalize,
            "exclude": exclude or None,
            "head_from": head_from,
            "match": match,
            "symmetries": symmetries,
            "max_rounds": max_rounds,
            "dtype": dtype,
            "report": report,
            "arch": arch,
            "arch_spec": arch_spec,
            "device": device,
            "allow_nonfinite": allow_nonfinite or None,
            "dry_run": dry_run or None,
            "overwrite": overwrite or None,
            "fsync": fsync,
            "quiet": quiet or None,
            "json": json_out or None,
            "debug": debug or None,
        },
        job,
    )
    ui = Ui(bool(settings.get("quiet", False)), bool(settings.get("json", False)))

    def body() -> dict[str, Any]:
        from rotfuse.merge.methods import check_statistics

        check_statistics(str(settings.get("method", "simple")), len(_models_and_stats(settings)[1]))
        from rotfuse.merge.engine import prepare_merge
        from rotfuse.merge.scaleout import merge as shared_merge  # shared among torchrun / srun ranks

        imports_done()
        paths, options = _options(settings)
        target, replace = Path(settings.get("out")), bool(settings.get("overwrite", False))
        inputs = [config] if config else []
        if settings.get("dry_run", False):
            plan = prepare_merge(paths, target, options, replace, settings.path("report"), inputs)
            counts = _counts(plan.rules)
            ui.console.print(f"would merge {len(paths)} models with {options.method} into {target}: {counts}")
            return {
                "tool": "rotfuse",
                "command": "merge",
                "dry_run": True,
                "method": options.method,
                "models": [str(p) for p in paths],
                "output": str(target),
                "weights": plan.weights,
                "tensors": {"count": counts, "rules": plan.rules},
                "ignored_tensors": plan.ignored,
            }
        with ui.progress("merging tensors", "tensor") as progress:
            result = shared_merge(paths, target, options, settings.path("report"), replace, progress, inputs)
        rules = result["tensors"]["rules"]
        ui.console.print(f"merged {len(paths)} models with {options.method} ({_counts(rules)}) -> {target}")
        return result

    ui.emit(run_command(body, bool(settings.get("debug", False))))


def _counts(rules: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for rule in rules.values():
        counts[rule] = counts.get(rule, 0) + 1
    return ", ".join(f"{rule}: {n} tensors" for rule, n in sorted(counts.items()))


def _models_and_stats(settings: Settings) -> tuple[list[Path], list[Path]]:
    """The checkpoint folders and the statistics folders, in order.

    `--stats a_stats/ b_stats/` reaches us as stats=[a_stats/] plus a positional b_stats/ (an
    option takes one value); statistics folders announce themselves with their manifest, so they
    are taken back from the positional arguments.
    """
    from rotfuse.cli.jobfile import as_list

    positional = [Path(p) for p in as_list(settings.get("models"))]
    stats = [Path(p) for p in as_list(settings.get("stats"))]
    stats += [p for p in positional if _is_stats_folder(p)]
    return [p for p in positional if not _is_stats_folder(p)], stats


def _options(settings: Settings) -> tuple[list[Path], MergeOptions]:
    """Flags over job file over defaults -> (model paths, MergeOptions)."""
    from rotfuse.cli.jobfile import as_list
    from rotfuse.io.dtypes import parse_dtype_flag
    from rotfuse.merge.engine import MergeOptions
    from rotfuse.symmetry.names import DEFAULT_SYMMETRIES, symmetry_set

    paths, stats = _models_and_stats(settings)
    if settings.get("out") is None:
        raise UsageError("no output folder: pass --out DIR (or out: in the job file)")
    weights, dtype = settings.get("weights"), settings.get("dtype")
    try:
        return paths, MergeOptions(
            method=str(settings.get("method", "simple")),
            weights=None if weights is None else tuple(float(w) for w in as_list(weights)),
            stats=tuple(stats),
            base=settings.path("base"),
            settings={key: settings.get(key) for key in METHOD_SETTINGS if settings.get(key) is not None},
            dtype=None if dtype is None else parse_dtype_flag(str(dtype)),
            exclude=tuple(as_list(settings.get("exclude"), split=False)),
            head_from=_head_index(settings.get("head_from", 0), paths),
            match=bool(settings.get("match", False)),
            symmetries=symmetry_set(str(settings.get("symmetries", DEFAULT_SYMMETRIES))),
            max_rounds=int(settings.get("max_rounds", 20)),
            arch=settings.get("arch"),
            arch_spec=settings.path("arch_spec"),
            device=str(settings.get("device", "auto")),
            allow_nonfinite=bool(settings.get("allow_nonfinite", False)),
            fsync=bool(settings.get("fsync", True)),
        )
    except (TypeError, ValueError) as exc:  # values from a job file (the command line's are typed)
        raise UsageError(f"a setting has the wrong type ({exc}); --weights takes numbers separated by commas") from None


def _is_stats_folder(path: Path) -> bool:
    from rotfuse.merge.stats.folder import MANIFEST_FILE

    return (path / MANIFEST_FILE).is_file() and not (path / "config.json").exists()


def _head_index(value: Any, models: list[Path]) -> int:
    """--head-from: a model index, or one of the model folders."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    for index, model in enumerate(models):
        if Path(text).resolve() == model.resolve():
            return index
    raise UsageError(f"--head-from {text!r}: neither a model index nor one of the model folders")
