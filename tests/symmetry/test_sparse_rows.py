"""The sparse assignment certified on bfloat16 scores (`RoundedScores`, `_RowScores`): the same
optimum as scipy's dense Hungarian on the exact scores, without the float32 score GEMM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.rows import assignment_total, exact_scores, model_rows, optimum_total

from rotfuse.symmetry import permutation
from rotfuse.symmetry.permutation import (
    PREFIXES,
    PROBE_ROWS,
    RoundedScores,
    _certified_sparse,
    _RowScores,
    bounded_row_bests,
    first_prefix,
    solve_permutation,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["unrelated", "related", "scaled"])
def test_rounded_scores_bound_holds_on_every_entry(kind, dtype):
    """From float32 rows and from bfloat16 rows (their own rounding: no residual to bound)."""
    src, anchor = (rows.to(dtype) for rows in model_rows(kind, 200, 300, 0))
    rounded = RoundedScores.of(src, anchor)
    scores, error = rounded.upper(slice(0, 200))
    gap = (scores.double() - src.double() @ anchor.double().T).abs()
    assert bool((gap <= error.double()).all())
    assert float((gap / error.double()).max()) > 0.01, "a bound far too loose would be useless, not wrong"


@pytest.mark.parametrize("kind", ["unrelated", "related", "scaled"])
@pytest.mark.parametrize("n", [2, 40, 300])
def test_sparse_solve_on_rounded_scores_is_the_dense_optimum(kind, n):
    for seed in range(3):
        src, anchor = model_rows(kind, n, 64, seed)
        perm = _certified_sparse(_RowScores(src, anchor, RoundedScores.of(src, anchor)), n, candidates=8)
        exact = exact_scores(src, anchor)
        assert perm is not None and sorted(perm.tolist()) == list(range(n))
        assert assignment_total(exact, perm) == optimum_total(exact)


def test_sparse_solve_on_rounded_scores_recovers_a_scrambled_copy():
    src, anchor = model_rows("unrelated", 300, 64, 1)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(2))
    perm = _certified_sparse(_RowScores(anchor[order], anchor, RoundedScores.of(anchor[order], anchor)), 300, 8)
    assert perm is not None and torch.equal(anchor[order][perm], anchor)


def test_sparse_solve_on_rounded_scores_without_its_check_is_caught(monkeypatch):
    """Skipped, the dual check lets the optimum of one candidate per row through: worse than scipy's."""
    src, anchor = model_rows("unrelated", 300, 64, 0)
    exact, rounded = exact_scores(src, anchor), RoundedScores.of(src, anchor)
    assert assignment_total(exact, _certified_sparse(_RowScores(src, anchor, rounded), 300, 8)) == optimum_total(exact)
    monkeypatch.setattr(_RowScores, "violations", lambda *args: np.empty(0, dtype=np.int64))
    assert assignment_total(exact, _certified_sparse(_RowScores(src, anchor, rounded), 300, 1)) < optimum_total(exact)


def test_solve_permutation_takes_the_rounded_sparse_path_for_unrelated_rows(monkeypatch):
    """Whatever the CPU (the bound holds for any bfloat16 GEMM accumulating in float32)."""
    calls = []

    def spy(source, n, candidates):
        calls.append(type(source).__name__)
        return _certified_sparse(source, n, candidates)

    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: True)
    monkeypatch.setattr(permutation, "_certified_sparse", spy)
    n = permutation.SPARSE_MIN_SIZE
    src, anchor = model_rows("unrelated", n, 48, 3)
    perm = solve_permutation(src, anchor)
    exact = exact_scores(src, anchor)
    assert calls == ["_RowScores"]
    assert assignment_total(exact, perm) == optimum_total(exact)


def test_prefix_probe_tells_related_from_unrelated_rows():
    n = 5 * PROBE_ROWS
    related, anchor = model_rows("related", n, 256, 4)
    assert first_prefix(anchor[torch.randperm(n)], anchor) is not None
    assert first_prefix(related * 0 + anchor.flip(0), anchor) is not None
    assert first_prefix(*model_rows("unrelated", n, 256, 5)) is None


