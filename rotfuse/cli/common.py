"""What every rotfuse command shares: flags, error handling, consoles, progress.

Conventions (README "Conventions"): results as JSON on stdout with --json and nothing else there;
tables, progress and messages on stderr; --quiet silences stderr except errors; exit 0 on success,
2 on bad usage or bad input (one line naming the file or tensor), 1 on an internal error, 130 on
Ctrl-C, 143 on SIGTERM. Tracebacks only with --debug. torch is never imported here: `--help`
must stay fast.
"""

from __future__ import annotations

import gc
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from rotfuse.core import signals
from rotfuse.core.distributed import launched_rank
from rotfuse.core.errors import RotfuseError, UsageError

if TYPE_CHECKING:
    from rotfuse.core.selection import LayerRanges

T = TypeVar("T")

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on stderr except errors.")]
JsonOut = Annotated[
    bool, typer.Option("--json", help="Print the machine-readable result on stdout (and nothing else there).")
]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback when something fails.")]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing output (only once the new one is complete).")
]
AllowNonfinite = Annotated[
    bool,
    typer.Option(
        "--allow-nonfinite",
        help="Accept tensors holding NaN or Inf (they are left as they are) instead of refusing the checkpoint.",
    ),
]
FSYNC_HELP = (
    "Flush the output to disk before moving it into place, so that not even a crash or power loss leaves a "
    "complete-looking output with empty files. --no-fsync leaves that to the OS (as cp and save_pretrained "
    "do): faster on scratch disks."
)
Fsync = Annotated[bool, typer.Option("--fsync/--no-fsync", help=FSYNC_HELP)]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Validate the inputs and print the plan; write nothing.")]
Device = Annotated[str, typer.Option("--device", help="Where to compute: auto (CUDA when available), cpu or cuda.")]
Arch = Annotated[
    str | None,
    typer.Option(
        "--arch", help="Architecture spec to use instead of detecting it from config.json (see `rotfuse archs`)."
    ),
]
ArchSpecFile = Annotated[
    Path | None,
    typer.Option(
        "--arch-spec", help="Load your own architecture spec (YAML) instead of a built-in one.", dir_okay=False
    ),
]


LOG_INTERVAL_S = 10.0  # seconds between two progress lines in a log; ROTFUSE_LOG_INTERVAL overrides
LOG_WIDTH = 240  # columns of tables written to a log or pipe: never wrapped at 80


def job_file_option(example: str) -> Any:
    """The --config flag of a command that takes a YAML job file; `example` shows a few of its keys."""
    return typer.Option(
        "--config",
        "-c",
        dir_okay=False,
        help=f"YAML job file: keys are this command's flags ({example}, ...); flags given on the command line win.",
    )


def _clock(seconds: float) -> str:
    """12s, 3m05s, 2h07m: a duration a person reads at a glance."""
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


@dataclass
class LogLines:
    """Progress for a log file or a pipe: a timestamped line once per interval (10 s, or
    ROTFUSE_LOG_INTERVAL seconds) with the model k/M when there is one and the time left
    extrapolated from the steps so far, and the last step if any line came before it. A step
    that ends within the interval logs nothing: a short command's error stays its only line. A
    progress bar would fill a log with carriage returns."""

    write: Callable[[str], None]
    description: str
    unit: str
    context: str = ""
    note: str = ""  # a live figure appended to each line (the current loss)

    def __post_init__(self) -> None:
        import os
        import time

        self._now = time.monotonic
        self._started = self._last = self._now()
        self._printed = False
        try:
            self.interval = max(0.0, float(os.environ.get("ROTFUSE_LOG_INTERVAL", LOG_INTERVAL_S)))
        except ValueError:
            self.interval = LOG_INTERVAL_S

    def __call__(self, done: int, total: int) -> None:
        now = self._now()
        final = total > 0 and done >= total
        if not (final and self._printed) and now - self._last < self.interval:
            return
        self._printed = True
        self._last = now
        spent = now - self._started
        left = f", ETA {_clock(spent / done * (total - done))}" if 0 < done < total else ""
        where = f"{self.context}: " if self.context else ""
        figure = f", {self.note}" if self.note else ""
        self.write(f"{where}{self.description}: {self.unit} {done}/{total}, elapsed {_clock(spent)}{left}{figure}")


@dataclass
class Ui:
    """Where human output goes, given --quiet / --json, and in which form: a progress bar on a
    terminal; timestamped lines and unwrapped tables in a log or a pipe (batch jobs)."""

    quiet: bool = False
    json: bool = False

    def __post_init__(self) -> None:
        from rich.console import Console

        if launched_rank() > 0:  # several processes on one job: rank 0 speaks for it
            self.quiet, self.json = True, False
        self.console = Console(stderr=True, quiet=self.quiet, highlight=False)
        if not self.console.is_terminal:
            self.console = Console(stderr=True, quiet=self.quiet, highlight=False, width=LOG_WIDTH)
        self.context = ""  # "model 2/5 (m2)" while a batch runs

    def emit(self, result: dict[str, Any]) -> None:
        if self.json:
            from rotfuse.core.report import dumps_strict

            sys.stdout.write(dumps_strict(result) + "\n")
            sys.stdout.flush()

    def log(self, message: str) -> None:
        """One line on stderr, timestamped in a log (not on a terminal); nothing with --quiet."""
        if self.quiet:
            return
        if self.console.is_terminal:
            self.console.print(message, markup=False)
            return
        import time

        sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} rotfuse: {message}\n")
        sys.stderr.flush()

    def model_started(self, number: int, count: int, name: str) -> None:
        """A batch moves on to model `number` of `count`: said once, and named in progress lines."""
        self.context = f"model {number}/{count} ({name})"
        self.log(f"{self.context}: started")

    @contextmanager
    def progress(self, description: str, unit: str = "layer") -> Iterator[Callable[[int, int], None] | None]:
        """A progress bar over `unit`s on a terminal; plain timestamped lines in logs and pipes;
        None with --quiet."""
        if self.quiet:
            yield None
            return
        if not self.console.is_terminal:
            yield _ContextLines(self, description, unit)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=self.console,
            transient=True,
        ) as bar:
            yield _Bar(bar, bar.add_task(description, total=None, note=""))


