"""The merge methods as pure functions on tensors: simple, Fisher and RegMean.

Every expected value is computed here independently of rotfuse (plain arithmetic, or
torch.linalg.lstsq for RegMean's least-squares problem).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rotfuse.core.errors import InputError, UsageError
from rotfuse.merge.methods import REGISTRY, method_class
from rotfuse.merge.methods.base import normalise_weights
from rotfuse.merge.methods.fisher import fisher_average
from rotfuse.merge.methods.regmean import prepare, regmean_merge, shrink
from rotfuse.merge.methods.simple import weighted_average

seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------- simple


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_simple_average_of_one_tensor_with_itself_is_exact(dtype: torch.dtype) -> None:
    x = _randn(7, 5, seed=1, dtype=dtype) * 100
    for weights in ([0.5, 0.3, 0.2], [1 / 3] * 3, [0.9, 0.05, 0.05]):
        merged = weighted_average([x, x, x], weights).to(dtype)
        assert torch.equal(merged, x)


def test_simple_average_respects_weights() -> None:
    a, b = _randn(4, 6, seed=2), _randn(4, 6, seed=3)
    merged = weighted_average([a, b], normalise_weights([1, 3], 2))
    torch.testing.assert_close(merged, (0.25 * a.double() + 0.75 * b.double()), rtol=0, atol=1e-12)


def test_weights_are_normalised_and_validated() -> None:
    assert normalise_weights(None, 4) == [0.25] * 4
    assert normalise_weights([2, 6], 2) == [0.25, 0.75]
    for bad in ([1.0], [1.0, -1.0], [0.0, 0.0], [float("nan"), 1.0]):
        with pytest.raises(UsageError):
            normalise_weights(bad, 2)


def test_registry_names_the_statistics_each_method_needs() -> None:
    stats = {name: method_class(name).stats for name in REGISTRY}
    assert {name: stats[name] for name in ("simple", "fisher", "regmean")} == {
        "simple": None,
        "fisher": "fisher",
        "regmean": "regmean",
    }
    assert all(method_class(name).name == name for name in REGISTRY)
    with pytest.raises(UsageError, match="unknown merge method"):
        method_class("no-such-method")


# ---------------------------------------------------------------------- Fisher


@settings(max_examples=25, deadline=None)
@given(seed=seeds, count=st.integers(2, 4))
def test_fisher_with_equal_fishers_is_the_simple_average(seed: int, count: int) -> None:
    tensors = [_randn(3, 5, seed=seed + i) for i in range(count)]
    fisher = _randn(3, 5, seed=seed + 99).abs() + 1e-3
    weights = normalise_weights([1.0 + i for i in range(count)], count)
    merged = fisher_average(tensors, [fisher] * count, weights, floor=1e-6)
    torch.testing.assert_close(merged, weighted_average(tensors, weights), rtol=1e-12, atol=1e-12)


def test_fisher_zero_in_one_model_takes_the_other_models_value() -> None:
    a, b = _randn(6, seed=4), _randn(6, seed=5)
    fisher_a = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    fisher_b = torch.tensor([2.0, 3.0, 4.0, 0.0, 0.0, 0.0])
    merged = fisher_average([a, b], [fisher_a, fisher_b], [0.5, 0.5], floor=1e-10)
    expected = torch.cat([b[:3], a[3:]]).double()
    torch.testing.assert_close(merged, expected, rtol=1e-8, atol=1e-8)


def test_fisher_general_formula() -> None:
    a, b = _randn(5, seed=6), _randn(5, seed=7)
    fa, fb = _randn(5, seed=8).abs() + 0.1, _randn(5, seed=9).abs() + 0.1
    merged = fisher_average([a, b], [fa, fb], [0.3, 0.7], floor=0.0)
    fa, fb, a, b = (t.double() for t in (fa, fb, a, b))
    torch.testing.assert_close(merged, (0.3 * fa * a + 0.7 * fb * b) / (0.3 * fa + 0.7 * fb))


def test_fisher_floor() -> None:
    a, b = _randn(4, seed=10), _randn(4, seed=11)
    average = weighted_average([a, b], [0.25, 0.75])
    tiny = torch.full((4,), 1e-9)
    # both below the floor: the floor is all that weighs, so the weighted simple average
    torch.testing.assert_close(fisher_average([a, b], [tiny, 3 * tiny], [0.25, 0.75], floor=1e-6), average)
    # no floor and no signal anywhere: still the weighted average, never 0/0
    zero = torch.zeros(4)
    merged = fisher_average([a, b], [zero, zero], [0.25, 0.75], floor=0.0)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, average)
    # a floor far above the Fishers drowns them: back to the simple average
    strong = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(
        fisher_average([a, b], [strong, zero], [0.25, 0.75], floor=1e9), average, rtol=1e-7, atol=1e-7
    )
    # a floor below the Fishers leaves them alone
    assert not torch.allclose(fisher_average([a, b], [strong, 2 * strong.flip(0)], [0.25, 0.75], floor=1e-6), average)


# ---------------------------------------------------------------------- RegMean


def _least_squares(xs: list[torch.Tensor], ws: list[torch.Tensor], model_weights: list[float]) -> torch.Tensor:
    """argmin_W sum_i c_i ||X_i W^T - X_i W_i^T||^2, solved by lstsq on the stacked system."""
    lhs = torch.cat([c**0.5 * x.double() for x, c in zip(xs, model_weights)])
    rhs = torch.cat([c**0.5 * x.double() @ w.double().T for x, w, c in zip(xs, ws, model_weights)])
    return torch.linalg.lstsq(lhs, rhs).solution.T


@settings(max_examples=15, deadline=None)
@given(seed=seeds, count=st.integers(2, 3))
def test_regmean_is_the_least_squares_solution(seed: int, count: int) -> None:
    d_in, d_out = 6, 4
    xs = [_randn(20 + 3 * i, d_in, seed=seed + i) * (1 + i) for i in range(count)]
    ws = [_randn(d_out, d_in, seed=seed + 10 + i) for i in range(count)]
    weights = normalise_weights([1.0 + 2 * i for i in range(count)], count)
    grams = [x.T @ x for x in xs]
    merged = regmean_merge(ws, grams, weights, alpha=1.0, layout="out_in")
    expected = _least_squares(xs, ws, weights)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)

    # it is a better fit than the simple average, which it only equals by accident
    def loss(w: torch.Tensor) -> float:
        return sum(
            c * float((x.double() @ (w.double() - wi.double()).T).pow(2).sum()) for x, wi, c in zip(xs, ws, weights)
        )

    assert loss(merged) <= loss(weighted_average(ws, weights)) + 1e-9


def test_regmean_conv1d_layout_is_the_transpose() -> None:
    xs = [_randn(30, 5, seed=20), _randn(25, 5, seed=21)]
    ws = [_randn(3, 5, seed=22), _randn(3, 5, seed=23)]  # torch layout [out, in]
    grams = [x.T @ x for x in xs]
    linear = regmean_merge(ws, grams, [0.5, 0.5], alpha=1.0, layout="out_in")
    conv1d = regmean_merge([w.T.contiguous() for w in ws], grams, [0.5, 0.5], alpha=1.0, layout="in_out")
    assert conv1d.shape == (5, 3)
    torch.testing.assert_close(conv1d.T, linear, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(linear, _least_squares(xs, ws, [0.5, 0.5]), rtol=1e-4, atol=1e-5)


def test_regmean_alpha_zero_is_a_per_column_weighted_average() -> None:
    xs = [_randn(40, 4, seed=30) * torch.tensor([1.0, 5.0, 0.2, 2.0]), _randn(40, 4, seed=31)]
    ws = [_randn(3, 4, seed=32), _randn(3, 4, seed=33)]
    grams = [x.T @ x for x in xs]
    merged = regmean_merge(ws, grams, [0.5, 0.5], alpha=0.0)
    energy = [g.diagonal().double() for g in grams]  # input column j's energy in each model
    expected = (ws[0].double() * energy[0] + ws[1].double() * energy[1]) / (energy[0] + energy[1])
    # the only difference is the ridge (1e-6 of the mean diagonal), felt most by the weak column 2
    torch.testing.assert_close(merged, expected, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(merged, weighted_average(ws, [0.5, 0.5]), rtol=1e-2)


def test_shrink_scales_only_off_diagonal_entries() -> None:
    gram = torch.tensor([[4.0, 2.0], [2.0, 9.0]])
    assert torch.equal(shrink(gram, 0.25), torch.tensor([[4.0, 0.5], [0.5, 9.0]]))
    assert shrink(gram, 1.0) is gram


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_regmean_of_identical_models_is_the_model(alpha: float) -> None:
    w = _randn(5, 7, seed=40)
    grams = [(x := _randn(12, 7, seed=41 + i)).T @ x for i in range(3)]
    merged = regmean_merge([w, w, w], grams, [0.2, 0.3, 0.5], alpha=alpha)
    torch.testing.assert_close(merged, w.double(), rtol=1e-9, atol=1e-9)


def test_regmean_with_too_few_rows_falls_back_to_the_average_on_unseen_inputs() -> None:
    """Inputs that no model ever saw carry no information: those columns get the average."""
    x = torch.zeros(10, 4)
    x[:, :2] = _randn(10, 2, seed=50)  # inputs 2 and 3 are always zero
    ws = [_randn(3, 4, seed=51), _randn(3, 4, seed=52)]
    merged = regmean_merge(ws, [x.T @ x, x.T @ x], [0.5, 0.5], alpha=1.0)
    torch.testing.assert_close(merged[:, 2:], weighted_average(ws, [0.5, 0.5])[:, 2:], rtol=1e-6, atol=1e-6)


def test_regmean_refuses_bad_grams_naming_the_layer() -> None:
    name = "encoder.layer.3.attention.self.query.weight"
    with pytest.raises(InputError, match=r"layer\.3\.attention.*zero"):
        prepare([torch.zeros(3, 3), torch.zeros(3, 3)], [0.5, 0.5], 1.0, name)
    with pytest.raises(InputError, match=r"layer\.3.*NaN"):
        prepare([torch.full((3, 3), float("nan")), torch.eye(3)], [0.5, 0.5], 1.0, name)
    indefinite = torch.tensor([[1.0, 0.0], [0.0, -5.0]])
    with pytest.raises(InputError, match=r"layer\.3.*not positive definite"):
        prepare([indefinite, indefinite], [0.5, 0.5], 1.0, name)
