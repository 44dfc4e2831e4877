"""The `rotfuse` command line. Each command lives in its own module; this file only registers them."""

from __future__ import annotations

import gc
import os
from typing import Annotated

import typer

from rotfuse import __version__
from rotfuse.cli.archs import archs_command
from rotfuse.cli.interpolate import interpolate_command
from rotfuse.cli.match import match_command, scramble_command
from rotfuse.cli.merge import merge_command
from rotfuse.cli.stats import stats_command
from rotfuse.cli.verify import verify_command

app = typer.Typer(
    name="rotfuse",
    help="Align and merge transformer checkpoints using their exact parameter symmetries.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("match")(match_command)
app.command("scramble")(scramble_command)
app.command("stats")(stats_command)
app.command("merge")(merge_command)
app.command("archs")(archs_command)
app.command("verify")(verify_command)
app.command("interpolate")(interpolate_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rotfuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """rotfuse: align and merge transformer checkpoints using their exact parameter symmetries."""


def main() -> None:
    # Tensors of 2 MiB and more in transparent huge pages: converting a checkpoint's tensors spent
    # most of its time faulting in 4 KiB pages (an 11M-element bf16 -> float32 copy: 36 ms, 11 ms
    # with huge pages). torch reads this once, at its first allocation: before a command imports it.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # numpy's OpenBLAS only ever sees tiny matrices here (the rotary solves), but its idle threads
    # spin on the cores the layer threads need
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    gc.disable()  # until the command's imports are in: cli.common.imports_done
    app()
