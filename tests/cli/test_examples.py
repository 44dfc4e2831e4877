"""The tiny classifier example runs interpolate and Fisher in one command each; Fisher on a bare
encoder names the folder (issue 20 item 6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers.cli import assert_one_line, run_here
from helpers.merge_data import save_inputs, token_inputs
from helpers.tiny_models import save_tiny

ROOT = Path(__file__).resolve().parents[2]


def test_example_classifier_runs_interpolate_and_fisher(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "example_classifier.py"), str(tmp_path / "ex")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    ex = tmp_path / "ex"
    code, err = run_here(
        "interpolate", ex / "a", ex / "b", "--data", ex / "data.safetensors", "--steps", "3", "--device", "cpu", "-q"
    )
    assert code == 0, err
    code, err = run_here(
        "stats",
        ex / "a",
        "--data",
        ex / "data.safetensors",
        "--kind",
        "fisher",
        "-o",
        ex / "a_fisher",
        "--device",
        "cpu",
        "--max-samples",
        "8",
        "-q",
    )
    assert code == 0, err
    assert (ex / "a_fisher" / "stats.safetensors").is_file()


def test_fisher_on_a_bare_encoder_names_the_folder(tmp_path):
    bare = save_tiny("bert-bare", tmp_path / "bare")
    data = save_inputs(tmp_path / "in.safetensors", token_inputs(4, 8, 61, seed=0, labels=2))
    assert_one_line(
        *run_here("stats", bare, "--data", data, "--kind", "fisher", "-o", tmp_path / "f", "--device", "cpu"),
        str(bare),
        "regmean",
    )
