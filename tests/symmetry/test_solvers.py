"""The pure solvers: each is shown optimal (beats every candidate we can throw at it), recovers a
randomly scrambled copy exactly, and never increases the distance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.rows import assignment_total, optimum_total
from hypothesis import given, settings
from hypothesis import strategies as st

from rotfuse.align.layer import LayerSettings, match_layer, scramble_layer
from rotfuse.symmetry import circuit as circuit_module
from rotfuse.symmetry import permutation
from rotfuse.symmetry.circuit import CircuitTransform, solve_circuit
from rotfuse.symmetry.linear import random_linear
from rotfuse.symmetry.permutation import (
    SMALL_ASSIGNMENT,
    best_assignment,
    bounded_row_bests,
    certified_sparse_assignment,
    filtered_row_bests,
    permute_ffn,
    small_assignment,
    solve_permutation,
)
from rotfuse.symmetry.rotation import procrustes, random_rotation
from rotfuse.symmetry.scaling import best_scale, scale_objective
from rotfuse.symmetry.weights import (
    Attention,
    Circuit,
    Ffn,
    LayerWeights,
    Linear,
    circuit_sq_distance,
    ffn_rows,
    qk_circuit,
    vo_circuit,
    with_qk,
    with_vo,
)

ALL = frozenset({"qk.rot", "qk.scale", "vo.rot", "vo.scale", "ffn.perm", "heads.perm"})
by_planes = circuit_module._planes


def random_layer(
    seed: int,
    d: int = 12,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 6,
    dff: int = 17,
    biases: bool = True,
    gated: bool = False,
) -> LayerWeights:
    g = torch.Generator().manual_seed(seed)

    def lin(out: int, inp: int, bias: bool = biases) -> Linear:
        return Linear(torch.randn(out, inp, generator=g), torch.randn(out, generator=g) if bias else None)

    attention = Attention(
        q=lin(heads * head_dim, d),
        k=lin(kv_heads * head_dim, d),
        v=lin(kv_heads * head_dim, d),
        o=Linear(torch.randn(d, heads * head_dim, generator=g)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
    )
    inputs = [lin(dff, d), lin(dff, d, bias=False)] if gated else [lin(dff, d)]
    return LayerWeights(attention, Ffn(inputs, Linear(torch.randn(d, dff, generator=g))))


def layer_distance(a: LayerWeights, b: LayerWeights) -> float:
    total = circuit_sq_distance(qk_circuit(a.attention), qk_circuit(b.attention))
    total += circuit_sq_distance(vo_circuit(a.attention), vo_circuit(b.attention))
    total += float((ffn_rows(a.ffn).double() - ffn_rows(b.ffn).double()).pow(2).sum())
    return math.sqrt(total)


# ---------------------------------------------------------------------- packing


def test_circuit_packing_round_trips_with_gqa_and_biases():
    layer = random_layer(0, heads=6, kv_heads=2)
    att = layer.attention
    again = with_vo(with_qk(att, qk_circuit(att)), vo_circuit(att))
    for name in ("q", "k", "v"):
        assert torch.equal(getattr(again, name).weight, getattr(att, name).weight)
        assert torch.equal(getattr(again, name).bias, getattr(att, name).bias)
    assert torch.equal(again.o.weight, att.o.weight)


@pytest.mark.parametrize("rotate", [True, False])
def test_transforms_follow_the_per_head_formulas_and_keep_each_weights_layout(rotate):
    """Q_h <- a R^T Q_h, K_h <- R^T K_h / a, V_h <- a' R'^T V_h, O[:, h] <- O[:, h] R' / a' for every
    head h of group g, written straight into each weight's own layout (O included: its blocks are
    views of O transposed, and the result is O's layout again, not a transposed copy)."""
    att = random_layer(3, heads=6, kv_heads=2, head_dim=4, d=7).attention
    g = torch.Generator().manual_seed(4)
    rotations = [random_rotation(2, 4, 0, g).double() if rotate else None for _ in range(2)]
    scales = [torch.rand(2, generator=g, dtype=torch.float64) + 0.5 for _ in range(2)]
    qk, vo = (CircuitTransform(r, a) for r, a in zip(rotations, scales))
    new = with_vo(with_qk(att, qk.apply(qk_circuit(att))), vo.apply(vo_circuit(att)))
    for head in range(6):
        group, rows = head // 3, slice(4 * head, 4 * head + 4)
        rq = rotations[0][group].float() if rotate else torch.eye(4)
        rv = rotations[1][group].float() if rotate else torch.eye(4)
        aq, av = float(scales[0][group]), float(scales[1][group])
        assert torch.allclose(new.q.weight[rows], aq * rq.T @ att.q.weight[rows], atol=1e-5)
        assert torch.allclose(new.q.bias[rows], aq * rq.T @ att.q.bias[rows], atol=1e-5)
        assert torch.allclose(new.o.weight[:, rows], att.o.weight[:, rows] @ rv / av, atol=1e-5)
    for kv in range(2):
        rows = slice(4 * kv, 4 * kv + 4)
        rk = rotations[0][kv].float() if rotate else torch.eye(4)
        rv = rotations[1][kv].float() if rotate else torch.eye(4)
        assert torch.allclose(new.k.weight[rows], rk.T @ att.k.weight[rows] / float(scales[0][kv]), atol=1e-5)
        assert torch.allclose(new.v.weight[rows], float(scales[1][kv]) * rv.T @ att.v.weight[rows], atol=1e-5)
    for linear in (new.q, new.k, new.v, new.o):
        assert linear.weight.is_contiguous(), "a transposed copy would cost the writer another pass"


