"""`rotfuse stats`: the CLI side only (flags and job file in, manifest out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from rotfuse.cli.common import Debug, JsonOut, Overwrite, Quiet, Ui, imports_done, job_file_option, require, run_command
from rotfuse.cli.jobfile import BOOL, TEXT, Kind
from rotfuse.core.errors import UsageError

# each job-file key with its flag's type and range (merge/config.Kind)
STATS_SETTINGS: dict[str, Kind] = {
    "model": TEXT,
    "data": TEXT,
    "kind": TEXT,
    "out": TEXT,
    "max_samples": Kind("int", 1),
    "batch_size": Kind("int", 1),
    "max_length": Kind("int", 1),
    "labels": TEXT,
    "seed": Kind("int"),
    "model_dtype": TEXT,
    "device": TEXT,
    "overwrite": BOOL,
    "quiet": BOOL,
    "json": BOOL,
    "debug": BOOL,
}


def stats_command(
    model: Annotated[
        Path | None, typer.Argument(help="Checkpoint folder (never modified).", show_default=False)
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            "-d",
            dir_okay=False,
            help="Inputs: .jsonl (a 'text' field, optional integer 'label') or .txt (one text a line), tokenised "
            "with the checkpoint's tokenizer; or .safetensors/.npz with input_ids, attention_mask, "
            "pixel_values, labels, ... (vision models).",
        ),
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            "--kind",
            "-k",
            help="regmean (a Gram matrix per linear-layer input) or fisher (a diagonal Fisher per parameter).",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder for the statistics.")] = None,
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", min=1, help="Use the first N samples of --data  [default: 256]")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            help="Samples per forward pass (regmean; fisher backpropagates one sample at a time)  [default: 8]",
        ),
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option("--max-length", min=1, help="Longest tokenised text (longer ones are cut)  [default: 128]"),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="fisher: auto (the data's labels when it has some, else sampled), sampled (from the "
            "model's own prediction) or data  [default: auto]",
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="fisher: seed of the sampled labels  [default: 0]")] = None,
    model_dtype: Annotated[
        str | None,
        typer.Option(
            "--model-dtype",
            help="Dtype to run the model in: auto (regmean on CUDA: the checkpoint's; otherwise "
            "fp32), fp32, fp16, bf16. Statistics are accumulated in float32 regardless  "
            "[default: auto]",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="Where to run: auto (CUDA when available), cpu or cuda  [default: auto]"),
    ] = None,
    config: Annotated[Path | None, job_file_option("model: a/, kind: regmean")] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Compute MODEL's statistics on data, for `rotfuse merge --method regmean|fisher`.

    The statistics are keyed by MODEL's tensor names and stamped with its fingerprint: compute
    them on the exact checkpoint you merge (after `rotfuse match`, on the aligned copy).

    \b
    rotfuse stats a/ --data a_inputs.jsonl --kind regmean -o a_stats/
    rotfuse stats vit/ --data images.safetensors --kind fisher -o vit_fisher/
    """
    from rotfuse.cli.jobfile import Settings, load_config

    job = run_command(lambda: load_config(config, "stats", STATS_SETTINGS), debug)
    settings = Settings(
        {
            "model": model,
            "data": data,
            "kind": kind,
            "out": out,
            "max_samples": max_samples,
            "batch_size": batch_size,
            "max_length": max_length,
            "labels": labels,
            "seed": seed,
            "model_dtype": model_dtype,
            "device": device,
            "overwrite": overwrite or None,
            "quiet": quiet or None,
            "json": json_out or None,
            "debug": debug or None,
        },
        job,
    )
    ui = Ui(bool(settings.get("quiet", False)), bool(settings.get("json", False)))

    def body() -> dict[str, Any]:
        require("transformers", "rotfuse stats")
        from rotfuse.merge.stats.collect import StatsOptions, compute_stats

        imports_done()

        for key, flag in (("model", "MODEL"), ("data", "--data"), ("kind", "--kind"), ("out", "--out")):
            if settings.get(key) is None:
                raise UsageError(f"missing {flag} (on the command line or as {key}: in the job file)")
        try:
            max_samples_value = settings.get("max_samples", 256)
            options = StatsOptions(
                kind=str(settings.get("kind")),
                max_samples=None if max_samples_value is None else int(max_samples_value),
                batch_size=int(settings.get("batch_size", 8)),
                max_length=int(settings.get("max_length", 128)),
                labels=str(settings.get("labels", "auto")),
                seed=int(settings.get("seed", 0)),
                device=str(settings.get("device", "auto")),
                model_dtype=str(settings.get("model_dtype", "auto")),
            )
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{config}: a setting has the wrong type ({exc})") from None
        target = settings.path("out")
        unit = "batch" if options.kind == "regmean" else "sample"  # fisher backpropagates one at a time
        with ui.progress(f"{options.kind} statistics of {settings.get('model')}", unit) as progress:
            model, data = settings.path("model"), settings.path("data")
            assert model is not None and data is not None and target is not None  # checked above
            manifest = compute_stats(
                model,
                data,
                target,
                options,
                bool(settings.get("overwrite", False)),
                progress,
                [config] if config else [],
            )
        count = len(manifest.get("inputs") or manifest.get("parameters") or ())
        what = "Gram matrices" if options.kind == "regmean" else "Fisher tensors"
        ui.console.print(
            f"wrote {count} {what} of {settings.get('model')} ({manifest['data']['samples']} samples) to {target}"
        )
        return manifest

    ui.emit(run_command(body, bool(settings.get("debug", False))))
