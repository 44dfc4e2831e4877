"""Column potentials in the FFN permutation's row-bests certificate (`distance_potentials`): rows of
uneven norms -- a trained model's neurons -- settle on the short prefix that rows of equal norms
settle on, and with any potentials the passes give the exact optimum or step aside, whichever GEMM
bounds their prefixes."""

from __future__ import annotations

import pytest
import torch
from helpers.rows import assignment_total, exact_scores, optimum_total

from rotfuse.symmetry import permutation
from rotfuse.symmetry.integer_scores import int8_gemm_available
from rotfuse.symmetry.permutation import (
    GIVE_UP_FROM,
    PREFIXES,
    _PrefixBounds,
    bounded_row_bests,
    distance_potentials,
    first_prefix,
    row_norms,
    solve_permutation,
)


@pytest.fixture(params=["float32", "int8", "bfloat16"])
def prefix_gemm(request, monkeypatch) -> str:
    """Each GEMM the prefix passes can bound their scores with, whatever the CPU (a bfloat16 GEMM
    accumulates in float32 on any CPU; int8 on any size of pass)."""
    mode = request.param
    if mode == "int8" and not int8_gemm_available():
        pytest.skip("torch without fbgemm's quantized ops")
    monkeypatch.setattr(permutation, "fast_bfloat16_gemm", lambda device: mode == "bfloat16")
    if mode == "float32":
        monkeypatch.setattr(permutation, "int8_gemm_available", lambda: False)
    monkeypatch.setattr(permutation, "INT8_MIN_PRODUCTS", 0)
    assert permutation.prefix_gemm(torch.device("cpu")) == mode
    return mode


def uneven_rows(n: int, width: int, seed: int, spread: float = 0.4, noise: float = 0.5):
    """(source, anchor, order): anchor rows with log-normal norms (sigma `spread`: 0.4 spans a
    factor ~6 between the 1st and 99th percentiles, as MiniLM's neurons do), and a fine-tune of
    them -- `noise` relative to each row's norm -- with its rows in `order`."""
    g = torch.Generator().manual_seed(seed)
    norms = torch.exp(spread * torch.randn(n, 1, generator=g))
    anchor = torch.randn(n, width, generator=g) / width**0.5 * norms
    src = anchor + noise * torch.randn(n, width, generator=g) / width**0.5 * norms
    order = torch.randperm(n, generator=g)
    return src[order], anchor, order


def test_distance_potentials_are_half_the_squared_norms_at_the_rows_scale():
    g = torch.Generator().manual_seed(1)
    anchor = torch.randn(300, 64, generator=g) * torch.logspace(-1, 1, 300)[:, None]
    norm = row_norms(anchor)
    src = 3 * anchor[torch.randperm(300, generator=g)]
    # the scale comes from a sample of rows, which a shuffled copy need not share: near 3, not 3
    potential = distance_potentials(src, anchor, norm)
    assert torch.allclose(potential / norm.square(), potential[0] / norm[0].square())
    assert 0.5 < float(potential[0] / norm[0].square()) < 5
    same = distance_potentials(3 * anchor, anchor, norm)
    assert torch.allclose(same, 1.5 * norm.square(), rtol=1e-5)
    assert not bool(distance_potentials(torch.zeros_like(anchor), anchor, norm).any())
    assert not bool(distance_potentials(anchor, torch.zeros_like(anchor), torch.zeros(300)).any())


def test_uneven_norms_settle_on_a_short_prefix_with_the_potentials_and_not_without(prefix_gemm):
    """Without potentials a row's bound against a neuron of large norm stays above its own score
    until most of the columns are in: the passes give up where the potentials settle every row."""
    src, anchor, order = uneven_rows(1100, 512, seed=2, noise=0.3)
    first = first_prefix(src, anchor)
    assert first is not None and PREFIXES[first] <= GIVE_UP_FROM
    best = bounded_row_bests(src, anchor, first)
    assert best is not None and torch.equal(best, order)  # each row's own anchor row, the optimum
    exact = exact_scores(src, anchor)
    assert assignment_total(exact, solve_permutation(src, anchor)) == optimum_total(exact)
    plain = _PrefixBounds(anchor, row_norms(anchor))  # v = 0
    assert bounded_row_bests(src, anchor, first, plain) is None
    assert first_prefix(src, anchor, plain) is None


@pytest.mark.parametrize("kind", ["zero", "distance", "random", "huge"])
def test_with_any_potentials_the_passes_give_the_optimum_or_step_aside(kind, prefix_gemm):
    """LP duality holds for every v: the bests against v, when distinct, are the optimum -- each
    row's argmax of x . y - v in float64, none guessed -- or the passes say None. Potentials far
    larger than the scores (every row then wants the same few columns) make them step aside."""
    src, anchor, _ = uneven_rows(1100, 256, seed=3, noise=0.3)
    norm = row_norms(anchor)
    g = torch.Generator().manual_seed(4)
    potential = {
        "zero": torch.zeros_like(norm),
        "distance": distance_potentials(src, anchor, norm),
        "random": distance_potentials(src, anchor, norm) * (1 + 0.03 * torch.randn(len(norm), generator=g)),
        "huge": 1e3 * torch.rand(len(norm), generator=g) * norm.square(),
    }[kind]
    best = bounded_row_bests(src, anchor, 0, _PrefixBounds(anchor, norm, potential))
    if kind == "huge":
        assert best is None
        return
    if best is None:
        assert kind == "zero", "the distance potentials, and mild random ones, settle these rows"
        return
    against = src.double() @ anchor.double().T - potential.double()
    assert torch.equal(best, against.argmax(dim=1))
    exact = exact_scores(src, anchor)
    assert assignment_total(exact, torch.argsort(best)) == optimum_total(exact)