def test_gqa_group_holds_its_query_heads():
    """Group g of the QK circuit must contain query heads g*r .. g*r+r-1 (HF repeat_kv order)."""
    att = random_layer(1, heads=6, kv_heads=2, head_dim=3, d=5, biases=False).attention
    (left,) = qk_circuit(att).left  # [2 groups, 3 heads, 3, 5]
    q = att.q.weight.reshape(6, 3, 5)
    assert torch.equal(left[1, 0], q[3])
    assert torch.equal(left[1, 2], q[5])
    assert left.data_ptr() == att.q.weight.data_ptr(), "a view, not a copy"


# ---------------------------------------------------------------------- rotation


@pytest.mark.parametrize("rotary_dim", [0, 6, 4])
def test_procrustes_beats_random_members_of_its_group(rotary_dim):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(5, 6, 6, generator=g, dtype=torch.float64)
    best = (procrustes(m, rotary_dim) * m).sum((1, 2))
    for _ in range(200):
        other = random_rotation(5, 6, rotary_dim, g)
        assert torch.all((other * m).sum((1, 2)) <= best + 1e-9)


@pytest.mark.parametrize("rotary_dim", [0, 6, 4])
def test_procrustes_result_is_orthogonal_and_in_group(rotary_dim):
    m = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = procrustes(m, rotary_dim)
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(6, dtype=torch.float64).expand(3, 6, 6), atol=1e-12)
    if rotary_dim:
        half = rotary_dim // 2
        for i in range(half):  # each rotary plane is a proper 2-D rotation, not mixed with others
            block = r[:, [i, i + half]][:, :, [i, i + half]]
            assert torch.allclose(torch.linalg.det(block), torch.ones(3, dtype=torch.float64))
            mask = torch.ones(6, dtype=torch.bool)
            mask[[i, i + half]] = False
            assert torch.all(r[:, i, mask] == 0)


# ---------------------------------------------------------------------- scale


def test_best_scale_matches_a_dense_grid_search():
    g = torch.Generator().manual_seed(2)
    c4, c0 = torch.rand(50, generator=g, dtype=torch.float64) * 5, torch.rand(50, generator=g, dtype=torch.float64) * 5
    c3, c1 = (
        torch.randn(50, generator=g, dtype=torch.float64) * 3,
        torch.randn(50, generator=g, dtype=torch.float64) * 3,
    )
    a = best_scale(c4, c3, c1, c0)
    grid = torch.cat([torch.linspace(-10, -0.05, 20000), torch.linspace(0.05, 10, 20000)]).double()
    for i in range(50):
        found = scale_objective(a[i], c4[i], c3[i], c1[i], c0[i])
        searched = scale_objective(grid, c4[i], c3[i], c1[i], c0[i]).min()
        assert found <= searched + 1e-9


def test_best_scale_keeps_one_when_nothing_is_better():
    one = torch.ones(1, dtype=torch.float64)
    assert best_scale(one, one, one, one).item() == 1.0  # f(a) = a^2 - 2a + 1/a^2 - 2/a: min at a = 1
    zero = torch.zeros(1, dtype=torch.float64)
    assert best_scale(zero, zero, zero, zero).item() == 1.0  # degenerate (empty circuit)


# ---------------------------------------------------------------------- alternation


