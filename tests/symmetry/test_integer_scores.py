"""int8 prefix scores (`rotfuse.symmetry.integer_scores`) and the float32 passes that start from
them: every bound holds against float64 scores on rows built to stress it, and the passes find the
exact optimum with them, as without."""

from __future__ import annotations

import pytest
import torch
from helpers.rows import exact_scores, model_rows

from rotfuse.symmetry import integer_scores, permutation
from rotfuse.symmetry.integer_scores import (
    SCORE_ROUNDING,
    int8_gemm_available,
    quantize_anchor,
    quantize_source,
    quantized_scores,
)
from rotfuse.symmetry.part_norms import paired_rows
from rotfuse.symmetry.permutation import (
    _PrefixBounds,
    best_assignment,
    bounded_row_bests,
    first_prefix,
    row_norms,
    solve_permutation,
)

needs_int8 = pytest.mark.skipif(not int8_gemm_available(), reason="torch without fbgemm's quantized ops")


@pytest.fixture
def any_size(monkeypatch):
    """The int8 first pass on rows of any size (`INT8_MIN_PRODUCTS` keeps it to large GEMMs)."""
    monkeypatch.setattr(permutation, "INT8_MIN_PRODUCTS", 0)


def _stress_rows(seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Pairs of row sets that push the quantization: heavy tails, norms over four decades, zero
    and constant rows, all-positive and all-negative rows, and rows at the largest values (the
    scores the output step must hold unclamped)."""
    g = torch.Generator().manual_seed(seed)
    n, w = 96, 200
    gauss = torch.randn(n, w, generator=g)
    heavy = torch.randn(n, w, generator=g) ** 3
    scaled = torch.randn(n, w, generator=g) * torch.logspace(-2, 2, n)[:, None]
    special = torch.randn(n, w, generator=g)
    special[0] = 0
    special[1] = 3.0
    special[2] = special[2].abs()
    special[3] = -special[3].abs()
    parallel = torch.randn(1, w, generator=g).abs().expand(n, w).clone()  # every score at its largest
    return [
        ("gaussian", gauss, torch.randn(n, w, generator=g)),
        ("heavy tails", heavy, torch.randn(n, w, generator=g) ** 3),
        ("four decades", scaled, torch.randn(n, w, generator=g)),
        ("special rows", special, special.flip(0)),
        ("largest scores", parallel, parallel),
        ("largest negative", parallel, -parallel),
        ("bfloat16", gauss.bfloat16(), torch.randn(n, w, generator=g).bfloat16()),
    ]


@needs_int8
@pytest.mark.parametrize("case", range(7), ids=[name for name, _, _ in _stress_rows(0)])
def test_quantized_scores_are_within_their_bound(case):
    """|x.y - S| <= |x'| (|r_y| + SCORE_ROUNDING |y'|) + |r_x| |y| on every pair (S: the int8
    GEMM's float32 scores), and the bound is tight enough to be of use (a few percent of |x| |y| on
    Gaussian rows)."""
    name, x, y = _stress_rows(case)[case]
    src, anchor = quantize_source(x), quantize_anchor(y)
    approx = quantized_scores(src, anchor)
    assert approx.dtype == torch.float32 and approx.shape == (len(x), len(y))
    exact = x.double() @ y.double().T
    y_norm = y.double().norm(dim=1)
    anchor_factor = anchor.residual_norm.double() + SCORE_ROUNDING * anchor.quantized_norm.double()
    bound = src.quantized_norm.double()[:, None] * anchor_factor[None]
    bound = bound + src.residual_norm.double()[:, None] * y_norm[None]
    assert bool(((exact - approx).abs() <= bound * (1 + 1e-6) + 1e-12).all()), name
    if name == "gaussian":
        scale = x.double().norm(dim=1)[:, None] * y_norm[None]
        assert float((bound / scale).mean()) < 0.05


@needs_int8
def test_quantized_rows_keep_to_seven_bits_and_their_norms_add_up():
    """The source's levels stay in [0, 127] (pairs of u8 * s8 products below 2^15), the anchor's in
    [-127, 127], and x' + r_x is x (the norms as computed)."""
    x, y = torch.randn(64, 50) * 7, torch.randn(40, 50)
    src, anchor = quantize_source(x), quantize_anchor(y)
    levels = src.tensor.double() / src.scale + src.zero_point
    assert float((levels - levels.round()).abs().max()) < 1e-4, "x' lies on its grid: fbgemm reads back q"
    assert int(levels.max()) <= integer_scores.SOURCE_LEVELS
    assert int(levels.min()) >= 0
    dequantized = src.tensor
    assert torch.allclose((x - dequantized).norm(dim=1), src.residual_norm, rtol=1e-5, atol=1e-6)
    assert torch.allclose(dequantized.norm(dim=1), src.quantized_norm, rtol=1e-5)
    assert float(anchor.residual_norm.max()) < 0.02 * float(y.norm(dim=1).min())