def test_rows_far_smaller_than_the_anchors_are_solved_exactly(prefix_gemm):
    """A few source rows at 1e-4 of their partners' norms: their scores are far below the
    potentials, which then decide their bests (in float32, within POTENTIAL_ROUNDING); colliding,
    they send the solve down the full GEMM's path, whose optimum is the exact one."""
    src, anchor, _ = uneven_rows(1100, 256, seed=5, noise=0.2)
    src[:6] *= 1e-4
    exact = exact_scores(src, anchor)
    assert assignment_total(exact, solve_permutation(src, anchor)) == optimum_total(exact)


def _one_pass(bounds: _PrefixBounds, src: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first pass of `bounded_row_bests` over the prefix [0, upto), in the bounds' mode."""
    norm = row_norms(src)
    if bounds.mode == "bfloat16":
        return bounds.settle(src, norm, upto)
    if bounds.mode == "int8":
        settled, pick, _ = bounds.integer_pass(src, norm, upto)
        return settled, pick
    scores = src[:, :upto] @ bounds.anchor[:, :upto].T
    return permutation._prefix_pass(src, bounds.anchor, upto, scores, norm, bounds)


def test_a_pass_settles_a_row_only_on_its_best_against_the_potentials(prefix_gemm):
    """Each pass settles a row only on its argmax of x . y - v (float64), whatever v: the
    potential comes off the candidate's score as off every bound. Potentials a few times the
    distance ones leave many rows' prefix candidates wrong -- a pass that took v off the bounds
    alone would settle a third of them."""
    src, anchor, _ = uneven_rows(1100, 256, seed=6, noise=0.6)
    norm = row_norms(anchor)
    distance = distance_potentials(src, anchor, norm)
    g = torch.Generator().manual_seed(7)
    settled_any = 0
    for potential in (distance, 2 * distance, 4 * distance, distance * (1 + 0.5 * torch.randn(len(norm), generator=g))):
        want = (src.double() @ anchor.double().T - potential.double()).argmax(dim=1)
        for upto in (32, 64):
            settled, pick = _one_pass(_PrefixBounds(anchor, norm, potential), src, upto)
            assert torch.equal(pick[settled], want[settled])
            settled_any += int(settled.sum())
    assert settled_any > 100, "the case is meant to settle rows"


def minilm_fine_tune(minilm_dir, layer: int, noise: float, seed: int):
    """(source, anchor, order): a real model's FFN rows (MiniLM's neurons: norms over a factor 2-6)
    and a scrambled fine-tune of them, `noise` relative to each row's norm."""
    from safetensors.torch import load_file

    weights = load_file(str(minilm_dir / "model.safetensors"))
    prefix = next(k for k in weights if f"layer.{layer}.intermediate.dense.weight" in k).rsplit(".", 1)[0]
    up, bias = weights[prefix + ".weight"].float(), weights[prefix + ".bias"].float()
    down = weights[prefix.replace("intermediate", "output") + ".weight"].float()
    anchor = torch.cat([up, bias[:, None], down.T], 1)
    g = torch.Generator().manual_seed(seed)
    fresh = torch.randn(anchor.shape, generator=g) / anchor.shape[1] ** 0.5
    order = torch.randperm(len(anchor), generator=g)
    return (anchor + noise * fresh * anchor.norm(dim=1, keepdim=True))[order], anchor, order


@pytest.mark.parametrize("noise", [0.05, 0.5])
def test_a_real_models_fine_tune_settles_on_its_prefixes(minilm_dir, noise, prefix_gemm):
    """MiniLM's neurons, scrambled, +5 % and +50 % noise: before the potentials no prefix settled
    them (every solve took the full GEMM); now the passes do -- the last near-ties scored over
    every column -- and give the optimum."""
    src, anchor, order = minilm_fine_tune(minilm_dir, 0, noise, seed=8)
    assert first_prefix(src, anchor, _PrefixBounds(anchor, row_norms(anchor))) is None  # v = 0
    first = first_prefix(src, anchor)
    assert first is not None
    best = bounded_row_bests(src, anchor, first)
    assert best is not None and torch.equal(best, order)
    exact = exact_scores(src, anchor)
    assert assignment_total(exact, solve_permutation(src, anchor)) == optimum_total(exact)


def test_the_full_scores_certificate_takes_the_potentials(minilm_dir, monkeypatch):
    """Where the passes give up and the full GEMM decides, its rows' bests against the potentials
    are tried before their largest scores: on a real fine-tune whose largest scores collide, the
    optimum without the sparse solve or scipy's Hungarian."""
    src, anchor, order = minilm_fine_tune(minilm_dir, 1, 0.5, seed=9)
    scores = src @ anchor.T
    assert torch.unique(scores.argmax(dim=1)).numel() < len(src), "the case is meant to collide"
    potential = distance_potentials(src, anchor, row_norms(anchor))

    def no_slow_path(*args, **kwargs):
        raise AssertionError("the potentials' certificate should have settled it")

    monkeypatch.setattr(permutation, "certified_sparse_assignment", no_slow_path)
    perm = permutation.best_assignment(scores, potential)
    assert assignment_total(scores, perm) == optimum_total(scores)
    assert torch.equal(perm, order.argsort())
