"""Ctrl-C (SIGINT) and SIGTERM: an exit that tells the truth about the output.

Until a command's output is in place, a signal raises `Interrupted`: the staging folder is removed
on the way out and the command exits 130 (SIGINT) or 143 (SIGTERM) saying no output was written.
From the moment the output starts moving into place (`output_complete`), a signal is only
recorded: the little that is left (a report beside the output, a flush) runs to its end, and the
command then exits 130/143 saying the output is complete. The handlers are installed first thing
in `rotfuse.__main__`, before the CLI's imports, so even a Ctrl-C during start-up gets one line.

Deliberately light (no typer, no torch): it runs before anything else is imported.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Raised by the handler before any output is in place (a BaseException, like Ctrl-C's own,
    so that no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def verb(self) -> str:
        return "interrupted" if self.signum == signal.SIGINT else "terminated"


class _State:
    """What the handler needs to know: whether an output is (being) put in place, and which."""

    def __init__(self) -> None:
        self.complete: list[Path] = []
        self.pending: int | None = None
        self.finished: list[Path] = []  # whole outputs of a batch that goes on (match_many)
        self.raised: int | None = None  # the signal whose Interrupted was raised, whatever became of it


_state = _State()


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state.complete:
        _state.pending = signum  # the output is in place: finish, then say so
        return
    _state.raised = signum
    raise Interrupted(signum)


def install() -> dict[int, object]:
    """Install the handlers; returns the previous ones (for `restore`)."""
    previous: dict[int, object] = {}
    for number in HANDLED:
        try:
            previous[number] = signal.signal(number, _handler)
        except ValueError:  # not the main thread (rotfuse used as a library): leave signals alone
            pass
    return previous


def restore(previous: dict[int, object]) -> None:
    for number, handler in previous.items():
        signal.signal(number, handler)  # type: ignore[arg-type]


def reset() -> None:
    """Forget earlier outputs and signals (a new command in the same process)."""
    _state.complete = []
    _state.pending = None
    _state.finished = []
    _state.raised = None


def output_complete(path: Path) -> None:
    """Call just before an output is moved into place: from here on signals wait for the end."""
    _state.complete.append(Path(path))


def output_incomplete(path: Path) -> None:
    """Moving it into place failed after all: signals end the command again."""
    if Path(path) in _state.complete:
        _state.complete.remove(Path(path))


def output_finished(path: Path) -> None:
    """One output of a batch is in place and the batch goes on: signals end the command again
    (a signal held while it moved into place ends it now), and the exit line names the outputs
    finished so far, which a rerun with --skip-existing keeps."""
    output_incomplete(path)
    _state.finished.append(Path(path))
    if _state.pending is not None and not _state.complete:
        signum, _state.pending = _state.pending, None
        _state.raised = signum
        raise Interrupted(signum)


def raised() -> Interrupted | None:
    """The signal that ended the command, even where a C extension caught its `Interrupted` and
    raised an error of its own instead (safetensors does, mid-read)."""
    return None if _state.raised is None else Interrupted(_state.raised)


def finished_outputs() -> list[Path]:
    return list(_state.finished)


def pending() -> Interrupted | None:
    """The signal that arrived once the output was in place, if any."""
    return None if _state.pending is None else Interrupted(_state.pending)


def completed_outputs() -> list[Path]:
    return list(_state.complete)


def quiet_exit(exc: Interrupted) -> None:
    """One line and the signal's exit status, for a signal outside any command (start-up)."""
    sys.stderr.write(f"rotfuse: {exc.verb}; no output was written\n")
    sys.exit(exc.exit_code)