def test_alternation_is_never_worse_than_the_single_paper_pass():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        src = Circuit(torch.randn(3, 4, 9, generator=g), torch.randn(3, 4, 7, generator=g) * 3)
        anc = Circuit(torch.randn(3, 4, 9, generator=g) * 2, torch.randn(3, 4, 7, generator=g))
        one_pass = solve_circuit(src, anc, True, True, max_rounds=1)
        full = solve_circuit(src, anc, True, True, max_rounds=50)
        d_one = circuit_sq_distance(one_pass.transform.apply(src), anc)
        d_full = circuit_sq_distance(full.transform.apply(src), anc)
        assert d_full <= d_one * (1 + 1e-9)
        assert all(b <= a * (1 + 1e-9) for a, b in zip(full.objective, full.objective[1:]))
        assert full.rounds >= 1


def test_circuit_objective_history_matches_the_real_distance():
    g = torch.Generator().manual_seed(4)
    src = Circuit(torch.randn(2, 5, 11, generator=g).double(), torch.randn(2, 5, 8, generator=g).double())
    anc = Circuit(torch.randn(2, 5, 11, generator=g).double(), torch.randn(2, 5, 8, generator=g).double())
    solution = solve_circuit(src, anc, True, True)
    assert solution.objective[0] == pytest.approx(circuit_sq_distance(src, anc), rel=1e-9)
    assert solution.objective[-1] == pytest.approx(circuit_sq_distance(solution.transform.apply(src), anc), rel=1e-9)


# ---------------------------------------------------------------------- recovery of scrambled copies

SUBSETS = {
    "perm": frozenset({"ffn.perm"}),
    "heads": frozenset({"heads.perm"}),
    "rot": frozenset({"qk.rot", "vo.rot"}),
    "scale": frozenset({"qk.scale", "vo.scale"}),
    "heads+rot": frozenset({"heads.perm", "qk.rot", "vo.rot"}),
    "all": ALL,
}


# with one KV group, "heads" alone is the trivial group: nothing to scramble or recover
RECOVERY_CASES = [(subset, kv) for subset in sorted(SUBSETS) for kv in (4, 2, 1) if (subset, kv) != ("heads", 1)]


@pytest.mark.parametrize("subset,kv_heads", RECOVERY_CASES)
@pytest.mark.parametrize("rotary_dim", [0, 4])
def test_match_recovers_a_scrambled_layer(subset, rotary_dim, kv_heads):
    layer = random_layer(5, kv_heads=kv_heads, gated=bool(rotary_dim))
    settings = LayerSettings(SUBSETS[subset], rotary_dim=rotary_dim)
    for seed in range(6, 20):  # a 2-group permutation is the identity half the time
        scrambled = scramble_layer(layer, settings, torch.Generator().manual_seed(seed))
        if layer_distance(scrambled, layer) > 1.0:
            break
    before = layer_distance(scrambled, layer)
    matched, results = match_layer(scrambled, layer, settings)
    after = layer_distance(matched, layer)
    assert before > 1.0
    assert after / before < 1e-5, (subset, after, before)
    assert math.sqrt(sum(r.after**2 for r in results)) == pytest.approx(after, abs=1e-5)


def test_tied_qk_groups_share_one_transform_and_recover():
    layer = random_layer(7)
    settings = LayerSettings(ALL, tie_qk_groups=True)
    scrambled = scramble_layer(layer, settings, torch.Generator().manual_seed(8))
    matched, _ = match_layer(scrambled, layer, settings)
    assert layer_distance(matched, layer) / layer_distance(scrambled, layer) < 1e-5


def test_permutation_solver_is_exact_assignment_optimum():
    """On small sizes, compare against brute force over all permutations."""
    from itertools import permutations

    g = torch.Generator().manual_seed(9)
    src, anc = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    perm = solve_permutation(src, anc)
    found = float((src[perm] * anc).sum())
    best = max(float((src[list(p)] * anc).sum()) for p in permutations(range(6)))
    assert found == pytest.approx(best, abs=1e-5)