@needs_int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noise", [0.05, 0.5], ids=["close", "far"])
def test_int8_passes_find_the_float64_argmax(dtype, noise, monkeypatch, any_size):
    """The first pass's scores from the int8 GEMM (bounds on the prefix's scores), the later ones
    adding float32 columns: every row's best as the float64 scores give it, the permutation the
    float32 passes find."""
    src, anchor = model_rows("related", 1100, 256, seed=5, noise=noise)
    src, anchor = src.to(dtype), anchor.to(dtype)
    argmax = exact_scores(src, anchor).argmax(dim=1)
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: False)
    assert permutation.prefix_gemm(torch.device("cpu")) == "int8"
    calls = []
    integer_pass = _PrefixBounds.integer_pass
    monkeypatch.setattr(_PrefixBounds, "integer_pass", lambda *args: calls.append(1) or integer_pass(*args))
    with_int8 = bounded_row_bests(src, anchor, first_prefix(src, anchor))
    assert with_int8 is not None and torch.equal(with_int8, argmax)
    assert calls, "the first pass must have taken the int8 GEMM"
    perm = solve_permutation(src, anchor)
    monkeypatch.setattr(permutation, "int8_gemm_available", lambda: False)
    assert permutation.prefix_gemm(torch.device("cpu")) == "float32"
    assert torch.equal(perm, solve_permutation(src, anchor))
    assert torch.equal(perm, best_assignment(exact_scores(src, anchor)))


@needs_int8
def test_integer_pass_settles_on_the_argmax_and_bounds_the_open_rows_prefix_scores():
    """The int8 pass settles rows only on their float64 argmax, and what it keeps for the rows it
    leaves open is an upper bound on every one of their scores over the prefix, within a few
    percent of the prefix norms' product (far relatives on a short prefix: most rows stay open;
    several row blocks, bfloat16 rows)."""
    src, anchor = model_rows("related", 1100, 256, seed=6, noise=0.6)
    src, anchor = src.bfloat16(), anchor.bfloat16()
    bounds = _PrefixBounds(anchor, row_norms(anchor))
    upto = 64
    settled, pick, kept = bounds.integer_pass(src, row_norms(src), upto)
    argmax = exact_scores(src, anchor).argmax(dim=1)
    assert 0 < int(settled.sum()) < len(src) // 2, "the case is meant to leave most rows open"
    assert torch.equal(pick[settled], argmax[settled])
    open_rows = (~settled).nonzero()[:, 0]
    exact = src[open_rows, :upto].double() @ anchor[:, :upto].double().T
    assert kept.shape == exact.shape and bool((kept.double() >= exact).all())
    scale = src[open_rows, :upto].double().norm(dim=1)[:, None] * anchor[:, :upto].double().norm(dim=1)[None]
    assert float(((kept.double() - exact) / scale).max()) < 0.1


def test_without_fbgemm_the_passes_run_in_float32(monkeypatch):
    """Where torch lacks the ops (or they fail the self-check) the prefix GEMMs are float32 ones."""
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: False)
    monkeypatch.setattr(permutation, "int8_gemm_available", lambda: False)
    assert permutation.prefix_gemm(torch.device("cpu")) == "float32"
    src, anchor = model_rows("related", 1100, 128, seed=7, noise=0.2)
    assert torch.equal(solve_permutation(src, anchor), best_assignment(exact_scores(src, anchor)))


@needs_int8
def test_int8_probe_and_first_pass_share_the_anchors_quantized_prefix(monkeypatch, any_size):
    """The probe bounds its sample with the int8 GEMM too, and the first pass at the prefix it
    picked packs nothing new: one quantization of the anchor per prefix, whoever asks first."""
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: False)
    quantized: list[int] = []
    quantize = permutation.quantize_anchor
    monkeypatch.setattr(permutation, "quantize_anchor", lambda rows: quantized.append(rows.shape[1]) or quantize(rows))
    src, anchor = model_rows("related", 1100, 512, seed=8, noise=0.5)
    bounds = _PrefixBounds(anchor, row_norms(anchor))
    first = first_prefix(src, anchor, bounds)
    assert first is not None and quantized
    probed = list(quantized)
    best = bounded_row_bests(src, anchor, first, bounds)
    assert best is not None and torch.equal(best, exact_scores(src, anchor).argmax(dim=1))
    assert quantized[: len(probed)] == probed and len(set(quantized)) == len(quantized)
    assert permutation._prefix_width(512, permutation.PREFIXES[first]) in probed


