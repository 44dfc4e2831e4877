"""`leading_mask` against the sort it follows: the first k entries of torch's CPU argsort.

Every expected mask comes from `torch.argsort(descending=True)` itself, on arrays built so that
entries tied in value straddle place k (as in 16-bit task vectors), across sizes that end in the
insertion sort, in one partition and in many."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from rotfuse.merge.methods import task_vectors
from rotfuse.merge.methods.sort_order import INSERTION_THRESHOLD, follows_torch_sort, leading_mask
from rotfuse.merge.methods.task_vectors import magnitude_mask

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's CPU sort is libstdc++'s there")


def _argsort_mask(keys: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(keys.numel(), dtype=torch.bool)
    mask[torch.argsort(keys, descending=True)[:k]] = True
    return mask


def _tied(size: int, levels: int, seed: int) -> torch.Tensor:
    generator = np.random.default_rng(seed)
    return torch.from_numpy(generator.integers(0, levels, size).astype(np.float32) * 0.25)


@linux_only
def test_the_self_check_finds_libstdcxx_introsort_here() -> None:
    # the fast path is on where CI runs (Linux x86 wheels); were torch's sort to change, this says so
    assert follows_torch_sort()


@linux_only
@pytest.mark.parametrize("size", [1, 2, INSERTION_THRESHOLD, INSERTION_THRESHOLD + 1, 100, 5_000, 150_000, 700_000])
@pytest.mark.parametrize("levels", [1, 2, 7, 300])
def test_leading_mask_is_argsorts_first_k(size: int, levels: int) -> None:
    keys = _tied(size, levels, seed=size * 31 + levels)
    for k in sorted({1, max(1, size // 5), max(1, size // 2), max(1, size - 1), size}):
        expected = _argsort_mask(keys, k)
        got = leading_mask(keys.clone(), k)
        assert got is not None and torch.equal(got, expected), (size, levels, k)


@linux_only
def test_leading_mask_on_bfloat16_task_vectors() -> None:
    # magnitudes of the difference of two bfloat16 tensors: few distinct values, ties at every k
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(1_200_000, generator=generator).bfloat16()
    tuned = (base.float() + 0.01 * torch.randn(base.shape, generator=generator)).bfloat16()
    keys = (tuned.float() - base.float()).abs()
    for density in (0.1, 0.2, 0.53):
        k = int(density * keys.numel())
        threshold = keys.kthvalue(keys.numel() - k + 1).values
        assert int((keys > threshold).sum()) < k < int((keys >= threshold).sum())  # ties straddle k
        assert torch.equal(leading_mask(keys.clone(), k), _argsort_mask(keys, k))


def test_the_choice_among_ties_is_the_sorts_not_the_first_by_index() -> None:
    # why the sort's own path is followed: keeping the tied entries of lowest index -- what a stable
    # sort would keep -- differs from what torch's sort keeps (and so from mergekit's result)
    keys = _tied(50_000, 5, seed=3)
    k = 20_000
    stable = torch.zeros(keys.numel(), dtype=torch.bool)
    stable[torch.argsort(keys, descending=True, stable=True)[:k]] = True
    assert not torch.equal(stable, _argsort_mask(keys, k))


@linux_only
def test_leading_mask_reuses_its_buffer_across_sizes() -> None:
    for size in (300_000, 1_000, 500_000, 20):  # the thread's position buffer grows and is sliced
        keys = _tied(size, 9, seed=size)
        k = size // 3 + 1
        assert torch.equal(leading_mask(keys.clone(), k), _argsort_mask(keys, k))


def test_magnitude_mask_falls_back_to_the_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    # where the self-check fails (another platform's sort) or NaN is present, the sort decides
    values = (torch.randn(20_000, generator=torch.Generator().manual_seed(8)) * 8).round() / 8
    k = int(0.3 * values.numel())
    expected = _argsort_mask(values.abs(), k)
    monkeypatch.setattr(task_vectors, "follows_torch_sort", lambda: False)
    assert torch.equal(magnitude_mask(values, 0.3), expected)
    assert torch.equal(magnitude_mask(values, 0.3, ties_likely=True), expected)
    monkeypatch.undo()
    with_nan = values.clone()
    with_nan[[3, 70]] = float("nan")
    assert torch.equal(magnitude_mask(with_nan, 0.3), _argsort_mask(with_nan.abs(), k))


@linux_only
def test_magnitude_mask_of_a_float64_task_vector() -> None:
    # float32 checkpoints: task vectors in float64, ranked as float32 magnitudes (rounding makes ties)
    delta = torch.randn(90_000, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 1e-3
    delta[7::7] = delta[: len(delta) - 7 : 7]  # exact repeats as well
    k = int(0.2 * delta.numel())
    assert torch.equal(magnitude_mask(delta, 0.2), _argsort_mask(delta.abs().float(), k))
