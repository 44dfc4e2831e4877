"""Running the CLI as a user would, and what a one-line error must look like."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: object, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m rotfuse` in a separate process, as a user would."""
    result = subprocess.run([sys.executable, "-m", "rotfuse", *map(str, args)], capture_output=True, text=True)
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