@pytest.mark.parametrize("bfloat16", [False, True], ids=["float32 prefixes", "bfloat16 prefixes"])
def test_bounded_row_bests_agree_with_the_full_scores_or_step_aside(bfloat16, monkeypatch):
    """Both kinds of prefix scores, whatever the CPU (the bfloat16 bound holds for any bfloat16 GEMM
    accumulating in float32; a CPU without fast bfloat16 only runs it slower)."""
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: bfloat16)
    g = torch.Generator().manual_seed(11)
    anchor = torch.randn(300, 512, generator=g)
    scrambled = anchor[torch.randperm(300, generator=g)]
    for src in (scrambled, scrambled + 0.3 * torch.randn(300, 512, generator=g)):  # a copy, a fine-tune
        best = bounded_row_bests(src, anchor)
        assert best is not None and torch.equal(best, (src.double() @ anchor.double().T).argmax(dim=1))
        assert torch.equal(solve_permutation(src, anchor), best_assignment(src @ anchor.T))
    assert bounded_row_bests(torch.randn(300, 512, generator=g), anchor) is None  # unrelated: full GEMM
    twins = scrambled.clone()
    twins[1] = twins[0]  # two rows with one best column: no certificate
    assert bounded_row_bests(twins, anchor) is None


@pytest.mark.parametrize("noise", [0.0, 0.3, 1.0, 2.0])
def test_bfloat16_filtered_row_bests_are_the_float64_argmax_or_step_aside(noise):
    """Whatever the CPU (the bound holds for any bfloat16 GEMM accumulating in float32): the bests
    of a copy, fine-tunes and distant relatives are found exactly, none is guessed."""
    g = torch.Generator().manual_seed(12)
    anchor = torch.randn(300, 512, generator=g)
    src = anchor[torch.randperm(300, generator=g)] + noise * torch.randn(300, 512, generator=g)
    best = filtered_row_bests(src, anchor)
    exact = src.double() @ anchor.double().T
    assert best is not None and torch.equal(best, exact.argmax(dim=1))
    assert torch.equal(solve_permutation(src, anchor), best_assignment(exact))  # whichever path it takes


def test_bfloat16_filtered_row_bests_settle_near_ties_in_float64():
    """Anchor rows in pairs of equal norm whose scores differ far below bfloat16's resolution: which
    one of a pair is a row's best is decided by the float64 scores of the few candidates, not by
    the rounded GEMM."""
    g = torch.Generator().manual_seed(13)
    first = torch.randn(150, 256, generator=g, dtype=torch.float64)
    second = (
        first + 0.02 * first.norm(dim=1, keepdim=True) * torch.randn(150, 256, generator=g, dtype=torch.float64) / 16
    )
    second *= first.norm(dim=1, keepdim=True) / second.norm(dim=1, keepdim=True)
    anchor = torch.cat([first, second])
    # each row leans towards its own member of the pair: <x, own> - <x, twin> ~ 2e-4 |x| |y|
    src = torch.cat([first + 0.5 * (first - second), second + 0.5 * (second - first)])
    src, anchor = src[torch.randperm(300, generator=g)].float(), anchor.float()
    best = filtered_row_bests(src, anchor)
    exact = (src.double() @ anchor.double().T).argmax(dim=1)
    assert torch.unique(exact).numel() == 300, "the case is meant to have distinct bests"
    assert best is not None and torch.equal(best, exact)
    rounded = (src.bfloat16() @ anchor.bfloat16().T).float().argmax(dim=1)
    assert not torch.equal(rounded, exact), "the rounded GEMM alone must get some wrong, or this tests nothing"


def test_bfloat16_filtered_row_bests_step_aside_for_unrelated_rows_and_shared_bests():
    g = torch.Generator().manual_seed(14)
    anchor = torch.randn(300, 512, generator=g)
    assert filtered_row_bests(torch.randn(300, 512, generator=g), anchor) is None  # near-ties everywhere
    twins = anchor[torch.randperm(300, generator=g)]
    twins[1] = twins[0]  # two rows with one best column: no certificate
    assert filtered_row_bests(twins, anchor) is None


def _sparse_instance(kind: str, n: int, seed: int) -> torch.Tensor:
    """float32 scores of rows of two models: unrelated, related (a noisy scrambled copy), near-ties
    (entries on a coarse grid: many exactly equal sums) or low rank (ties between whole rows)."""
    g = torch.Generator().manual_seed(seed)
    width = 64
    anchor = torch.randn(n, width, generator=g) / width**0.5
    src = torch.randn(n, width, generator=g) / width**0.5
    if kind == "related":
        src = anchor[torch.randperm(n, generator=g)] + 0.7 * src
    elif kind == "near-ties":
        return ((src @ anchor.T) * 8).round() / 8
    elif kind == "low-rank":
        src, anchor = src[:, :3], anchor[:, :3]
    return src @ anchor.T


