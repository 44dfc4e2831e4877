"""FFN-like neuron rows of two models for the assignment tests: random rows of unit scale, the
source an unrelated model, a noisy scrambled copy of the anchor (a relative) or rows of norms
over two decades."""

from __future__ import annotations

import torch


def model_rows(kind: str, n: int, width: int, seed: int, noise: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, anchor) rows: `kind` "unrelated", "related" (the anchor's rows shuffled, plus
    `noise` times fresh ones) or "scaled" (unrelated rows, norms from 0.1 to 10)."""
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn(n, width, generator=g) / width**0.5
    src = torch.randn(n, width, generator=g) / width**0.5
    if kind == "related":
        src = anchor[torch.randperm(n, generator=g)] + noise * src
    elif kind == "scaled":  # rows of very different norms: the bound is per entry
        src = src * torch.logspace(-1, 1, n)[torch.randperm(n, generator=g), None]
    return src, anchor


def exact_scores(src: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """The matrix the assignment paths certify on: float64 scores rounded to float32."""
    return (src.double() @ anchor.double().T).float()


def optimum_total(scores: torch.Tensor) -> float:
    """The largest total an assignment reaches on `scores` (scipy's dense Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(scores.numpy(), maximize=True)
    return float(scores.double()[rows, cols].sum())


def assignment_total(scores: torch.Tensor, perm: torch.Tensor) -> float:
    """The total of `perm` (perm[j] = the row at column j) on `scores`."""
    return float(scores.double()[perm, torch.arange(len(perm))].sum())
