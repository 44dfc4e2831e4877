"""Head-group pair scores bounded rather than computed exactly -- from bfloat16 GEMMs
(`rounded_pair_scores`), from float32 GEMMs over a prefix of the columns
(`prefix_group_permutation`) -- and the certificates that keep their assignment only when it is
the exact scores' optimum (`certified_assignment`, `optimal_against`)."""

from __future__ import annotations

from fractions import Fraction
from itertools import permutations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rotfuse.symmetry import heads
from rotfuse.symmetry.circuit import circuit_products, solve_circuit
from rotfuse.symmetry.heads import (
    HEAD_PREFIXES,
    ScoredCircuit,
    group_permutation,
    pair_scores,
    permute_groups,
    prefix_group_permutation,
    rounded_pair_scores,
)
from rotfuse.symmetry.permutation import best_assignment, certified_assignment
from rotfuse.symmetry.rotation import procrustes
from rotfuse.symmetry.weights import Circuit

GROUPS, HEADS, DH, N = 4, 2, 8, 48


def exact_scores(src: Circuit, anchor: Circuit, rotate: bool, rotary_dim: int) -> torch.Tensor:
    """The scores in float64 from the blocks as given: M_ij = sum over blocks and heads of
    X[i, h] Y[j, h]^T, then the trace, the nuclear norm, or the RoPE-restricted Procrustes value."""
    m = sum(
        torch.einsum("ihan,jhbn->ijab", a.double(), b.double())
        for a, b in zip(src.tensors(), anchor.tensors(), strict=True)
    )
    assert isinstance(m, torch.Tensor)
    if not rotate:
        return torch.diagonal(m, dim1=-2, dim2=-1).sum(-1)
    if rotary_dim == 0:
        return torch.linalg.svdvals(m).sum(-1)
    flat = m.reshape(-1, DH, DH)
    return (procrustes(flat, rotary_dim) * flat).sum((1, 2)).reshape(GROUPS, GROUPS)


def stressed_blocks(kind: str, g: torch.Generator) -> torch.Tensor:
    """`[G, H, dh, n]` blocks: rows with norms over four decades, heavy tails, entries all rounded
    the same way (1 + 2^-9 rounds to 1: every product's rounding error has one sign), or bfloat16
    values (nothing to round but the GEMM's own accumulation and result)."""
    shape = (GROUPS, HEADS, DH, N)
    if kind == "decades":
        return torch.randn(shape, generator=g) * 10.0 ** (4 * torch.rand(GROUPS, HEADS, DH, 1, generator=g) - 2)
    if kind == "heavy tails":
        return torch.distributions.StudentT(1.5).sample(shape)
    if kind == "aligned rounding":
        return torch.full(shape, 1 + 2.0**-9) * torch.randint(1, 3, (GROUPS, 1, 1, 1), generator=g)
    return torch.randn(shape, generator=g).bfloat16().float()


def transposed(block: torch.Tensor) -> torch.Tensor:
    """The same values as a transposed weight's view (o's columns), as packing gives them."""
    return block.reshape(-1, block.shape[-1]).T.contiguous().T.view(block.shape)


@pytest.mark.parametrize("kind", ["decades", "heavy tails", "aligned rounding", "bfloat16 values"])
@pytest.mark.parametrize(
    ("rotate", "rotary_dim"), [(False, 0), (True, 0), (True, 4)], ids=["trace", "nuclear", "rotary"]
)
def test_rounded_pair_scores_are_within_their_bound_of_every_exact_score(kind, rotate, rotary_dim):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    src = Circuit(stressed_blocks(kind, g), transposed(stressed_blocks(kind, g)))
    anchor = Circuit(stressed_blocks(kind, g), transposed(stressed_blocks(kind, g)))
    approx, error = rounded_pair_scores(src, anchor, rotate, rotary_dim)
    exact = exact_scores(src, anchor, rotate, rotary_dim)
    assert bool(((approx - exact).abs() <= error).all())
    # and the bound is of the rounding's size (a few % of the norms' product), not vacuous
    x_norm = torch.stack([b.double().pow(2).sum((1, 2, 3)) for b in src.tensors()]).sum(0).sqrt()
    y_norm = torch.stack([b.double().pow(2).sum((1, 2, 3)) for b in anchor.tensors()]).sum(0).sqrt()
    assert bool((error <= 0.1 * x_norm[:, None] * y_norm[None, :]).all())


