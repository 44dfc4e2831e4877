"""`_match_ffn`, the FFN module of `match_layer`: with the permutation on, its distance before comes
from the pass over both FFNs' neuron rows (`neuron_pairs`), which holds every parameter the
permutation moves once -- the same distance as over the tensors themselves -- except where the rows
round the weights (float64), which measure the tensors; a non-finite input is still found."""

from __future__ import annotations

import math

import pytest
import torch

from rotfuse.align.layer import NONFINITE, LayerSettings, _match_ffn
from rotfuse.core.tensors import sq_distance
from rotfuse.symmetry.part_norms import paired_rows
from rotfuse.symmetry.permutation import PREFIX_UNIT, neuron_pairs, neuron_rows, permute_ffn, random_permutation
from rotfuse.symmetry.weights import Ffn, Linear

PERM = LayerSettings(frozenset({"ffn.perm"}))


def _ffn(dtype: torch.dtype, biases: bool, seed: int, base: Ffn | None = None, d: int | None = None) -> Ffn:
    g = torch.Generator().manual_seed(seed)
    width = 256
    if d is None:
        d = 42 if biases else 64  # rows 3 d + 2 or 3 d wide: whole runs of PREFIX_UNIT

    def noisy(ref: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        fresh = torch.randn(shape, generator=g, dtype=torch.float64)
        return (fresh if ref is None else ref.double() + 0.3 * fresh).to(dtype)

    def part(index: int, shape: tuple[int, ...], bias: bool) -> Linear:
        ref = None if base is None else (base.inputs[index] if index >= 0 else base.output)
        weight = noisy(None if ref is None else ref.weight, shape)
        return Linear(weight, noisy(None if ref is None else ref.bias, (shape[0],)) if bias else None)

    return Ffn([part(0, (width, d), biases), part(1, (width, d), biases)], part(-1, (d, width), False))


@pytest.mark.parametrize(
    ("dtype", "biases", "d", "paired"),
    [
        (torch.bfloat16, False, None, True),
        (torch.float32, True, None, True),
        (torch.bfloat16, False, 40, False),  # 120 columns: no whole runs
        (torch.float64, True, None, False),
    ],
)
def test_neuron_pairs_build_the_neuron_rows_and_measure_them(dtype, biases, d, paired):
    """The rows come out as `neuron_rows` builds them, chunk by chunk where they are measured on
    the way, and the measures are `paired_rows`' of the finished rows."""
    anchor = _ffn(dtype, biases, 0, d=d)
    src = _ffn(dtype, biases, 1, anchor, d=d)
    src_rows, anchor_rows, measured = neuron_pairs(src, anchor)
    src_rows, anchor_rows = src_rows.clone(), anchor_rows.clone()  # this thread's buffers
    expected = neuron_rows(src, anchor)
    assert torch.equal(src_rows, expected[0]) and torch.equal(anchor_rows, expected[1])
    assert (measured is not None) == paired
    if measured is not None:
        again = paired_rows(src_rows, anchor_rows, PREFIX_UNIT)
        assert again is not None and torch.equal(measured.diagonal, again.diagonal)
        assert torch.equal(measured.src.sums, again.src.sums) and torch.equal(measured.anchor.sums, again.anchor.sums)
        assert measured.sq_distance == again.sq_distance


def _tensor_distance(src: Ffn, anchor: Ffn) -> float:
    pairs = [(s.weight, a.weight) for s, a in zip(src.inputs, anchor.inputs, strict=True)]
    pairs += [(s.bias, a.bias) for s, a in zip(src.inputs, anchor.inputs, strict=True) if s.bias is not None]
    return sum(sq_distance(s, a) for s, a in [*pairs, (src.output.weight, anchor.output.weight)])


@pytest.mark.parametrize(("dtype", "biases"), [(torch.bfloat16, False), (torch.float32, True), (torch.float16, True)])
def test_distance_from_the_neuron_rows_is_the_tensors_distance(dtype, biases):
    anchor = _ffn(dtype, biases, 0)
    src = permute_ffn(_ffn(dtype, biases, 1, anchor), random_permutation(256, torch.Generator().manual_seed(2)))
    assert neuron_pairs(src, anchor)[2] is not None
    moved, result = _match_ffn(src, anchor, PERM)
    assert math.isclose(result.before**2, _tensor_distance(src, anchor), rel_tol=1e-6)
    assert math.isclose(result.after**2, _tensor_distance(moved, anchor), rel_tol=1e-12)
    assert result.after < 0.8 * result.before


def test_float64_weights_are_measured_on_the_tensors():
    anchor = _ffn(torch.float64, True, 0)
    src = _ffn(torch.float64, True, 1, anchor)
    assert neuron_pairs(src, anchor)[2] is None, "float32 rows round float64 weights"
    _, result = _match_ffn(src, anchor, PERM)
    assert result.before == math.sqrt(_tensor_distance(src, anchor))


@pytest.mark.parametrize("symmetries", [{"ffn.perm"}, set()])
def test_a_nonfinite_ffn_is_found_and_left_as_it_is(symmetries):
    settings = LayerSettings(frozenset(symmetries), may_be_nonfinite=True)
    anchor = _ffn(torch.bfloat16, False, 0)
    src = _ffn(torch.bfloat16, False, 1, anchor)
    assert _match_ffn(src, anchor, settings)[1].skipped is None
    src.inputs[1].weight[3, 5] = float("nan")
    kept, result = _match_ffn(src, anchor, settings)
    assert kept is src and result.skipped == NONFINITE
