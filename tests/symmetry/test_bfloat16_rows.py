"""FFN neuron rows solved in bfloat16 as stored (`working_rows`, `neuron_rows`): the same optimum as
their float32 copies, on every path of `solve_permutation`, without a float32 copy of the rows."""

from __future__ import annotations

import pytest
import torch
from helpers.rows import assignment_total, exact_scores, model_rows, optimum_total

from rotfuse.core.buffers import held_buffer
from rotfuse.symmetry import permutation
from rotfuse.symmetry.permutation import (
    best_assignment,
    bounded_row_bests,
    filtered_row_bests,
    first_prefix,
    neuron_rows,
    solve_permutation,
    working_rows,
)
from rotfuse.symmetry.weights import Ffn, Linear, ffn_rows


def _bf16_rows(kind: str, n: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose values are bfloat16 numbers (as a bf16 checkpoint's are): a close fine-tune, a
    far relative or an unrelated model."""
    noise = {"close": 0.05, "related": 0.5, "unrelated": 0.0}[kind]
    src, anchor = model_rows("unrelated" if kind == "unrelated" else "related", n, width, seed, noise)
    return src.bfloat16(), anchor.bfloat16()


@pytest.fixture
def fast_bfloat16(monkeypatch):
    """The bfloat16 paths whatever the CPU: their bounds hold for any bfloat16 GEMM accumulating in
    float32 (a CPU without fast bfloat16 only runs them slower)."""
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: True)


@pytest.mark.parametrize("kind", ["close", "related", "unrelated"])
def test_bfloat16_rows_give_the_optimum_of_their_float32_copies(kind, fast_bfloat16):
    """Close and far fine-tunes (prefix bounds) and unrelated rows (the sparse solve on the rounded
    GEMM's estimates, n above SPARSE_MIN_SIZE): one permutation whatever the rows' dtype, and it
    is the dense Hungarian's optimum on the exact scores."""
    src, anchor = _bf16_rows(kind, 1100, 192, seed=1)
    perm = solve_permutation(src, anchor)
    assert torch.equal(perm, solve_permutation(src.float(), anchor.float()))
    exact = exact_scores(src, anchor)
    assert assignment_total(exact, perm) == optimum_total(exact)


@pytest.mark.parametrize("kind", ["close", "related", "unrelated"])
@pytest.mark.parametrize("n", [300, 1100], ids=["passes alone", "probe first"])
def test_bfloat16_rows_without_fast_bfloat16_stay_as_they_are_and_solve_in_float32(kind, n, monkeypatch):
    """No float32 copy of the rows: the float32 path's GEMMs take float32 copies of the columns they
    read, its norms and dot products convert blocks; the optimum is the float32 copies' own."""
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: False)
    src, anchor = _bf16_rows(kind, n, 128, seed=2)
    assert all(kept is given for kept, given in zip(working_rows(src, anchor), (src, anchor), strict=True))
    perm = solve_permutation(src, anchor)
    assert torch.equal(perm, solve_permutation(src.float(), anchor.float()))
    assert torch.equal(perm, best_assignment(src.float() @ anchor.float().T))


def test_working_rows_keep_bfloat16_rows_as_they_are(fast_bfloat16):
    """No copy: the solve reads the rows it was given (half the bytes of float32 copies); rows of
    two dtypes are read in float32."""
    src, anchor = _bf16_rows("related", 8, 16, seed=3)
    assert all(kept is given for kept, given in zip(working_rows(src, anchor), (src, anchor), strict=True))
    mixed = working_rows(src, anchor.float())
    assert all(rows.dtype == torch.float32 for rows in mixed)


@pytest.mark.parametrize("kind", ["close", "related"])
def test_row_best_paths_agree_on_bfloat16_rows(kind, fast_bfloat16):
    """`first_prefix`, `bounded_row_bests` and `filtered_row_bests` called on bfloat16 rows: the
    float64 argmax of every row, as on float32 copies."""
    src, anchor = _bf16_rows(kind, 1100, 256, seed=4)
    argmax = (src.double() @ anchor.double().T).argmax(dim=1)
    first = first_prefix(src, anchor)
    assert first is not None and first == first_prefix(src.float(), anchor.float())
    bounded = bounded_row_bests(src, anchor, first)
    filtered = filtered_row_bests(src, anchor)
    assert bounded is not None and torch.equal(bounded, argmax)
    assert filtered is not None and torch.equal(filtered, argmax)


def _ffn(seed: int, bias_dtype: torch.dtype | None = None) -> Ffn:
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(48, 16, generator=g).bfloat16() for _ in range(2))
    bias = None if bias_dtype is None else torch.randn(48, generator=g).to(bias_dtype)
    return Ffn([Linear(gate, bias), Linear(up)], Linear(torch.randn(16, 48, generator=g).bfloat16()))


def test_neuron_rows_stay_bfloat16_only_when_every_tensor_is(fast_bfloat16):
    src, anchor = _ffn(5), _ffn(6)
    rows = neuron_rows(src, anchor)
    assert all(r.dtype == torch.bfloat16 for r in rows)
    assert torch.equal(rows[0].float(), ffn_rows(src, torch.float32))  # the stored values, unrounded
    with_bias = _ffn(7, torch.float32)  # a float32 bias would be rounded in bfloat16 rows
    rows = neuron_rows(with_bias, _ffn(8, torch.float32))
    assert all(r.dtype == torch.float32 for r in rows)
    assert torch.equal(rows[0], ffn_rows(with_bias, torch.float32))


def test_neuron_rows_stay_bfloat16_without_fast_bfloat16_too(monkeypatch):
    """The float32 path reads them as they are (`working_rows`): no float32 copy of the rows."""
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: False)
    src = _ffn(9)
    rows = neuron_rows(src, _ffn(10))
    assert all(r.dtype == torch.bfloat16 for r in rows)
    assert torch.equal(rows[0].float(), ffn_rows(src, torch.float32))


