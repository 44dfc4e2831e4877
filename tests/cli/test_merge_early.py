"""`merge --method regmean` without --stats says how to compute them, before importing torch
(issue 20 item 6); the registry's torch-free declaration agrees with the method classes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.tiny_models import save_tiny

from rotfuse.merge.methods import REGISTRY, method_class


def test_registry_declares_each_methods_statistics_like_its_class():
    assert {name: method_class(name).stats for name in REGISTRY} == {n: r.stats for n, r in REGISTRY.items()}


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_statistics_method_without_stats_points_to_rotfuse_stats_before_torch(tmp_path, method):
    a, b = save_tiny("bert", tmp_path / "a", seed=0), save_tiny("bert", tmp_path / "b", seed=1)
    code = (
        "import sys\n"
        "from rotfuse.cli import run\n"
        f"status = run(['merge', '--method', '{method}', '{a}', '{b}', '-o', '{tmp_path / 'out'}'])\n"
        "print(status, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], (result.stdout, result.stderr)
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and f"rotfuse stats MODEL --data FILE --kind {method}" in line
    assert not (tmp_path / "out").exists()