def test_rounded_pair_scores_bound_holds_where_the_rounding_reaches_most_of_it():
    """Entries 1 + 2^-8, halfway between two bfloat16 values, all round down to 1: every product
    loses the same 2u, and on 1 x 1 blocks (dh = 1, the trace) nothing averages out -- the error
    is two thirds of the bound, so a bound without its 2u |x| |y| rounding term fails here."""
    blocks = torch.full((2, 1, 1, 64), 1 + 2.0**-8)
    src, anchor = Circuit(blocks, blocks.clone()), Circuit(blocks.clone(), blocks.clone())
    approx, error = rounded_pair_scores(src, anchor, rotate=False)
    exact = torch.full((2, 2), 2 * 64 * (1 + 2.0**-8) ** 2, dtype=torch.float64)
    assert bool(((approx - exact).abs() <= error).all())
    assert bool(((approx - exact).abs() >= 0.6 * error).all())


def test_rounded_pair_scores_match_the_float32_scores_within_the_bound():
    g = torch.Generator().manual_seed(2)
    src = Circuit(torch.randn(GROUPS, HEADS, DH, N, generator=g), torch.randn(GROUPS, 1, DH, N, generator=g))
    anchor = Circuit(torch.randn(GROUPS, HEADS, DH, N, generator=g), torch.randn(GROUPS, 1, DH, N, generator=g))
    approx, error = rounded_pair_scores(src, anchor, True)
    assert bool(((approx - pair_scores(src, anchor, True)).abs() <= error).all())


def brute_force_proof(approx: torch.Tensor, error: torch.Tensor, perm: torch.Tensor) -> bool:
    """Whether `perm` (perm[j] = row of column j) beats every assignment for every exact scores
    within `error` of `approx`: for each rival A, the worst case moves P's entries down and A's up."""
    n = len(perm)
    chosen = {(int(perm[j]), j) for j in range(n)}
    for rows in permutations(range(n)):
        rival = {(rows[j], j) for j in range(n)}
        mine = sum(float(approx[i, j] - error[i, j]) for i, j in chosen - rival)
        theirs = sum(float(approx[i, j] + error[i, j]) for i, j in rival - chosen)
        if mine < theirs:
            return False
    return True


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 5),
    seed=st.integers(0, 2**31 - 1),
    spread=st.sampled_from([0.0, 0.01, 0.3, 3.0]),
)
def test_certified_assignment_keeps_an_assignment_only_when_the_bounds_prove_it(n, seed, spread):
    """Sound (a kept assignment beats every rival in the worst case the bounds allow, checked over
    all n! rivals) and no more timid than that worst case (None only when some rival could win)."""
    g = torch.Generator().manual_seed(seed)
    approx = torch.randn(n, n, generator=g, dtype=torch.float64)
    error = spread * torch.rand(n, n, generator=g, dtype=torch.float64)
    found = certified_assignment(approx, error)
    best = best_assignment(approx)
    if found is not None:
        assert torch.equal(found, best) and brute_force_proof(approx, error, found)
    else:
        loosened = error * (1 - 1e-9)  # past the certificate's float margin
        assert not brute_force_proof(approx, loosened, best)


def test_certified_assignment_refuses_a_tie_and_keeps_a_clear_winner():
    tie = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64) + torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert certified_assignment(tie, torch.full((2, 2), 1e-6, dtype=torch.float64)) is None
    clear = torch.eye(3, dtype=torch.float64)[[2, 0, 1]]
    # a rival moving k entries trades k ones for k zeros: proven while k (1 - e) > k e, e < 1/2
    found = certified_assignment(clear, torch.full((3, 3), 0.45, dtype=torch.float64))
    assert found is not None and torch.equal(found, best_assignment(clear))
    assert certified_assignment(clear, torch.full((3, 3), 0.55, dtype=torch.float64)) is None