def _dense_optimum(scores: torch.Tensor) -> tuple[np.ndarray, float]:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(scores.numpy(), maximize=True)
    perm = np.empty(len(cols), dtype=np.int64)
    perm[cols] = rows
    return perm, assignment_total(scores, torch.from_numpy(perm))


@pytest.mark.parametrize("kind", ["unrelated", "related", "near-ties", "low-rank"])
@pytest.mark.parametrize("n", [2, 17, 130, 300])
def test_certified_sparse_assignment_is_the_dense_optimum(kind, n):
    """Against scipy's dense Hungarian: the same total (the same assignment where the optimum is
    unique), from a candidate graph far smaller than the matrix when n is large."""
    for seed in range(3):
        scores = _sparse_instance(kind, n, seed)
        perm = certified_sparse_assignment(scores, candidates=8)
        dense_perm, dense_total = _dense_optimum(scores)
        assert assignment_total(scores, best_assignment(scores)) == dense_total
        if kind == "low-rank" and perm is None:
            continue  # a few columns best for every row: the rounds may run out (then the dense solve)
        assert perm is not None  # the certificate settles these (adding violated edges as needed)
        assert sorted(perm.tolist()) == list(range(n))
        assert assignment_total(scores, perm) == dense_total
        if kind in ("unrelated", "related"):
            assert perm.tolist() == dense_perm.tolist()


def test_best_assignment_takes_the_certified_sparse_path_from_its_minimum_size(monkeypatch):
    from rotfuse.symmetry import permutation

    calls = []

    def spy(scores, candidates=permutation.SPARSE_CANDIDATES):
        calls.append(certified_sparse_assignment(scores, candidates))
        return calls[-1]

    monkeypatch.setattr(permutation, "certified_sparse_assignment", spy)
    scores = _sparse_instance("unrelated", permutation.SPARSE_MIN_SIZE, 3)
    assert assignment_total(scores, best_assignment(scores)) == _dense_optimum(scores)[1]
    assert len(calls) == 1 and calls[0] is not None


def test_certified_sparse_assignment_without_its_dense_check_is_caught(monkeypatch):
    """The certificate is what makes the sparse optimum the dense one: skipped, the optimum on one
    candidate per row (and the diagonal) is worse than scipy's, and the comparison above fails."""
    from rotfuse.symmetry import permutation

    scores = _sparse_instance("unrelated", 400, 0)
    _, dense_total = _dense_optimum(scores)
    assert assignment_total(scores, certified_sparse_assignment(scores, candidates=8)) == dense_total
    monkeypatch.setattr(permutation, "_dual_violations", lambda *args, **kwargs: np.empty(0, dtype=np.int64))
    assert assignment_total(scores, certified_sparse_assignment(scores, candidates=1)) < dense_total


def test_certified_sparse_assignment_steps_aside():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(100, 100, generator=g)
    assert certified_sparse_assignment(scores.double()) is None  # float64 scores: the dense solve
    assert certified_sparse_assignment(scores[:, :90]) is None
    broken = scores.clone()
    broken[3, 4] = float("nan")
    assert certified_sparse_assignment(broken) is None
    tiny = scores.clone()
    tiny[0] = 1e-30 * torch.arange(100)  # a row of tiny scores: units too fine for int64 sums
    tiny[1, 5] = 1e30
    assert certified_sparse_assignment(tiny) is None
    assert assignment_total(tiny, best_assignment(tiny)) == _dense_optimum(tiny)[1]


