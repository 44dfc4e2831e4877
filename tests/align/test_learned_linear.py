"""Learned matching over GLMC's invertible per-head maps (`match --learn -s default,linear`): the
written copy keeps MODEL's function with the maps learned (RoPE + GQA: LLaMA; full maps: ViT), the
maps are exact inverses of each other in the group RoPE allows, and the run is deterministic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from align.test_learned import _learn
from helpers.functions import assert_same_function
from safetensors.torch import load_file

from rotfuse.align.learned.maps import LayerMaps

ON = frozenset({"qk.linear", "vo.linear"})


@pytest.mark.parametrize("kind", ["llama", pytest.param("vit", marks=pytest.mark.slow)])
def test_learned_linear_maps_keep_the_function(tmp_path: Path, kind: str) -> None:
    model, _, _, report = _learn(tmp_path, kind, symmetries="default,linear", rate=3e-2)
    assert_same_function(model, tmp_path / "out")
    learned = report["learned"]
    assert learned["after"]["train_loss"] < learned["before"]["train_loss"]
    # the linear maps moved the copy beyond what the same run without them writes
    _learn(tmp_path / "without", kind, symmetries="default", rate=3e-2)
    with_maps = load_file(str(tmp_path / "out" / "model.safetensors"))
    without = load_file(str(tmp_path / "without" / "out" / "model.safetensors"))
    assert any(not torch.equal(with_maps[name], without[name]) for name in with_maps)


@pytest.mark.slow
def test_same_seed_same_bytes_with_linear_maps(tmp_path: Path) -> None:
    _learn(tmp_path, "llama", "one", steps=4, symmetries="default,linear")
    _learn(tmp_path, "llama", "two", steps=4, symmetries="default,linear")
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert all(torch.equal(one[name], two[name]) for name in one)


@pytest.mark.parametrize(("rotary_dim", "head_dim"), [(0, 6), (6, 6), (4, 8)])
def test_learned_maps_are_inverse_transposes_in_the_allowed_group(rotary_dim: int, head_dim: int) -> None:
    maps = LayerMaps(ON, groups=3, head_dim=head_dim, ffn_width=4, rotary_dim=rotary_dim)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in maps.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    for circuit in ("qk", "vo"):
        found = maps.linear(circuit)
        assert found is not None
        b, c = found
        eye = torch.eye(head_dim, dtype=torch.float64).expand_as(b)
        assert torch.allclose(b.transpose(1, 2) @ c, eye, atol=1e-10)
        assert not torch.allclose(b @ b.transpose(1, 2), eye, atol=1e-3)  # not just a rotation
    b, _ = maps.linear("qk")  # type: ignore[misc]
    half = rotary_dim // 2
    for i in range(half):  # a scaled rotation on each rotate_half plane, nothing mixing planes
        assert torch.allclose(b[:, i, i], b[:, i + half, i + half])
        assert torch.allclose(b[:, i, i + half], -b[:, i + half, i])
        others = [k for k in range(head_dim) if k not in (i, i + half)]
        assert torch.all(b[:, i, others] == 0) and torch.all(b[:, others, i] == 0)
    assert LayerMaps(frozenset(), 3, head_dim, 4, rotary_dim).linear("qk") is None
