"""`rotfuse verify`: the CLI side only (flags in, verdict out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from rotfuse.cli.common import AllowNonfinite, Debug, Device, JsonOut, Quiet, Ui, imports_done, require, run_command

DIFFERENT = 3  # exit status when the check ran and the outputs disagree (1 stays "internal error")

BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Samples per forward pass.")]
DataFile = Annotated[
    Path | None,
    typer.Option(
        "--data",
        dir_okay=False,
        help="Inputs to run: .jsonl/.txt (tokenised with the first checkpoint's tokenizer), "
        "or .safetensors/.npz tensors.",
    ),
]


def verify_command(
    original: Annotated[Path, typer.Argument(help="Reference checkpoint folder.")],
    aligned: Annotated[Path, typer.Argument(help="Checkpoint folder that should compute the same function.")],
    data: DataFile = None,
    samples: Annotated[
        int | None,
        typer.Option(
            "--samples",
            min=1,
            help="Inputs to compare: the first N of --data [default: all], or N random ones [default: 8].",
        ),
    ] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="Length of random token sequences.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random inputs.")] = 0,
    atol: Annotated[
        float | None,
        typer.Option(
            "--atol",
            min=0.0,
            help="Absolute tolerance [default: by the least precise stored dtype: "
            "1e-4 for fp32, 1e-2 fp16, 5e-2 bf16].",
        ),
    ] = None,
    rtol: Annotated[
        float | None,
        typer.Option(
            "--rtol", min=0.0, help="Relative tolerance (to |original output|) [default: by dtype, as --atol]."
        ),
    ] = None,
    batch_size: BatchSize = 16,
    device: Device = "auto",
    allow_nonfinite: AllowNonfinite = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Check that ALIGNED computes the same function as ORIGINAL: run both with transformers.

    Without --data: deterministic random inputs valid for the architecture (token ids, pixel tensors).

    Outputs agree when |aligned - original| <= atol + rtol * |original| everywhere.

    Exit status: 0 they agree, 3 they differ, 2 bad input, 1 internal error.
    """
    ui = Ui(quiet, json_out)

    def body() -> dict[str, Any]:
        require("transformers", "rotfuse verify")
        from rotfuse.core.device import resolve_device
        from rotfuse.eval.verify import VerifyOptions, verify

        imports_done()

        options = VerifyOptions(
            data, samples, seq_len, seed, atol, rtol, resolve_device(device), batch_size, allow_nonfinite
        )
        result = verify(original, aligned, options)
        verdict = (
            "SAME FUNCTION: outputs agree within tolerance"
            if result["agree"]
            else "DIFFERENT: outputs disagree beyond tolerance"
        )
        ui.console.print(
            f"{aligned} vs {original} on {result['inputs']['samples']} inputs ({result['inputs']['source']}):\n"
            f"  max abs diff {result['max_abs_diff']:.3g}, max rel diff {result['max_rel_diff']:.3g} "
            f"(output scale {result['output_scale']:.3g}; atol {result['atol']:g}, rtol {result['rtol']:g})\n"
            f"  {verdict}"
        )
        return result

    result = run_command(body, debug)
    ui.emit(result)
    if not result["agree"]:
        raise typer.Exit(DIFFERENT)