@needs_int8
def test_small_first_passes_stay_float32(monkeypatch):
    """Below INT8_MIN_PRODUCTS multiply-adds the first pass is a float32 GEMM (quantizing would
    cost more than the int8 GEMM saves); above it, the int8 one."""
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: False)
    src, anchor = model_rows("related", 1100, 256, seed=9, noise=0.2)
    bounds = _PrefixBounds(anchor, row_norms(anchor))
    assert bounds.mode == "int8"
    assert not bounds.integer(1100, 32) and bounds.integer(2048, 2**10)
    passes = []
    integer_pass = _PrefixBounds.integer_pass
    monkeypatch.setattr(_PrefixBounds, "integer_pass", lambda *args: passes.append(1) or integer_pass(*args))
    assert torch.equal(solve_permutation(src, anchor), best_assignment(exact_scores(src, anchor)))
    assert not passes


@needs_int8
def test_probe_of_a_close_fine_tune_tries_the_narrowest_prefix_first(monkeypatch, any_size):
    """Where 1/8 of the columns settles the sample and the models are close, the probe tries the
    narrowest prefix wide enough for their distance first, then wider ones until one settles the
    sample: 1/8, 2/64 (too short for these rows), 4/64 -- never 6/64, which walking down from 1/8
    would quantize as well."""
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: False)
    quantized: list[int] = []
    quantize = permutation.quantize_anchor
    monkeypatch.setattr(permutation, "quantize_anchor", lambda rows: quantized.append(rows.shape[1]) or quantize(rows))
    src, anchor = model_rows("related", 1100, 2048, seed=10, noise=0.05)
    first = first_prefix(src, anchor, _PrefixBounds(anchor, row_norms(anchor)))
    width = [permutation._prefix_width(2048, share) for share in permutation.PREFIXES]
    assert first == 1
    assert quantized == [width[permutation.PREFIXES.index(permutation.GIVE_UP_FROM)], width[0], width[1]]


@needs_int8
@pytest.mark.parametrize(("seed", "noise"), [(11, 0.5), (12, 0.05)])
def test_first_pass_takes_the_probes_rows_from_the_probe(monkeypatch, any_size, seed, noise):
    """The probe's int8 pass over its sample (the first PROBE_ROWS rows) is not run again: the
    first pass at the prefix it picked scores the other rows only, and the passes still find every
    row's exact best -- here with sample rows the probe's prefix leaves open, whose bounds the
    later passes take on."""
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: False)
    src, anchor = model_rows("related", 1100, 512, seed=seed, noise=noise)
    bounds = _PrefixBounds(anchor, row_norms(anchor))
    first = first_prefix(src, anchor, bounds)
    assert first is not None
    multiplied: list[int] = []  # source rows through the int8 GEMM
    scores = permutation.quantized_scores
    monkeypatch.setattr(
        permutation, "quantized_scores", lambda rows, *args: multiplied.append(len(rows.tensor)) or scores(rows, *args)
    )
    best = bounded_row_bests(src, anchor, first, bounds)
    monkeypatch.setattr(permutation, "quantized_scores", scores)
    assert sum(multiplied) == len(src) - permutation.PROBE_ROWS
    upto = permutation._prefix_width(512, permutation.PREFIXES[first])
    assert not bool(bounds._probed[upto][1][0].all())
    assert best is not None and torch.equal(best, exact_scores(src, anchor).argmax(dim=1))
    fresh = _PrefixBounds(anchor, row_norms(anchor))  # no probe: every row computed
    assert torch.equal(best, bounded_row_bests(src, anchor, first, fresh))


@needs_int8
@pytest.mark.parametrize("moved_share", [0.0, 0.3, 0.9])
def test_passes_take_the_scores_of_rows_left_in_place_from_paired_rows(monkeypatch, any_size, moved_share):
    """With the rows' `paired_rows`, a row whose candidate is the anchor row of its own index
    (a fine-tune's neurons stay put) has its score read from the pass over the pairs, not computed
    again; the others are computed (all of them where most moved), and the solve is exact."""
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: False)
    g = torch.Generator().manual_seed(13)
    n, width = 1100, 512
    anchor = torch.randn(n, width, generator=g)
    order = torch.arange(n)
    moved = torch.randperm(n, generator=g)[: int(moved_share * n)]
    order[moved] = moved[torch.randperm(len(moved), generator=g)]
    src = anchor[order] + 0.3 * torch.randn(n, width, generator=g)
    computed: list[int] = []
    dots32 = permutation._dots32
    monkeypatch.setattr(permutation, "_dots32", lambda x, *args: computed.append(len(x)) or dots32(x, *args))
    exact = best_assignment(exact_scores(src, anchor))
    assert torch.equal(solve_permutation(src, anchor), exact)
    alone = sum(computed)
    computed.clear()
    assert torch.equal(solve_permutation(src, anchor, paired_rows(src, anchor, permutation.PREFIX_UNIT)), exact)
    if moved_share == 0:
        assert not computed
    elif moved_share < 0.5:
        assert 0 < sum(computed) < alone / 2
    else:
        assert sum(computed) == alone
