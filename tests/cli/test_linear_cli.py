"""`rotfuse match -s default,linear` as a user runs it: the aligned copy passes `rotfuse verify`
(same function as MODEL), and the report names the linear maps with their condition numbers."""

from __future__ import annotations

import json

from helpers.cli import run_cli
from helpers.functions import save_pair


def test_match_with_linear_maps_then_verify(tmp_path):
    model, anchor = save_pair("llama", tmp_path)
    report = tmp_path / "report.json"
    result = run_cli("match", anchor, model, "-o", tmp_path / "out", "-s", "default,linear", "--report", report, "-q")
    assert result.returncode == 0, result.stderr
    result = run_cli("verify", model, tmp_path / "out", "--device", "cpu", "-q")
    assert result.returncode == 0, result.stderr
    rows = json.loads(report.read_text())["layers"]
    for row in rows:
        for module in ("attn.qk", "attn.vo"):
            assert "linear" in row["modules"][module]["applied"]
            assert 1.0 <= row["modules"][module]["linear_condition"] <= 1e3
