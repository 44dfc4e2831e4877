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
            shown = written[written.index("[default:") :]
            assert shown[: shown.index("]") + 1] in text, (option.name, shown)
        elif option.is_flag and option.secondary_opts:  # --fsync/--no-fsync
            chosen = option.opts[0] if option.default else option.secondary_opts[0]
            assert f"[default: {chosen.lstrip('-')}]" in text
        elif option.default not in (None, False, ()) and not option.is_flag:
            assert f"[default: {option.default}" in text, (command, option.name, option.default)


@pytest.mark.parametrize(
    "command, value",
    [
        ("merge", "simple"),
        ("merge", "0.9"),
        ("merge", "1e-6"),
        ("stats", "256"),
        ("stats", "128"),
        ("match", "OUT/rotfuse_report.json"),
        ("match", "min(4, this process's CPUs / ranks sharing them)"),
    ],
)
def test_help_shows_defaults_of_settings_a_job_file_may_give(command, value):
    assert f"[default: {value}]" in _help(command)


def test_stats_config_help_is_its_own():
    assert "kind: regmean" in _help("stats") and "method: regmean" not in _help("stats")


def test_version_short_flag_and_completion():
    result = CliRunner().invoke(app, ["-V"])
    assert result.exit_code == 0 and result.stdout.startswith("rotfuse ")
    assert "--install-completion" in _help()


# ---------------------------------------------------------------------- logs of batch jobs (item 2)

STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d rotfuse: "


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    from helpers.tiny_models import save_tiny

    root = tmp_path_factory.mktemp("trio")
    return [save_tiny("bert", root / name, seed=seed) for seed, name in enumerate(["a", "b", "c"])]


def test_match_in_a_log_prints_timestamped_lines_and_whole_tables(trio, tmp_path, monkeypatch):
    import re

    monkeypatch.setenv("ROTFUSE_LOG_INTERVAL", "0")  # every step: tiny models finish within 10 s

    from helpers.cli import run_here

    a, b, c = trio
    code, err = run_here("match", a, b, c, "-o", tmp_path / "out", "--device", "cpu")
    assert code == 0, err
    assert "\r" not in err and "━" * 3 in err  # no progress bar; tables still drawn
    progress = [line for line in err.splitlines() if re.match(STAMP, line)]
    assert any("model 1/2 (b): started" in line for line in progress)
    assert any(re.search(r"model 2/2 \(c\): matching layers: layer 2/2, elapsed \d+s", line) for line in progress)
    titles = [line for line in err.splitlines() if "rotfuse match:" in line]
    assert [str(b) in titles[0], str(c) in titles[1]] == [True, True]  # the model named in each table
    header = next(line for line in err.splitlines() if "attn.qk before" in line)
    assert "ffn after" in header  # one table row on one line: not wrapped at 80 columns
    assert re.search(r"timings of .*: .*total \d+\.\d\ds", err)


def test_interpolate_in_a_log_prints_lambda_lines(trio, tmp_path, monkeypatch):
    import re

    monkeypatch.setenv("ROTFUSE_LOG_INTERVAL", "0")

    from helpers.cli import run_here
    from helpers.merge_data import save_inputs, token_inputs

    a, b, _ = trio
    data = save_inputs(tmp_path / "in.safetensors", token_inputs(4, 8, 61, seed=0, labels=2))
    code, err = run_here("interpolate", a, b, "--data", data, "--steps", "3", "--device", "cpu")
    assert code == 0, err
    assert any(re.match(STAMP + r"curve 1/1 .*: lambda 3/3", line) for line in err.splitlines()), err


def test_a_short_step_logs_no_progress_line(trio, tmp_path):
    """Within the interval nothing is logged: a short command's output is its result alone."""
    from helpers.cli import run_here

    a, b, _ = trio
    code, err = run_here("match", a, b, "-o", tmp_path / "out", "--device", "cpu")
    assert code == 0, err
    assert "matching layers" not in err
