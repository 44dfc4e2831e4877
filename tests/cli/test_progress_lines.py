"""Progress in logs and pipes: timestamped lines per stage, with the live note."""

from __future__ import annotations

import pytest

from rotfuse.cli.common import Ui
from rotfuse.core.progress import show_note, start_stage


def test_log_lines_follow_stages_and_carry_the_note(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("ROTFUSE_LOG_INTERVAL", "0")
    ui = Ui()
    assert not ui.console.is_terminal  # pytest captures stderr: the log form
    with ui.progress("matching layers") as progress:
        assert progress is not None
        progress(1, 2)
        progress(2, 2)
        start_stage(progress, "learning", "step")
        progress(1, 3)
        show_note(progress, "batch loss 2.5000")
        progress(2, 3)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("rotfuse: ", 1)[1].split(", elapsed")[0] for line in lines] == [
        "matching layers: layer 1/2",
        "matching layers: layer 2/2",
        "learning: step 1/3",
        "learning: step 2/3",
    ]
    assert lines[-1].endswith(", batch loss 2.5000") and "batch loss" not in lines[-2]


def test_plain_callbacks_ignore_stages_and_notes() -> None:
    seen: list[tuple[int, int]] = []
    start_stage(lambda done, total: seen.append((done, total)), "learning", "step")
    show_note(None, "loss 1")
    assert seen == []


def test_terminal_bar_shows_the_stage_and_the_note() -> None:
    import io

    from rich.console import Console

    ui = Ui()
    screen = io.StringIO()
    ui.console = Console(file=screen, force_terminal=True, width=120)
    with ui.progress("matching layers") as progress:
        assert progress is not None
        progress(2, 2)
        start_stage(progress, "learning", "step")
        progress(3, 10)
        show_note(progress, "batch loss 2.5000")
    shown = screen.getvalue()
    assert "learning" in shown and "3/10" in shown and "batch loss 2.5000" in shown
