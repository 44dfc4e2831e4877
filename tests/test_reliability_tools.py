"""Helpers shared by the test_reliability_* files (no tests here): the CLI in this process, the
exit-status contract, and hand-made damage to checkpoint files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


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


def run_cli(*args: Any, cwd: Path | None = None, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rotfuse", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, **kwargs)


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


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".rotfuse-tmp-", ".rotfuse-old-")))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def header_of(path: Path) -> tuple[str, bytes]:
    """A safetensors file's header text and its data buffer."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + length].decode("utf-8"), raw[8 + length:]


def write_header(path: Path, text: str | bytes, data: bytes) -> None:
    encoded = text.encode("utf-8") if isinstance(text, str) else text
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def edit_header(path: Path, change: Callable[[str], str | bytes]) -> None:
    """Rewrite a safetensors header through `change` (text in, text out), keeping the data."""
    text, data = header_of(path)
    write_header(path, change(text), data)


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
