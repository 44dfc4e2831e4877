"""`rotfuse merge --match` as several processes (gloo on the CPU): each rank aligns and merges
its share of the layers, the rest is shared as for a plain merge; the checkpoint bytes and the
report (alignment distances included, timings apart) are those of one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.launch import folder_bytes, torchrun
from helpers.tiny_models import save_tiny

from rotfuse.merge.engine import REPORT_NAME

pytestmark = pytest.mark.slow


def _report(folder: Path) -> dict:
    report = json.loads((folder / REPORT_NAME).read_text())
    report.pop("timings")
    report["output"].pop("path")
    return report


def test_merge_match_at_world_size_2_gives_the_single_process_bytes(tmp_path: Path) -> None:
    models = [
        save_tiny("bert", tmp_path / name, seed=seed, max_shard_size="20KB")
        for name, seed in (("a", 1), ("b", 2), ("c", 3))
    ]
    args = ["merge", "--match", *models, "--weights", "0.5,0.3,0.2", "--device", "cpu", "--no-fsync"]
    run_cli(*args, "-o", tmp_path / "one", check=True)
    expected = folder_bytes(tmp_path / "one", REPORT_NAME)
    assert len([n for n in expected if n.endswith(".safetensors")]) > 2  # several shards, and the index
    result = torchrun(2, *args, "-o", tmp_path / "ws2")
    assert result.returncode == 0, result.stderr
    assert folder_bytes(tmp_path / "ws2", REPORT_NAME) == expected
    report = _report(tmp_path / "ws2")
    assert report == _report(tmp_path / "one")
    assert all(m["alignment"]["after"] < m["alignment"]["before"] for m in report["models"][1:])  # it matched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rotfuse")]
