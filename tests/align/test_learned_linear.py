"""Learned matching over GLMC's invertible per-head maps (`match --learn -s default,linear`): the
written copy keeps MODEL's function with the maps learned (RoPE + GQA: LLaMA; full maps: ViT), the
maps are exact inverses of each other in the group RoPE allows, and the run is deterministic."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from align.test_learned import _learn
from helpers.functions import assert_same_function
from safetensors.torch import load_file

from rotfuse.align.learned import maps as learned_maps
from rotfuse.align.learned.maps import LayerMaps

ON = frozenset({"qk.linear", "vo.linear"})


@pytest.mark.parametrize("kind", ["llama", pytest.param("vit", marks=pytest.mark.slow)])
def test_learned_linear_maps_keep_the_function(tmp_path: Path, kind: str) -> None:
    model, _, _, report = _learn(tmp_path, kind, symmetries="default,linear", rate=3e-2)
    assert_same_function(model, tmp_path / "out")
    learned = report["learned"]
    assert learned["after"]["train_loss"] < learned["before"]["train_loss"]
    assert 1.0 <= learned["linear_condition"] <= learned_maps.MAX_CONDITION * (1 + 1e-9)
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


@pytest.mark.parametrize("rotation_on", [True, False])
def test_linear_maps_reach_the_whole_group_with_or_without_the_circuits_rotation(rotation_on: bool) -> None:
    """B = Q exp(S): with the circuit's rotation on, that rotation is Q and B is the symmetric
    positive definite exp(S); with it off B has a rotation of its own, so it is not symmetric."""
    enabled = ON | ({"qk.rot", "vo.rot"} if rotation_on else set())
    maps = LayerMaps(frozenset(enabled), groups=2, head_dim=5, ffn_width=4, rotary_dim=0)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in maps.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    for circuit in ("qk", "vo"):
        b, _ = maps.linear(circuit)  # type: ignore[misc]
        symmetric = torch.allclose(b, b.transpose(1, 2), atol=1e-12)
        assert symmetric == rotation_on
        if rotation_on:
            assert bool((torch.linalg.eigvalsh(b) > 0).all())


@pytest.mark.parametrize(("rotary_dim", "head_dim"), [(0, 6), (4, 8)])
def test_limit_condition_clamps_only_the_extreme_singular_values(rotary_dim: int, head_dim: int) -> None:
    maps = LayerMaps(ON, groups=3, head_dim=head_dim, ffn_width=4, rotary_dim=rotary_dim)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in maps.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for p in (maps.qk_linear, maps.qk_linear_log_r, maps.vo_linear):
            assert p is not None
            p[0] *= 0.01  # group 0 well conditioned: left as it is
    before = {c: maps.condition(c) for c in ("qk", "vo")}
    kept = {c: maps.linear(c)[0][0].clone() for c in ("qk", "vo")}  # type: ignore[index]
    spectra = {c: torch.linalg.svdvals(maps.linear(c)[0]).log() for c in ("qk", "vo")}  # type: ignore[index]
    maps.limit_condition(3.0)
    for circuit in ("qk", "vo"):
        was, now = before[circuit], maps.condition(circuit)
        assert was is not None and now is not None
        assert bool((was[1:] > 3.0).all()) and float(was[0]) < 3.0  # the test's premise
        assert bool((now <= 3.0).all())
        assert torch.allclose(now[1:], torch.full_like(now[1:], 3.0), rtol=1e-6)  # to the limit, no further
        b, c = maps.linear(circuit)  # type: ignore[misc]
        # only the singular values outside the band about the middle moved, to its edges
        old, new = spectra[circuit][1:], torch.linalg.svdvals(b[1:]).log()
        middle = (old.max(1, keepdim=True).values + old.min(1, keepdim=True).values) / 2
        half = math.log(3.0) / 2
        assert torch.allclose(new, old.clamp(middle - half, middle + half), atol=1e-6)
        assert torch.equal(b[0], kept[circuit])
        eye = torch.eye(head_dim, dtype=torch.float64).expand_as(b)
        assert torch.allclose(b.transpose(1, 2) @ c, eye, atol=1e-10)  # still an exact pair


def test_learning_keeps_the_linear_maps_within_the_condition_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = _learn(tmp_path / "free", "llama", symmetries="default,linear", rate=3e-2)[3]["learned"]
    monkeypatch.setattr(learned_maps, "MAX_CONDITION", 1.0 + (free["linear_condition"] - 1.0) / 2)
    model, _, _, report = _learn(tmp_path / "held", "llama", symmetries="default,linear", rate=3e-2)
    assert report["learned"]["linear_condition"] <= learned_maps.MAX_CONDITION * (1 + 1e-9)
    assert free["linear_condition"] > learned_maps.MAX_CONDITION  # the limit acted
    assert_same_function(model, tmp_path / "held" / "out")