def test_permute_ffn_moves_rows_and_columns_together():
    ffn = random_layer(10, gated=True).ffn
    perm = torch.randperm(ffn.width, generator=torch.Generator().manual_seed(0))
    moved = permute_ffn(ffn, perm)
    x = torch.randn(3, 12)

    def run(f: Ffn) -> torch.Tensor:  # SwiGLU: silu(gate) * up -> down
        gate, up = (x @ lin.weight.T + (lin.bias if lin.bias is not None else 0) for lin in f.inputs)
        return (torch.nn.functional.silu(gate) * up) @ f.output.weight.T

    assert torch.allclose(run(moved), run(ffn), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_ffn_from_the_neuron_rows_moves_the_same_values(dtype):
    """The down projection's columns gathered from the rows' transposed copy: the same tensor as
    gathered from the weight itself; rows of another dtype or shape are not used."""
    ffn = random_layer(11, gated=True).ffn
    ffn = Ffn([lin.map(lambda t: t.to(dtype)) for lin in ffn.inputs], Linear(ffn.output.weight.to(dtype)))
    perm = torch.randperm(ffn.width, generator=torch.Generator().manual_seed(1))
    plain = permute_ffn(ffn, perm)
    for rows in (ffn_rows(ffn), ffn_rows(ffn, torch.float64), ffn_rows(ffn)[:, 1:]):
        moved = permute_ffn(ffn, perm, rows)
        assert moved.output.weight.is_contiguous()
        for a, b in zip(ffn_tensors(moved), ffn_tensors(plain), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


def ffn_tensors(ffn: Ffn) -> list[torch.Tensor]:
    return [t for lin in ffn.inputs for t in (lin.weight, lin.bias) if t is not None] + [ffn.output.weight]


# ---------------------------------------------------------------------- monotonicity and identity


def test_matching_a_layer_to_itself_changes_nothing():
    layer = random_layer(11)
    matched, results = match_layer(layer, layer, LayerSettings(ALL))
    assert layer_distance(matched, layer) < 1e-4
    assert all(r.after <= r.before for r in results)


def test_a_fine_tunes_ffn_left_in_place_is_returned_as_read():
    """Where the optimal permutation is the identity (a fine-tune: its neurons stay put), the FFN
    comes back as the very object read -- so the writer copies its stored bytes instead of
    rebuilding and rewriting them -- with the distance it started at; a scrambled one is moved."""
    layer = random_layer(12, dff=40)
    g = torch.Generator().manual_seed(13)
    inputs = [Linear(x.weight + 0.01 * torch.randn(x.weight.shape, generator=g), x.bias) for x in layer.ffn.inputs]
    tuned = LayerWeights(layer.attention, Ffn(inputs, layer.ffn.output))
    matched, results = match_layer(tuned, layer, LayerSettings(frozenset({"ffn.perm"})))
    (ffn,) = [r for r in results if r.module == "ffn"]
    assert matched.ffn is tuned.ffn
    assert ffn.applied == ["perm"] and ffn.after == ffn.before > 0
    order = torch.randperm(40, generator=g)
    scrambled = LayerWeights(layer.attention, permute_ffn(tuned.ffn, order))
    moved, _ = match_layer(scrambled, layer, LayerSettings(frozenset({"ffn.perm"})))
    assert moved.ffn is not scrambled.ffn
    assert torch.equal(moved.ffn.inputs[0].weight, tuned.ffn.inputs[0].weight)


def test_disabled_symmetries_are_not_applied():
    layer, anchor = random_layer(12), random_layer(13)
    matched, results = match_layer(layer, anchor, LayerSettings(frozenset({"ffn.perm"})))
    assert torch.equal(matched.attention.q.weight, layer.attention.q.weight)
    assert {r.module: r.applied for r in results} == {"attn.qk": [], "attn.vo": [], "ffn": ["perm"]}


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    kv_heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([2, 4, 6]),
    dff=st.integers(1, 12),
    biases=st.booleans(),
    rope=st.booleans(),
    subset=st.sampled_from(sorted(SUBSETS)),
)
def test_property_matching_never_increases_distance_and_recovers(seed, kv_heads, head_dim, dff, biases, rope, subset):
    rotary_dim = head_dim if rope else 0
    layer = random_layer(seed, d=7, heads=4, kv_heads=kv_heads, head_dim=head_dim, dff=dff, biases=biases)
    anchor = random_layer(seed + 1, d=7, heads=4, kv_heads=kv_heads, head_dim=head_dim, dff=dff, biases=biases)
    settings_ = LayerSettings(SUBSETS[subset], rotary_dim=rotary_dim)
    _, results = match_layer(layer, anchor, settings_)
    for result in results:
        assert result.after <= result.before * (1 + 1e-12)
    scrambled = scramble_layer(layer, settings_, torch.Generator().manual_seed(seed))
    matched, _ = match_layer(scrambled, layer, settings_)
    before = layer_distance(scrambled, layer)
    if before > 1e-3:
        assert layer_distance(matched, layer) / before < 1e-4


def test_scrambled_attention_computes_the_same_output():
    """Multi-head attention (softmax included, GQA, biases) gives the same output after a random
    head permutation, rotation and rescaling: the function-level reason they are exact."""
    att = random_layer(14, heads=4, kv_heads=2).attention
    moved = scramble_layer(
        LayerWeights(att, random_layer(14).ffn), LayerSettings(ALL), torch.Generator().manual_seed(1)
    ).attention
    x = torch.randn(5, 12, dtype=torch.float64)

    def attend(a: Attention) -> torch.Tensor:
        q = (x @ a.q.weight.double().T + a.q.bias.double()).reshape(5, 4, 6)
        k = (x @ a.k.weight.double().T + a.k.bias.double()).reshape(5, 2, 6).repeat_interleave(2, dim=1)
        v = (x @ a.v.weight.double().T + a.v.bias.double()).reshape(5, 2, 6).repeat_interleave(2, dim=1)
        probs = torch.softmax(torch.einsum("thd,shd->hts", q, k) / 6**0.5, dim=-1)
        heads = torch.einsum("hts,shd->thd", probs, v).reshape(5, 24)
        return heads @ a.o.weight.double().T

    assert torch.allclose(attend(att), attend(moved), atol=1e-4)
    assert not torch.allclose(att.q.weight, moved.q.weight)


@pytest.mark.parametrize("rotary_dim", [6, 4], ids=["whole-head", "partial"])
@pytest.mark.parametrize("pack", [qk_circuit, vo_circuit], ids=["rows", "transposed-columns"])
@pytest.mark.parametrize("kind", ["rotation", "linear"])
def test_rope_commuting_maps_apply_plane_by_plane_as_the_gemm_does(monkeypatch, rotary_dim, pack, kind):
    """A map that commutes with RoPE touches each row of a plane with its partner only: applied
    plane by plane (past rotary_dim: the GEMM on the rest), it gives the batched GEMM's result."""
    circuit = pack(random_layer(16).attention)
    g = torch.Generator().manual_seed(3)
    if kind == "rotation":
        maps = {
            "rotation": random_rotation(2, 6, rotary_dim, g),
            "scale": torch.tensor([0.5, 3.0], dtype=torch.float64),
        }
    else:
        maps = {"linear": random_linear(2, 6, rotary_dim, g)}
    planes = []
    monkeypatch.setattr(circuit_module, "_planes", lambda *args: planes.append(args) or by_planes(*args))
    fast = CircuitTransform(**maps, rotary_dim=rotary_dim).apply(circuit)
    assert len(planes) == len(circuit.tensors())
    dense = CircuitTransform(**maps).apply(circuit)
    assert len(planes) == len(circuit.tensors())
    for x, y in zip(fast.tensors(), dense.tensors(), strict=True):
        assert x.stride() == y.stride() and torch.allclose(x, y, rtol=1e-5, atol=1e-5)


def test_maps_of_another_form_go_through_the_gemm_whatever_rotary_dim_says(monkeypatch):
    """A full rotation (one the RoPE spec forbids) flagged as commuting is not taken plane by plane."""
    circuit = qk_circuit(random_layer(17).attention)
    full = random_rotation(2, 6, 0, torch.Generator().manual_seed(4))
    monkeypatch.setattr(circuit_module, "_planes", lambda *args: pytest.fail("applied plane by plane"))
    flagged = CircuitTransform(full, rotary_dim=6).apply(circuit)
    plain = CircuitTransform(full).apply(circuit)
    assert all(torch.equal(x, y) for x, y in zip(flagged.tensors(), plain.tensors(), strict=True))


def test_identity_transform_is_a_no_op():
    circuit = qk_circuit(random_layer(15).attention)
    same = CircuitTransform().apply(circuit)
    assert all(torch.equal(x, y) for x, y in zip(same.tensors(), circuit.tensors(), strict=True))


# ---------------------------------------------------------------------- head permutation


@pytest.mark.parametrize("rotary_dim", [0, 4, 6])
def test_head_pair_scores_are_the_best_rotation_objective(rotary_dim):
    from rotfuse.symmetry.heads import pair_scores

    g = torch.Generator().manual_seed(20)
    src = Circuit(torch.randn(3, 6, 10, generator=g), torch.randn(3, 6, 8, generator=g))
    anc = Circuit(torch.randn(3, 6, 10, generator=g), torch.randn(3, 6, 8, generator=g))
    scores = pair_scores(src, anc, rotate=True, rotary_dim=rotary_dim)
    for i in range(3):
        for j in range(3):
            single_src = Circuit(src.left[0][i : i + 1], src.right[0][i : i + 1])
            single_anc = Circuit(anc.left[0][j : j + 1], anc.right[0][j : j + 1])
            solution = solve_circuit(single_src, single_anc, True, False, rotary_dim=rotary_dim)
            norms = sum(float(t.double().pow(2).sum()) for c in (single_src, single_anc) for t in c.tensors())
            best = (norms - solution.objective[-1]) / 2  # |s - R a|^2 = |s|^2 + |a|^2 - 2 <R, M>
            assert scores[i, j].item() == pytest.approx(best, rel=1e-4, abs=1e-3)


def test_head_permutation_is_the_joint_optimum_by_brute_force():
    """Over every head permutation, rotating each pair optimally: the solver's choice is the best."""
    from itertools import permutations

    from rotfuse.symmetry.heads import permute_groups

    layer, anchor = random_layer(21, heads=4, kv_heads=4), random_layer(22, heads=4, kv_heads=4)
    settings_ = LayerSettings(frozenset({"heads.perm", "qk.rot", "vo.rot"}))
    matched, _ = match_layer(layer, anchor, settings_)
    found = sum(circuit_sq_distance(f(matched.attention), f(anchor.attention)) for f in (qk_circuit, vo_circuit))
    best = math.inf
    for p in permutations(range(4)):
        total = 0.0
        for f in (qk_circuit, vo_circuit):
            moved = permute_groups(f(layer.attention), torch.tensor(p))
            solution = solve_circuit(moved, f(anchor.attention), True, False)
            total += circuit_sq_distance(solution.transform.apply(moved), f(anchor.attention))
        best = min(best, total)
    assert found == pytest.approx(best, rel=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_head_permutation_recovers_shuffled_heads_and_reports_it(kv_heads):
    layer = random_layer(23, kv_heads=kv_heads)
    settings_ = LayerSettings(ALL, rotary_dim=4)
    swapped = 0
    for seed in range(8):
        scrambled = scramble_layer(layer, settings_, torch.Generator().manual_seed(seed))
        matched, results = match_layer(scrambled, layer, settings_)
        assert layer_distance(matched, layer) / layer_distance(scrambled, layer) < 1e-5
        qk = next(r for r in results if r.module == "attn.qk")
        if qk.applied[0] == "heads":
            swapped += 1
            assert sorted(qk.extra["head_permutation"]) == list(range(kv_heads))
    assert swapped >= 2  # most random scrambles move heads, and every one was undone


def test_without_head_permutation_shuffled_heads_are_not_recovered():
    """The per-head rotation alone cannot swap heads: the new symmetry is needed."""
    layer = random_layer(24, kv_heads=4)
    scrambled = scramble_layer(layer, LayerSettings(frozenset({"heads.perm"})), torch.Generator().manual_seed(5))
    matched, _ = match_layer(scrambled, layer, LayerSettings(frozenset({"qk.rot", "vo.rot"})))
    assert layer_distance(matched, layer) / layer_distance(scrambled, layer) > 0.1


@pytest.mark.parametrize("width", [96, 2048, 6144, 3 * 28672])
def test_float32_pass_slack_covers_the_worst_case_rounding(width):
    """The float32 passes' allowance is at least the worst case of what it stands for -- the prefix
    GEMM's and the candidate's float32 sums (gamma_w |x| |y| each) and the rest norms' (gamma_w of
    their product) -- however wide the rows: fixed SLACK alone is short of it from ~2000 columns."""
    unit = 2.0**-24
    worst = 2 * width * unit / (1 - width * unit)
    assert permutation.slack(width) >= worst
    assert permutation.slack(width) >= permutation.SLACK
    assert permutation.slack(96) == permutation.SLACK  # narrow rows: as before


@pytest.mark.parametrize("n", range(1, SMALL_ASSIGNMENT + 1))
def test_small_assignment_reaches_the_hungarian_optimum(n):
    """The dynamic programme for a few rows (head groups) gives an assignment -- a permutation --
    whose total is scipy's dense Hungarian optimum, on Gaussian scores and on small integer ones
    full of ties; `best_assignment` takes it for square problems that small."""
    g = torch.Generator().manual_seed(n)
    for scores in (
        torch.randn(n, n, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (n, n), generator=g).double(),
    ):
        perm = small_assignment(scores.numpy())
        assert sorted(perm.tolist()) == list(range(n))
        assert assignment_total(scores, torch.from_numpy(perm)) == pytest.approx(optimum_total(scores), abs=1e-12)
        tied = scores.clone()
        tied[:, 0] = 1.0  # every row's best column the same: no fast path, the small solve decides
        assert assignment_total(tied, best_assignment(tied)) == pytest.approx(optimum_total(tied), abs=1e-12)
