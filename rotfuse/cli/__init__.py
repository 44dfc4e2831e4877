"""The `rotfuse` command line. Each command lives in its own module; this file only registers them."""

from __future__ import annotations

import gc
import os
import sys
from typing import Annotated

import typer

from rotfuse import __version__
from rotfuse.cli.archs import archs_command
from rotfuse.cli.interpolate import interpolate_command
from rotfuse.cli.match import match_command, scramble_command
from rotfuse.cli.merge import merge_command
from rotfuse.cli.stats import stats_command
from rotfuse.cli.verify import verify_command
from rotfuse.core.distributed import launch_env

app = typer.Typer(
    name="rotfuse",
    help="Align and merge transformer checkpoints using their exact parameter symmetries.",
    no_args_is_help=True,
    # plain click help: every "[default: ...]" in a help string is printed as written (rich markup
    # would swallow it as a tag) and on/off flags show no "<bool>" metavar
    rich_markup_mode=None,
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
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """rotfuse: align and merge transformer checkpoints using their exact parameter symmetries."""


def run(argv: list[str] | None = None) -> int:
    """Run one command in this process and return its exit status (`main` exits with it; tests
    call it directly). Flag errors (an unknown option, a missing --out, --workers 0) are one line
    on stderr and exit 2, like every other usage error, instead of click's framed box."""
    from rotfuse.core import signals

    signals.reset()
    try:
        result = app(args=argv, standalone_mode=False, prog_name="rotfuse")
    except typer.TyperException as exc:  # click's exceptions, as typer ships them
        if type(exc).__name__ == "NoArgsIsHelpError":  # `rotfuse` alone: the help, as before
            exc.show()  # type: ignore[attr-defined]
            return int(getattr(exc, "exit_code", 2))
        command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "rotfuse"  # type: ignore[attr-defined]
        message = " ".join(exc.format_message().split())
        sys.stderr.write(f"rotfuse: error: {message} (see '{command} --help')\n")
        return 2
    except typer.Abort:
        sys.stderr.write("rotfuse: interrupted; no output was written\n")
        return 130
    except signals.Interrupted as exc:  # while parsing flags, before a command started
        sys.stderr.write(f"rotfuse: {exc.verb}; no output was written\n")
        return exc.exit_code
    return result if isinstance(result, int) else 0


def main() -> None:
    # Tensors of 2 MiB and more in transparent huge pages: converting a checkpoint's tensors spent
    # most of its time faulting in 4 KiB pages (an 11M-element bf16 -> float32 copy: 36 ms, 11 ms
    # with huge pages). torch reads this once, at its first allocation: before a command imports it.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # numpy's OpenBLAS only ever sees tiny matrices here (the rotary solves), but its idle threads
    # spin on the cores the layer threads need
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    gc.disable()  # until the command's imports are in: cli.common.imports_done
    code = run()
    if launch_env() is not None:
        # Every rank of a multi-process job, failed or not, leaves without the interpreter's
        # teardown: torch's C++ threads (gloo, the store) have aborted it there ("terminate called
        # without an active exception", SIGABRT instead of the job's exit code) once the other ranks
        # were gone -- after a failure, and now and then after a success too. By here the outputs
        # are in place (or removed) and every file is closed; only the standard streams to flush.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