def _whole_float64_values(src: torch.Tensor, anchor: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The scores as the row path read them before it worked in blocks: one `sampled_addmm` on
    whole float64 copies of both sides."""
    n = len(src)
    crow = torch.from_numpy(np.searchsorted(rows, np.arange(n + 1)))
    zeros = torch.zeros(len(cols), dtype=torch.float64)
    mask = torch.sparse_csr_tensor(crow, torch.from_numpy(cols), zeros, (n, len(anchor)), check_invariants=False)
    return torch.sparse.sampled_addmm(mask, src.double(), anchor.double().T, beta=0.0).values().float().numpy()


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_exact_scores_in_small_blocks_are_bit_identical(monkeypatch):
    """Blocks of 10 source rows and tiles of 70 anchor rows (300 of each), or the few rows a small
    request touches: the same float32 bits as whole float64 copies, and the same permutation as
    with one block, on scores read in many tiles."""
    n, width = 300, 64
    src, anchor = model_rows("scaled", n, width, 6)
    rounded = RoundedScores.of(src, anchor)
    g = np.random.default_rng(0)
    key = np.unique(g.integers(0, n * n, 20 * n))
    rows, cols = key // n, key % n
    whole = _whole_float64_values(src, anchor, rows, cols)
    perm_whole = _certified_sparse(_RowScores(src, anchor, rounded), n, 8)

    monkeypatch.setattr(permutation, "EXACT_BYTES", 8 * width * 80)
    exact = permutation._ExactScores(src, anchor)
    assert (exact.block, exact.tile) == (10, 70)
    assert exact._src64.numel() + exact._anchor64.numel() <= 80 * width
    assert np.array_equal(exact(rows, cols).view(np.int32), whole.view(np.int32))
    assert np.array_equal(exact(rows[::7], cols[::7]).view(np.int32), whole[::7].view(np.int32))  # tiles reused
    few = slice(0, 30)  # at most 60 rows of both sides: just those, gathered into the tile's buffer
    assert len(np.unique(rows[few])) + len(np.unique(cols[few])) <= exact.tile
    assert np.array_equal(exact(rows[few], cols[few]).view(np.int32), whole[few].view(np.int32))
    assert np.array_equal(exact(rows, cols).view(np.int32), whole.view(np.int32))  # the tiles again, after
    blocked = _RowScores(src, anchor, rounded)
    perm = _certified_sparse(blocked, n, 8)
    assert blocked._exact is not None and blocked._exact.tile == 70
    assert perm is not None and perm_whole is not None and torch.equal(perm, perm_whole)
    scores = exact_scores(src, anchor)
    assert assignment_total(scores, perm) == optimum_total(scores)


@pytest.mark.parametrize("kind", ["unrelated", "scaled"])
def test_rounded_scores_in_row_blocks_keep_their_norms_and_bound(monkeypatch, kind):
    """Blocks of 37 rows (bfloat16 rows and float32 residuals of one block at a time): the norms are
    bit-identical to one block's, and the bound holds on every entry."""
    src, anchor = model_rows(kind, 200, 300, 7)
    whole = RoundedScores.of(src, anchor)
    monkeypatch.setattr(permutation, "ROW_BLOCK", 37)
    blocked = RoundedScores.of(src, anchor)
    assert torch.equal(blocked.left, whole.left) and torch.equal(blocked.right, whole.right)
    scores, error = blocked.upper(slice(0, 200))
    assert bool(((scores.double() - src.double() @ anchor.double().T).abs() <= error.double()).all())


@pytest.mark.parametrize("bfloat16", [False, True], ids=["float32 prefixes", "bfloat16 prefixes"])
def test_far_relatives_start_at_a_wider_prefix_and_keep_the_exact_bests(bfloat16, monkeypatch):
    """Rows that drifted far from their partners (cosine 0.82) settle on no 1/8 prefix: the probe
    starts the passes where they do settle, and every best is the float64 argmax."""
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: bfloat16)
    n = 5 * PROBE_ROWS
    far, anchor = model_rows("related", n, 1024, 6)
    first = first_prefix(far, anchor)
    assert first is not None and first > 0
    best = bounded_row_bests(far, anchor, first)
    assert best is not None and torch.equal(best, exact_scores(far, anchor).argmax(dim=1))
    assert torch.equal(solve_permutation(far, anchor), torch.argsort(best))


@pytest.mark.parametrize("bfloat16", [False, True], ids=["float32 prefixes", "bfloat16 prefixes"])
def test_close_fine_tunes_settle_on_a_prefix_narrower_than_an_eighth_with_the_exact_bests(bfloat16, monkeypatch):
    """A fine-tune (cosine 0.999): the probe starts below 1/8 of the columns, and the bounds
    still give every row its float64 argmax."""
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: bfloat16)
    n, width = 5 * PROBE_ROWS, 2048
    g = torch.Generator().manual_seed(7)
    anchor = torch.randn(n, width, generator=g)
    src = (anchor + 0.05 * torch.randn(n, width, generator=g))[torch.randperm(n, generator=g)]
    first = first_prefix(src, anchor)
    assert first is not None and PREFIXES[first] < 8  # in 64ths of the columns
    best = bounded_row_bests(src, anchor, first)
    assert best is not None and torch.equal(best, exact_scores(src, anchor).argmax(dim=1))


