"""Qwen2-MoE / Qwen3-MoE with dense layers (`mlp_only_layers`, `decoder_sparse_step`): such a layer has a dense
mlp.gate_proj/up_proj/down_proj instead of the router and experts. A spec describes one FFN layout for every
layer of a stack (configs/archs/README.md), so these checkpoints are refused -- exit 2, one line naming the
first dense tensor, nothing written -- rather than aligned with their dense FFNs left unmoved."""

from __future__ import annotations

import pytest
from helpers.cli import run_here
from helpers.tiny_models import save_tiny

# case -> (TINY entry, config overrides, the first tensor of a dense layer)
DENSE = {
    "qwen2-moe-mlp-only-layers": ("qwen2-moe", {"mlp_only_layers": [1]}, "model.layers.1.mlp.down_proj.weight"),
    "qwen2-moe-sparse-step-2": ("qwen2-moe", {"decoder_sparse_step": 2}, "model.layers.0.mlp.down_proj.weight"),
    "qwen3-moe-mlp-only-layers": ("qwen3-moe", {"mlp_only_layers": [0]}, "model.layers.0.mlp.down_proj.weight"),
}


@pytest.mark.parametrize("case", DENSE)
def test_dense_layers_are_refused_by_name(tmp_path, case):
    tiny, overrides, tensor = DENSE[case]
    model = save_tiny(tiny, tmp_path / "model", **overrides)
    code, err = run_here("scramble", model, "-o", tmp_path / "out", "--seed", "1", "-q")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and repr(tensor) in lines[0], err
    assert not (tmp_path / "out").exists()
