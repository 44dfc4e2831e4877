"""Running the CLI as a user would, and what a one-line error must look like."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_cli(
    *args: object, check: bool = False, cwd: Path | None = None, timeout: float = 600, **kwargs: Any
) -> subprocess.CompletedProcess:
    """Run `python -m rotfuse` in a separate process, as a user would."""
    result = subprocess.run(
        [sys.executable, "-m", "rotfuse", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"rotfuse {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, one line on stderr starting `rotfuse: error: `, no traceback, naming every fragment."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rotfuse: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def run_here(*args: Any, cwd: Path | None = None) -> tuple[int, str]:
    """Run `rotfuse ARGS` in this process (fast enough for many fuzz examples); (status, stderr)."""
    from rotfuse.cli import run

    err, out = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = run([str(a) for a in args])
    finally:
        os.chdir(previous)
    return code, err.getvalue()


def assert_clean_exit(code: int, stderr: str) -> None:
    """0, or 2 with exactly one `rotfuse: error:` line -- never 1 (an internal error), never a traceback."""
    assert code in (0, 2), (code, stderr)
    assert "Traceback" not in stderr, stderr
    if code == 2:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rotfuse: error: "), stderr


def assert_one_line(code: int, stderr: str, *fragments: str) -> str:
    assert code == 2, (code, stderr)
    assert_clean_exit(code, stderr)
    line = stderr.strip()
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def match_verify_merge(anchor: Path, model: Path, root: Path, symmetries: str = "default") -> Path:
    """Through the CLI in this process: match MODEL onto ANCHOR, verify that the copy computes
    MODEL's function, merge it with ANCHOR; every step must exit 0. Returns the merged folder."""
    matched, merged = root / "matched", root / "merged"
    for args in (
        ("match", anchor, model, "-s", symmetries, "-o", matched, "-q"),
        ("verify", model, matched, "-q"),
        ("merge", anchor, matched, "-o", merged, "-q"),
    ):
        code, err = run_here(*args)
        assert code == 0, (args[0], err)
    assert (merged / "model.safetensors").exists()
    return merged