@pytest.mark.parametrize("noise", [0.05, 0.6], ids=["close: narrower probes", "far: wider probes"])
def test_float32_probe_scores_each_prefix_it_tries_as_one_gemm_would(noise, monkeypatch):
    """The float32 probe computes each step between prefixes once and sums the steps: every prefix
    it tries sees the scores of that prefix's whole GEMM (up to float32 rounding)."""
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: False)
    monkeypatch.setattr(permutation, "int8_gemm_available", lambda: False)  # the float32 probe, not the int8 one
    seen = []

    def spy(rows_src, anchor, upto, scores, src_norm, bounds):
        seen.append(upto)
        direct = rows_src[:, :upto].double() @ anchor[:, :upto].double().T
        scale = src_norm[:, None].double() * bounds.anchor_norm[None, :].double()
        assert float(((scores.double() - direct).abs() / scale).max()) < 1e-5
        return prefix_pass(rows_src, anchor, upto, scores, src_norm, bounds)

    prefix_pass = permutation._prefix_pass
    monkeypatch.setattr(permutation, "_prefix_pass", spy)
    n, width = 5 * PROBE_ROWS, 1024
    g = torch.Generator().manual_seed(21)
    anchor = torch.randn(n, width, generator=g)
    first = first_prefix(anchor + noise * torch.randn(n, width, generator=g), anchor)
    assert first is not None and len(set(seen)) >= 2  # the probe tried more than one prefix


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divisor", [32, 8, 2])
def test_prefix_bounds_are_above_every_exact_score(divisor, dtype):
    """The bfloat16 prefix bound (rounded prefix scores, their error bound, the rest's norms from
    the whole and prefix norms) is above the float64 score of EVERY pair, on rows built to stress
    it: norms over four decades, heavy-tailed entries, exact copies (the bound's tightest case) --
    from float32 rows and from bfloat16 rows read as they are (nothing to round, no residual)."""
    g = torch.Generator().manual_seed(8)
    n, width = 300, 640
    anchor = (torch.randn(n, width, generator=g) ** 3 * torch.logspace(-2, 2, n)[:, None]).to(dtype)
    src = torch.cat([anchor[:100], (torch.randn(n - 100, width, generator=g) * 1e3).to(dtype)])
    bounds = permutation._PrefixBounds(anchor, permutation.row_norms(anchor))
    exact = src.double() @ anchor.double().T
    for block, upper in bounds.upper(src, permutation.row_norms(src), width // divisor):
        assert bool((upper.double() >= exact[block]).all())


class _Inflated(_RowScores):
    """Every estimate at the top of its error bound: the worst case for a matching chosen on them."""

    def values(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values, known = super().values(rows, cols)
        error = self.rounded.error_at(torch.from_numpy(rows), torch.from_numpy(cols)).numpy()
        return np.where(known, values, values + 0.99 * error).astype(np.float32), known


@pytest.mark.parametrize("source_type", [_RowScores, _Inflated], ids=["estimates", "inflated estimates"])
def test_sparse_solve_certifies_on_exact_scores_of_its_matching(source_type):
    """The graph holds bfloat16 estimates, but the duals the certificate checks are tight on the
    matching's EXACT scores (complementary slackness: sum(u) + sum(v) is the matching's exact total)."""
    n = 300
    checked: list[tuple[np.ndarray, np.ndarray, int]] = []

    class Spy(source_type):  # type: ignore[misc,valid-type]
        def violations(self, u, v, scale, most):
            checked.append((u.copy(), v.copy(), scale))
            return super().violations(u, v, scale, most)

    for seed in range(3):
        src, anchor = model_rows("unrelated", n, 64, seed)
        perm = _certified_sparse(Spy(src, anchor, RoundedScores.of(src, anchor)), n, 8)
        exact = exact_scores(src, anchor)
        assert perm is not None and assignment_total(exact, perm) == optimum_total(exact)
        u, v, scale = checked[-1]
        matched = np.ldexp(exact.numpy()[perm.numpy(), np.arange(n)].astype(np.float64), scale).astype(np.int64)
        assert np.array_equal(u[perm.numpy()] + v, matched)


def test_sparse_solve_reads_its_matching_exactly_before_the_dual_check(monkeypatch):
    """After a solve on estimates, the matched entries (and the estimates whose error bound reaches
    their reduced cost) are read exactly and the graph solved again before any dual check; the
    exact reads stay well below the graph's size: the estimates do the rest."""
    import scipy.sparse.csgraph

    n, k = 300, 8
    src, anchor = model_rows("unrelated", n, 256, 1)
    events: list[tuple[str, np.ndarray]] = []
    solve = scipy.sparse.csgraph.min_weight_full_bipartite_matching

    def spy_solve(graph):
        rows, cols = solve(graph)
        events.append(("solve", rows * n + cols))
        return rows, cols

    monkeypatch.setattr(scipy.sparse.csgraph, "min_weight_full_bipartite_matching", spy_solve)

    class Spy(_RowScores):
        def exact(self, rows, cols):
            events.append(("exact", rows * n + cols))
            return super().exact(rows, cols)

        def violations(self, u, v, scale, most):
            events.append(("violations", np.empty(0)))
            return super().violations(u, v, scale, most)

    source = Spy(src, anchor, RoundedScores.of(src, anchor))
    perm = _certified_sparse(source, n, k)
    assert perm is not None
    kinds = [kind for kind, _ in events]
    assert kinds[:3] == ["solve", "exact", "solve"] and kinds.index("violations") > 2
    assert np.isin(events[0][1], events[1][1]).all()  # the first matching, read exactly
    assert len(source._known) < k * n / 2
