"""The digits experiment at CI size (`--quick`): it runs end to end from the command line, writes
its table, JSON and plots, and shows the direction of the claim: matching with more symmetries
brings B closer to A (perm+rot < perm < none) without changing B's function."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "experiment_digits.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_experiment_shows_the_distance_ordering(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--work", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    independent = results["summary"]["independent"]
    distance = {variant: cell["distance"]["mean"] for variant, cell in independent.items()}
    assert distance["perm+rot"] < distance["perm"] < distance["none"]
    assert distance["rot"] < distance["none"]
    assert distance["perm+rot+scale"] <= distance["perm+rot"] * (1 + 1e-6)
    # past the paper: each added symmetry may only bring B closer (the residual search keeps the
    # identity map as a candidate)
    assert distance["+heads"] <= distance["perm+rot+scale"] * (1 + 1e-6)
    assert distance["+residual (weights)"] <= distance["+heads"] * (1 + 1e-6)
    # models fine-tuned from one init: weight matching may find little to do, but never moves B away
    # (activation matching fits hidden states and learned matching the merge's loss, not weights:
    # their maps may move them)
    shared = results["summary"]["shared-init"]
    assert all(
        cell["distance"]["mean"] <= shared["none"]["distance"]["mean"] * (1 + 1e-6)
        for variant, cell in shared.items()
        if variant != "+residual (activations)" and not variant.startswith("+learned")
    )
    for run_row in results["runs"]:
        assert run_row["function_change"] < 1e-4  # every matched B is still B
        curve = run_row["curve"]
        assert curve["lambdas"][0] == 0 and curve["lambdas"][-1] == 1 and curve["barrier"] >= 0
        assert run_row["merged_acc"] == curve["midpoint"]["accuracy"]
    table = (out / "results.md").read_text()
    assert "| perm+rot+scale |" in table and "--quick" in table
    for setting in ("independent", "shared-init"):
        assert (out / f"barrier_{setting}.png").read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("rotfuse-digits-")]  # temporary checkpoints gone