def related_circuits(seed: int, noise: float, bfloat16_values: bool) -> tuple[Circuit, Circuit, torch.Tensor]:
    """An anchor circuit and a scrambled relative: groups permuted, `noise` added."""
    g = torch.Generator().manual_seed(seed)

    def draw(heads_per_group: int) -> torch.Tensor:
        block = torch.randn(GROUPS, heads_per_group, DH, N, generator=g)
        return block.bfloat16().float() if bfloat16_values else block

    anchor = Circuit(draw(HEADS), draw(1))
    perm = torch.randperm(GROUPS, generator=g)
    shifted = Circuit(
        tuple(b + noise * draw(b.shape[1]) for b in anchor.left), tuple(b + noise * draw(1) for b in anchor.right)
    )
    inverse = torch.argsort(perm)
    return permute_groups(shifted, inverse), anchor, perm


RELATIVES = {  # how the scores are bounded: whether bfloat16 GEMMs are fast, and the relatives
    "bfloat16 scores, float32 values": (True, lambda: related_circuits(3, 0.5, False)),
    "bfloat16 scores, bfloat16 values": (True, lambda: related_circuits(3, 0.5, True)),
    "float32 prefixes, close": (False, lambda: wide_relatives(6, 0.05)),
    "float32 prefixes, far": (False, lambda: wide_relatives(6, 0.4)),
}


@pytest.mark.parametrize("case", list(RELATIVES))
def test_group_permutation_of_relatives_is_certified_without_the_float32_pair_scores(case, monkeypatch):
    """Scrambled relatives: the bounded scores' assignment is proven and kept (no float32 GEMM over
    every pair of groups), and it is the float32 scores' assignment, which undoes the scramble --
    from bfloat16 GEMMs where they are fast, else from float32 GEMMs over prefixes of the columns."""
    fast, make = RELATIVES[case]
    src, anchor, perm = make()
    circuits = [ScoredCircuit(src, anchor, rotate, rotary) for rotate, rotary in ((True, 0), (True, 4), (False, 0))]
    scores = sum(pair_scores(c.src, c.anchor, c.rotate, c.rotary_dim) for c in circuits)
    assert torch.equal(best_assignment(scores), perm)  # type: ignore[arg-type]

    def float32_scores(*args: object) -> torch.Tensor:
        raise AssertionError("the float32 scores over every pair of groups were needed")

    monkeypatch.setattr(heads, "fast_bfloat16_gemm", lambda device: fast)
    monkeypatch.setattr(heads, "pair_scores", float32_scores)
    assert torch.equal(group_permutation(circuits), perm)


def test_group_permutation_falls_back_to_float32_scores_on_near_ties(monkeypatch):
    """Two identical anchor groups: every rounded score ties with another, nothing is proven, and
    the float32 scores decide (as without bfloat16)."""
    src, anchor, _ = related_circuits(4, 0.5, False)
    anchor = Circuit(tuple(b[[0, 0, 2, 3]] for b in anchor.left), tuple(b[[0, 0, 2, 3]] for b in anchor.right))
    circuits = [ScoredCircuit(src, anchor, True)]
    calls = []
    monkeypatch.setattr(heads, "fast_bfloat16_gemm", lambda device: True)
    monkeypatch.setattr(heads, "pair_scores", lambda *args: calls.append(args) or pair_scores(*args))
    found = group_permutation(circuits)
    assert calls and torch.equal(found, best_assignment(pair_scores(src, anchor, True)))


@pytest.mark.parametrize("share", HEAD_PREFIXES)
@pytest.mark.parametrize("kind", ["decades", "heavy tails", "aligned rounding", "bfloat16 values"])
@pytest.mark.parametrize(
    ("rotate", "rotary_dim"), [(False, 0), (True, 0), (True, 4)], ids=["trace", "nuclear", "rotary"]
)
def test_prefix_bounds_hold_on_every_pair(kind, rotate, rotary_dim, share):
    """The float32 prefix path's upper bounds are above every exact score, and its scores of a
    pair over every column, less their rounding bound, below it -- and both within 10 % of the
    norms' product of it (not vacuous)."""
    g = torch.Generator().manual_seed(5)
    src = Circuit(stressed_blocks(kind, g), transposed(stressed_blocks(kind, g)))
    anchor = Circuit(stressed_blocks(kind, g), transposed(stressed_blocks(kind, g)))
    circuits = [ScoredCircuit(src, anchor, rotate, rotary_dim)]
    pairs = [[heads._BlockPair.of(x, y) for x, y in zip(src.tensors(), anchor.tensors(), strict=True)]]
    prefix = torch.zeros(GROUPS * DH, GROUPS * DH, dtype=torch.float64)
    upper = heads._prefix_upper(pairs[0], prefix, share, GROUPS, DH)
    exact = exact_scores(src, anchor, rotate, rotary_dim)
    sources, targets = torch.arange(GROUPS).repeat_interleave(GROUPS), torch.arange(GROUPS).repeat(GROUPS)
    lower = heads._exact_lowers(circuits, pairs, sources, targets).view(GROUPS, GROUPS)
    assert bool((upper >= exact).all()) and bool((lower.double() <= exact).all())
    x_norm = torch.stack([b.double().pow(2).sum((1, 2, 3)) for b in src.tensors()]).sum(0).sqrt()
    y_norm = torch.stack([b.double().pow(2).sum((1, 2, 3)) for b in anchor.tensors()]).sum(0).sqrt()
    assert bool((exact - lower <= 0.1 * x_norm[:, None] * y_norm[None, :]).all())