class _Bar:
    """The terminal's progress bar (rich); a new stage replaces the finished one's task."""

    def __init__(self, bar: Any, task: Any) -> None:
        self.bar, self.task = bar, task

    def __call__(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total)

    def stage(self, description: str, unit: str) -> None:
        self.bar.remove_task(self.task)
        self.task = self.bar.add_task(description, total=None, note="")

    def note(self, text: str) -> None:
        self.bar.update(self.task, note=text)


class _ContextLines:
    """Log lines that follow the Ui's current model: a new LogLines (clock restarted) per model
    and per stage."""

    def __init__(self, ui: Ui, description: str, unit: str) -> None:
        self.ui, self.description, self.unit = ui, description, unit
        self.lines: LogLines | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.lines is None or self.lines.context != self.ui.context:
            self.lines = LogLines(self.ui.log, self.description, self.unit, self.ui.context)
        self.lines(done, total)

    def stage(self, description: str, unit: str) -> None:
        self.description, self.unit, self.lines = description, unit, None

    def note(self, text: str) -> None:
        if self.lines is None:
            self.lines = LogLines(self.ui.log, self.description, self.unit, self.ui.context)
        self.lines.note = text


def imports_done() -> None:
    """Turn the cyclic garbage collector back on (`main` turns it off), with every object the
    imports made frozen out of its scans. Importing torch creates several hundred thousand
    objects; collecting while they pile up cost a command ~0.4 s of CPU, the work none. A no-op
    where the collector was left on (rotfuse called as a library, tests)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def run_command(action: Callable[[], T], debug: bool) -> T:
    """Run a command body, turning failures into one stderr line and the right exit code.

    Ctrl-C and SIGTERM (rotfuse/signals.py): before the output is in place they end the command
    (staging removed, "no output was written"); once it is, the command finishes and then exits
    130/143 saying that the output is complete."""
    previous = signals.install()
    try:
        result = action()
    except RotfuseError as exc:
        _fail_signalled(exc, debug)
        _fail(exc, debug, f"rotfuse: error: {exc}", exc.exit_code)
    except OSError as exc:
        _fail_signalled(exc, debug)
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(exc, debug, f"rotfuse: error: {where}{exc.strerror or exc}", 2)
    except KeyboardInterrupt as exc:
        _fail(exc, debug, f"rotfuse: interrupted; {_what_was_written()}", 130)
    except signals.Interrupted as exc:
        _fail(exc, debug, f"rotfuse: {exc.verb}; {_what_was_written()}", exc.exit_code)
    except Exception as exc:  # a bug in rotfuse
        _fail_signalled(exc, debug)
        _fail(
            exc,
            debug,
            f"rotfuse: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            1,
        )
    finally:
        signals.restore(previous)
    late = signals.pending()
    if late is not None:
        where = ", ".join(str(p) for p in signals.completed_outputs())
        sys.stderr.write(f"rotfuse: {late.verb} after the output was complete: {where} is whole\n")
        raise typer.Exit(late.exit_code)
    return result


def _fail_signalled(exc: BaseException, debug: bool) -> None:
    """Exit as the signal did where a signal's `Interrupted` became another error on its way out
    of a C extension (safetensors turns it into a TypeError mid-read): not as that error."""
    signalled = signals.raised()
    if signalled is not None:
        _fail(exc, debug, f"rotfuse: {signalled.verb}; {_what_was_written()}", signalled.exit_code)


def _what_was_written() -> str:
    """After a signal: nothing, or (a batch) the outputs finished before it, which are whole."""
    done = signals.finished_outputs()
    if not done:
        return "no output was written"
    return (
        f"{len(done)} finished output(s) are whole ({', '.join(str(p) for p in done)}); the one in progress "
        "was not written; rerun with --skip-existing to do the rest"
    )


def _fail(exc: BaseException, debug: bool, line: str, code: int) -> None:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    elif launched_rank() > 0:
        raise typer.Exit(code)  # every rank fails with the job's code; rank 0 prints its line
    sys.stderr.write(" ".join(line.split("\n")) + "\n")
    raise typer.Exit(code)


def require(module: str, what: str) -> None:
    """Bad input (exit 2, before any work), not an internal error, when `what` needs an optional
    dependency that is not installed: name the package and the command that installs it. It is
    imported here, so a broken install is caught too (the command imports it next anyway)."""
    from importlib import import_module

    try:
        import_module(module)
    except ImportError as exc:
        raise UsageError(
            f"{what} needs the Python package {module}, which cannot be imported "
            f"({type(exc).__name__}: {exc}); install it with: pip install 'rotfuse[models]'"
        ) from None


def parse_layers(text: str | None) -> LayerRanges | None:
    """'0-5,8' -> those ranges (checked against the model's layer count later, never expanded);
    None -> None (every layer)."""
    from rotfuse.core.selection import parse_layer_ranges

    if text is None:
        return None
    try:
        return parse_layer_ranges(text)
    except ValueError:
        raise UsageError(f"--layers {text!r}: expected indices and ranges like 0-5,8") from None