@pytest.mark.parametrize("fast", [True, False], ids=["bfloat16 GEMMs", "float32 GEMMs"])
def test_bfloat16_rows_settle_near_ties_on_float32_dots(fast, monkeypatch):
    """Anchor rows in pairs of equal norm whose scores differ by ~1e-3 |x| |y|: a candidate's whole
    score must be accumulated (and kept) in float32 -- rounded to bfloat16 it would pass for either
    member of its pair -- and the row best paths find the float64 argmax, as the sparse solve does."""
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: fast)
    g = torch.Generator().manual_seed(15)
    first = torch.randn(150, 256, generator=g, dtype=torch.float64)
    second = (
        first + 0.02 * first.norm(dim=1, keepdim=True) * torch.randn(150, 256, generator=g, dtype=torch.float64) / 16
    )
    second *= first.norm(dim=1, keepdim=True) / second.norm(dim=1, keepdim=True)
    anchor = torch.cat([first, second]).bfloat16()
    src = torch.cat([first + 2 * (first - second), second + 2 * (second - first)])
    src = src[torch.randperm(300, generator=g)].bfloat16()
    exact = src.double() @ anchor.double().T
    argmax = exact.argmax(dim=1)
    assert torch.unique(argmax).numel() == 300, "the case is meant to have distinct bests"
    rounded = (src @ anchor.T).float().argmax(dim=1)
    assert not torch.equal(rounded, argmax), "the rounded GEMM alone must get some wrong, or this tests nothing"
    for best in (filtered_row_bests(src, anchor), bounded_row_bests(src, anchor)):
        assert best is None or torch.equal(best, argmax)
    assert torch.equal(solve_permutation(src, anchor), torch.argsort(argmax))


def test_neuron_rows_reuse_this_threads_buffers_and_hold_the_new_rows(fast_bfloat16):
    """A second call on one thread writes into the first call's buffers (no fresh pages to map and
    zero), with the new FFNs' rows; another thread has buffers of its own; a new shape or dtype gets
    a new buffer."""
    import threading

    first = neuron_rows(_ffn(11), _ffn(12))
    pointers = [rows.data_ptr() for rows in first]
    second = neuron_rows(_ffn(13), _ffn(14))
    assert [rows.data_ptr() for rows in second] == pointers
    assert torch.equal(second[0], ffn_rows(_ffn(13))) and torch.equal(second[1], ffn_rows(_ffn(14)))
    other: list[int] = []
    thread = threading.Thread(target=lambda: other.extend(r.data_ptr() for r in neuron_rows(_ffn(15), _ffn(16))))
    thread.start()
    thread.join()
    assert not set(other) & set(pointers)
    widened = neuron_rows(_ffn(17, torch.float32), _ffn(18, torch.float32))  # a bias column, float32
    assert torch.equal(widened[0], ffn_rows(_ffn(17, torch.float32), torch.float32))


def test_float32_passes_score_into_this_threads_buffer(monkeypatch):
    """The first float32 pass writes its n x n scores into the thread's buffer (the same pages solve
    after solve, no fresh ones to zero); threads solving at once each have their own and each finds
    its own optimum."""
    import threading

    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: False)
    pairs = [_bf16_rows("close", 1100, 128, seed=3), _bf16_rows("related", 1100, 128, seed=4)]
    expected = [best_assignment(src.float() @ anchor.float().T) for src, anchor in pairs]
    assert torch.equal(solve_permutation(*pairs[0]), expected[0])
    pointer = held_buffer("prefix_scores").data_ptr()
    assert torch.equal(solve_permutation(*pairs[1]), expected[1])
    assert held_buffer("prefix_scores").data_ptr() == pointer
    found: dict[int, torch.Tensor] = {}
    alive = threading.Barrier(4)  # every thread's buffer held until all have looked

    def solve(index: int) -> None:
        found[index] = solve_permutation(*pairs[index % 2])
        found[index + 4] = torch.tensor(held_buffer("prefix_scores").data_ptr())
        alive.wait()

    threads = [threading.Thread(target=solve, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(found[index], expected[index % 2]) for index in range(4))
    assert len({int(found[index + 4]) for index in range(4)} | {pointer}) == 5