def wide_relatives(seed: int, noise: float, width: int = 512) -> tuple[Circuit, Circuit, torch.Tensor]:
    """`related_circuits` with rows `width` wide: a prefix of them holds enough columns."""
    g = torch.Generator().manual_seed(seed)
    anchor = Circuit(torch.randn(GROUPS, HEADS, DH, width, generator=g), torch.randn(GROUPS, 1, DH, width, generator=g))
    perm = torch.randperm(GROUPS, generator=g)
    shifted = Circuit(
        tuple(b + noise * torch.randn(b.shape, generator=g) for b in anchor.left),
        tuple(transposed(b + noise * torch.randn(b.shape, generator=g)) for b in anchor.right),
    )
    return permute_groups(shifted, torch.argsort(perm)), anchor, perm


def test_prefix_group_permutation_gives_up_at_once_on_unrelated_groups(monkeypatch):
    g = torch.Generator().manual_seed(7)
    src, anchor = (
        Circuit(torch.randn(GROUPS, HEADS, DH, 512, generator=g), torch.randn(GROUPS, 1, DH, 512, generator=g))
        for _ in range(2)
    )
    shares = []
    prefix_upper = heads._prefix_upper
    monkeypatch.setattr(heads, "_prefix_upper", lambda *args: shares.append(args[2]) or prefix_upper(*args))
    assert prefix_group_permutation([ScoredCircuit(src, anchor, True)]) is None
    assert shares == [HEAD_PREFIXES[0]]  # one circuit, the first prefix only


@pytest.mark.parametrize(
    ("noise", "expected"),
    [
        (0.3, ["1/8"]),
        (0.55, ["1/8", "3/16"]),
        (0.65, ["1/8", "3/16", "1/4"]),
        (0.7, ["1/8", "1/4"]),
        (0.9, ["1/8", "1/2"]),
    ],
)
def test_prefix_group_permutation_stops_at_the_first_share_that_proves_it(monkeypatch, noise, expected):
    """The noisier the pair, the wider the share that settles it; a share whose rest alone would
    still outweigh the pair's own score is skipped. Each share's products extend the last one's:
    every block's columns are multiplied once, up to the share that settled it."""
    src, anchor, perm = wide_relatives(6, noise)
    shares, columns = [], []
    prefix_upper, rows = heads._prefix_upper, heads._rows
    monkeypatch.setattr(heads, "_prefix_upper", lambda *args: shares.append(args[2]) or prefix_upper(*args))
    monkeypatch.setattr(heads, "_rows", lambda block, dtype: columns.append(block.shape[-1]) or rows(block, dtype))
    assert torch.equal(prefix_group_permutation([ScoredCircuit(src, anchor, True)]), perm)
    assert shares == [Fraction(share) for share in expected]
    width, blocks = src.left[0].shape[-1], len(src.tensors())
    assert sum(columns) == 2 * blocks * int(width * shares[-1])  # both sides, once


