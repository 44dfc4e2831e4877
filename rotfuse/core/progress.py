"""The progress callback every long-running step reports through: `progress(done, total)`.

A display that can do more (the CLI's bar on a terminal, its timestamped lines in a log) also
implements `Stages`: a step that runs after another one under the same display (learning after
matching) starts its own stage, and a live figure (the current loss) goes in a note."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

Progress = Callable[[int, int], None]


@runtime_checkable
class Stages(Protocol):
    """A progress display with stages and a live note."""

    def stage(self, description: str, unit: str) -> None:
        """Start counting a new step from zero: `description` and `unit` name it."""

    def note(self, text: str) -> None:
        """A short live figure shown with the count (e.g. 'loss 2.314'); replaces the last one."""


def start_stage(progress: Progress | None, description: str, unit: str) -> None:
    """Start a new stage where the display supports it; a plain callback just keeps counting."""
    if isinstance(progress, Stages):
        progress.stage(description, unit)


def show_note(progress: Progress | None, text: str) -> None:
    """Show a live figure where the display supports it."""
    if isinstance(progress, Stages):
        progress.note(text)
