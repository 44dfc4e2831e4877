"""The invertible per-head map solver (rotfuse/symmetry/linear.py): exact recovery of a random
member of the group (full GL, RoPE scaled rotations per pair, partial rotary, GQA), optimality
against perturbations within the group, the objective it minimises is the true distance, and
the condition-number guard."""

from __future__ import annotations

import math

import pytest
import torch
from symmetry.test_solvers import layer_distance, random_layer

from rotfuse.align.layer import LayerSettings, match_layer, scramble_layer
from rotfuse.symmetry.circuit import CircuitTransform
from rotfuse.symmetry.linear import (
    condition,
    grams,
    inverse_transpose,
    member,
    objective,
    project,
    random_linear,
    solve_linear,
)
from rotfuse.symmetry.weights import circuit_sq_distance, qk_circuit, vo_circuit

LINEAR = frozenset({"qk.linear", "vo.linear", "heads.perm", "ffn.perm"})


@pytest.mark.parametrize(("rotary_dim", "kv_heads"), [(0, 2), (0, 4), (6, 2), (4, 1)])
def test_scrambled_layer_is_recovered(rotary_dim, kv_heads):
    anchor = random_layer(0, d=16, heads=4, kv_heads=kv_heads, head_dim=6)
    settings = LayerSettings(LINEAR | {"qk.rot", "qk.scale", "vo.rot", "vo.scale"}, rotary_dim=rotary_dim)
    scrambled = scramble_layer(anchor, settings, torch.Generator().manual_seed(3))
    assert layer_distance(scrambled, anchor) > 10
    matched, results = match_layer(scrambled, anchor, settings)
    assert layer_distance(matched, anchor) < 1e-5 * layer_distance(scrambled, anchor)
    assert all("linear" in r.applied for r in results if r.module.startswith("attn"))


def test_the_inverse_is_applied_exactly_and_products_are_kept():
    layer = random_layer(1, d=16, heads=4, kv_heads=2, head_dim=6).attention
    b = random_linear(2, 6, 0, torch.Generator().manual_seed(0))
    circuit = qk_circuit(layer)
    circuit64 = type(circuit)(tuple(x.double() for x in circuit.left), tuple(x.double() for x in circuit.right))
    moved = CircuitTransform(linear=b).apply(circuit64)
    for before_l, after_l in zip(circuit64.left, moved.left, strict=True):
        for before_r, after_r in zip(circuit64.right, moved.right, strict=True):
            kept = before_l.transpose(-1, -2) @ before_r[:, :1]
            now = after_l.transpose(-1, -2) @ after_r[:, :1]
            assert torch.allclose(kept, now, atol=1e-10)
    assert not torch.allclose(moved.left[0], circuit64.left[0])


@pytest.mark.parametrize("rotary_dim", [0, 4])
def test_solution_is_a_local_optimum_and_objective_is_the_distance(rotary_dim):
    src, anchor = (random_layer(seed, d=16, heads=4, kv_heads=2, head_dim=6).attention for seed in (0, 1))
    pack = vo_circuit if rotary_dim == 0 else qk_circuit
    s, a = pack(src), pack(anchor)
    found = solve_linear(s, a, rotary_dim)
    moved = CircuitTransform(linear=found.linear).apply(s)
    true = circuit_sq_distance(moved, a)
    assert math.isclose(true, found.objective[1], rel_tol=1e-4)
    assert found.objective[1] < found.objective[0]
    gr = grams(s, a)
    best = float(objective(found.linear, gr).sum())
    params = project(found.linear, rotary_dim)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):  # every small move within the group costs
        moved_params = tuple(p + 1e-3 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params)
        assert float(objective(member(moved_params, rotary_dim, 6), gr).sum()) > best


def test_rope_maps_are_scaled_rotations_per_pair():
    b = random_linear(3, 8, 8, torch.Generator().manual_seed(1))
    half = 4
    for i in range(half):
        block = b[:, [i, i + half]][:, :, [i, i + half]]
        assert torch.allclose(block[:, 0, 0], block[:, 1, 1]) and torch.allclose(block[:, 0, 1], -block[:, 1, 0])
    # B^-T is the same rotation divided by r: the form RoPE commutes with
    c = inverse_transpose(b)
    assert torch.allclose(c[:, 0, 0], c[:, half, half]) and torch.allclose(c[:, 0, half], -c[:, half, 0])


def test_badly_conditioned_maps_are_refused():
    anchor = random_layer(2, d=16, heads=2, kv_heads=2, head_dim=6).attention
    bad = random_linear(2, 6, 0, torch.Generator().manual_seed(4), spread=100.0)  # condition up to 1e4
    assert float(condition(bad).max()) > 1e3
    s = CircuitTransform(linear=bad).apply(vo_circuit(anchor))
    found = solve_linear(s, vo_circuit(anchor), max_condition=1e3)
    assert found.condition <= 1e3
    assert found.objective[1] <= found.objective[0]


@pytest.mark.parametrize("rotary_dim", [0, 8])
def test_refining_the_rotation_and_scale_optimum_goes_strictly_further(rotary_dim):
    """On unrelated weights the invertible group reaches farther than rotation + scale: the
    refinement must actually run from that start (a non-contiguous start once stalled it)."""
    from rotfuse.symmetry.circuit import solve_circuit

    src, anchor = (random_layer(seed, d=64, heads=4, kv_heads=4, head_dim=16).attention for seed in (0, 1))
    s, a = qk_circuit(src), qk_circuit(anchor)
    rotated = solve_circuit(s, a, True, True, rotary_dim=rotary_dim)
    found = solve_linear(s, a, rotary_dim, start=rotated.transform.maps()[0])
    assert found.iterations > 0
    assert found.objective[1] < 0.99 * rotated.objective[-1]