def test_prefix_certificate_refuses_what_the_bounds_alone_would_pick(monkeypatch):
    """Groups whose first half of the columns pairs them crosswise and whose second, larger half
    pairs them straight: every prefix's bounds favour the crossed assignment, the exact scores the
    straight one. The certificate refuses it (the float32 scores then decide: straight); without
    the certificate the crossed one would be taken."""
    g = torch.Generator().manual_seed(8)
    half = 256
    first, second = torch.randn(2, 1, DH, half, generator=g), 3 * torch.randn(2, 1, DH, half, generator=g)
    anchor = Circuit(torch.cat([first, second], -1), torch.zeros(2, 1, DH, 2 * half))
    src = Circuit(torch.cat([first[[1, 0]], second], -1), torch.zeros(2, 1, DH, 2 * half))
    circuits = [ScoredCircuit(src, anchor, True)]
    straight = torch.arange(2)
    monkeypatch.setattr(heads, "fast_bfloat16_gemm", lambda device: False)
    assert prefix_group_permutation(circuits) is None
    assert torch.equal(group_permutation(circuits), straight)
    monkeypatch.setattr(heads, "optimal_against", lambda perm, worst: True)
    assert torch.equal(prefix_group_permutation(circuits), straight.flip(0))


@pytest.mark.parametrize("width", [100, heads.STRIDED_CHUNK * 3 + 17])
def test_norms_of_a_transposed_block_equal_those_of_its_contiguous_copy(width):
    """o's columns reach the head scores as a transposed block (its last dimension strided); their
    norms, squared a chunk of columns at a time, are the contiguous block's."""
    weight = torch.randn(width, 8 * 4 * 16, generator=torch.Generator().manual_seed(width))
    block = weight.T.reshape(8, 4, 16, width)
    assert block.stride(-1) != 1
    expected = torch.linalg.vector_norm(block.contiguous().double(), dim=-1)
    assert torch.allclose(heads._last_norms(block).double(), expected, rtol=1e-6)


def test_the_proofs_products_are_the_rotations_inputs(monkeypatch):
    """The float32-prefix proof computes every pair of its assignment exactly; those products,
    put in the assignment's order, are what the rotation solve would compute on the permuted
    circuits -- it takes them instead, to the same transform -- and a pair the proof never
    computed leaves the solve to compute its own."""
    monkeypatch.setattr(heads, "fast_bfloat16_gemm", lambda device: False)
    src, anchor, perm = wide_relatives(6, 0.05)
    circuits = [ScoredCircuit(src, anchor, True, 0), ScoredCircuit(src, anchor, False, 0)]
    exact: heads.PairProducts = {}
    assert torch.equal(group_permutation(circuits, exact), perm)
    moved = permute_groups(src, perm)
    for index in range(len(circuits)):
        given = heads.pair_products(exact, perm, index, len(perm))
        assert given is not None
        computed = circuit_products(moved, anchor)
        for name, value in vars(computed).items():
            assert torch.allclose(getattr(given, name), value, rtol=1e-6, atol=1e-9), name
        with_given = solve_circuit(moved, anchor, True, True, products=given)
        alone = solve_circuit(moved, anchor, True, True)
        assert torch.allclose(with_given.transform.maps()[0], alone.transform.maps()[0], atol=1e-6)
    assert heads.pair_products(exact, torch.arange(len(perm)), 0, len(perm)) is None
    assert heads.pair_products({}, perm, 0, len(perm)) is None


def test_exact_lowers_of_bfloat16_blocks_are_below_the_exact_scores():
    """Blocks stored in bfloat16: the proof's pair products are taken in float32 (its rounding
    bound's precision), so its lower bounds stay below the exact scores. Every entry 137/128: a
    256-column chunk's sum, 293.27, is exact in float32, and a bfloat16 product would round each
    one up to 294 -- past the float32 rounding bound."""
    shape = (GROUPS, HEADS, DH, 4096)
    block = torch.full(shape, 137 / 128, dtype=torch.bfloat16)
    src = anchor = Circuit(block, block)
    circuits = [ScoredCircuit(src, anchor, False, 0)]
    pairs = [[heads._BlockPair.of(x, y) for x, y in zip(src.tensors(), anchor.tensors(), strict=True)]]
    sources, targets = torch.arange(GROUPS).repeat_interleave(GROUPS), torch.arange(GROUPS).repeat(GROUPS)
    lower = heads._exact_lowers(circuits, pairs, sources, targets).view(GROUPS, GROUPS)
    wide = Circuit(block.float(), block.float())
    assert bool((lower <= exact_scores(wide, wide, False, 0)).all())
