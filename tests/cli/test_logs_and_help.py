"""Help text shows every command's real defaults (issue 20 item 5), and batch-job logs (item 2)."""

from __future__ import annotations

import click
import pytest
import typer.main
from typer.testing import CliRunner

from rotfuse.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.split())


def _options(command: str) -> list[click.Option]:
    group = typer.main.get_command(app)
    return [p for p in group.commands[command].params if isinstance(p, click.Option)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default(command):
    """A default given in code is printed; one written into the help string is printed as
    written (rich markup used to swallow "[default: ...]" as a tag); flags show no <bool>."""
    text = _help(command)
    assert "<bool>" not in text
    for option in _options(command):
        if option.name == "help":
            continue
        written = " ".join((option.help or "").split())
        if "[default:" in written:
            shown = written[written.index("[default:"):]
            assert shown[: shown.index("]") + 1] in text, (option.name, shown)
        elif option.is_flag and option.secondary_opts:  # --fsync/--no-fsync
            assert f"[default: {option.opts[0].lstrip('-') if option.default else option.secondary_opts[0].lstrip('-')}]" in text
        elif option.default not in (None, False, ()) and not option.is_flag:
            assert f"[default: {option.default}" in text, (command, option.name, option.default)


@pytest.mark.parametrize("command, value", [("merge", "simple"), ("merge", "0.9"), ("merge", "1e-6"),
                                            ("stats", "256"), ("stats", "128"),
                                            ("match", "OUT/rotfuse_report.json"), ("match", "min(4, CPUs)")])
def test_help_shows_defaults_of_settings_a_job_file_may_give(command, value):
    assert f"[default: {value}]" in _help(command)


def test_stats_config_help_is_its_own():
    assert "kind: regmean" in _help("stats") and "method: regmean" not in _help("stats")


def test_version_short_flag_and_completion():
    result = CliRunner().invoke(app, ["-V"])
    assert result.exit_code == 0 and result.stdout.startswith("rotfuse ")
    assert "--install-completion" in _help()
