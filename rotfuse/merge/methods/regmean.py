"""RegMean (Jin et al. 2023): the closed-form merge of a linear layer from its input Gram matrices.

For a linear layer `y = x @ W.T` (torch layout `W [out, in]`) and model i's Gram matrix
`G_i = X_i.T @ X_i` of that layer's inputs, the merged weight minimises
`sum_i w_i ||X_i W.T - X_i W_i.T||^2`:

    W.T = (sum_i w_i G_i)^-1 (sum_i w_i G_i W_i.T)

GPT-2's Conv1D stores `W.T` (`[in, out]`) and is solved without transposing. Off-diagonal
shrinkage `G <- alpha G + (1 - alpha) diag(G)` is applied to each model's Gram (alpha = 0 reduces
RegMean to a per-input-column average weighted by each model's input energy).

Numerics (published code calls a float32 `torch.inverse`): everything is float64; the system is
solved with a Cholesky factorisation, never an explicit inverse; a small ridge
`RIDGE * mean(diag)` pulls directions no model's data reached towards the weighted simple average
(a plain ridge would pull them to zero); a system that is still not positive definite is
refused with the layer's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rotfuse.core.errors import InputError, UsageError
from rotfuse.merge.methods.base import StatsMethod

if TYPE_CHECKING:
    from rotfuse.merge.stats.folder import LinearInput, StatsFolder

RIDGE = 1e-6  # relative to the mean diagonal of the summed Gram matrix


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """`alpha * G + (1 - alpha) * diag(G)`: off-diagonal entries scaled by alpha, diagonal kept."""
    if alpha == 1.0:
        return gram
    shrunk = gram * alpha
    shrunk.diagonal().copy_(gram.diagonal())
    return shrunk


def _float64_gram(gram: torch.Tensor, alpha: float, device: str | torch.device) -> torch.Tensor:
    """Shrunk, float64 and exactly symmetric: a float32 `X^T X` is not quite, and the Cholesky
    factor (lower triangle) and the right-hand side (whole matrix) must see the same matrix."""
    gram = gram.to(device, torch.float64)
    return shrink((gram + gram.T) / 2, alpha)


@dataclass
class GramSystem:
    """The factorised left-hand side shared by every weight that reads the same input (q, k, v)."""

    grams: list[torch.Tensor]  # each model's Gram as given (shrunk and cast on use: memory)
    weights: list[float]
    alpha: float
    ridge: float
    factor: torch.Tensor  # Cholesky factor of sum_i w_i shrink(G_i) + ridge I, float64

    def solve(self, tensors: Sequence[torch.Tensor], layout: str = "out_in") -> torch.Tensor:
        """The merged weight, in the tensors' own layout (`out_in` or Conv1D `in_out`)."""
        rhs: torch.Tensor | None = None
        for gram, tensor, weight in zip(self.grams, tensors, self.weights, strict=True):
            w_t = tensor.to(self.factor.device, torch.float64)
            w_t = w_t if layout == "in_out" else w_t.T  # [in, out]
            term = (_float64_gram(gram, self.alpha, self.factor.device) @ w_t + self.ridge * w_t) * weight
            rhs = term if rhs is None else rhs.add_(term)
        assert rhs is not None
        solution = torch.cholesky_solve(rhs, self.factor)
        return solution if layout == "in_out" else solution.T


def prepare(
    grams: Sequence[torch.Tensor], weights: Sequence[float], alpha: float, name: str, device: str | torch.device = "cpu"
) -> GramSystem:
    """Shrink, weight, sum and factorise the models' Gram matrices of one layer input.

    `name` (the layer's weight) is only used in error messages.
    """
    total: torch.Tensor | None = None
    for gram, weight in zip(grams, weights, strict=True):
        term = _float64_gram(gram, alpha, device) * weight
        total = term if total is None else total.add_(term)
    assert total is not None
    if not bool(torch.isfinite(total).all()):
        raise InputError(f"RegMean: the Gram matrices of {name!r} hold NaN or Inf values")
    if not bool(total.any()):
        raise InputError(f"RegMean: the Gram matrices of {name!r} are zero (the layer never saw a nonzero input)")
    ridge = RIDGE * max(float(total.diagonal().mean()), 0.0)
    total.diagonal().add_(ridge * sum(weights))  # matches the ridge * sum_i w_i W_i.T in `solve`
    factor, info = torch.linalg.cholesky_ex(total)
    if int(info) != 0:
        raise InputError(
            f"RegMean: the Gram matrix of {name!r} is not positive definite even with a ridge of {ridge:.3g} "
            "(are the statistics corrupt? a smaller --alpha or more data may help)"
        )
    return GramSystem(list(grams), list(weights), alpha, ridge, factor)


def regmean_merge(
    tensors: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    weights: Sequence[float],
    alpha: float = 0.9,
    layout: str = "out_in",
    name: str = "weight",
) -> torch.Tensor:
    """Merge one linear weight (all models' tensors, same layout) from its input Gram matrices."""
    return prepare(grams, weights, alpha, name, tensors[0].device).solve(tensors, layout)


@dataclass(frozen=True)
class RegMeanSettings:
    alpha: float = 0.9  # scale of the Grams' off-diagonal entries (0: diagonal only)

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"--alpha {self.alpha}: must be between 0 and 1")


class RegMean(StatsMethod):
    """Linear weights by RegMean; every other tensor (biases, norms, embeddings) averaged. The
    factorised system of one input is kept while the weights reading it (q, k, v) are merged."""

    name = "regmean"
    summary = (
        "closed-form least-squares merge of every linear layer from its input Gram matrices; "
        "simple average for everything else"
    )
    stats = "regmean"
    Settings = RegMeanSettings

    def __init__(
        self,
        settings: RegMeanSettings,
        weights: Sequence[float],
        stats: Sequence[StatsFolder] = (),
        device: str = "cpu",
    ) -> None:
        super().__init__(settings, weights, stats, device)
        self._system_key: tuple[str, ...] | None = None
        self._system: GramSystem | None = None

    def has(self, stats: StatsFolder, name: str) -> bool:
        return stats.linear_input(name) is not None

    def group(self, name: str) -> str:
        return self._inputs(name)[0].gram

    def _inputs(self, name: str) -> list[LinearInput]:
        inputs = [folder.linear_input(name) for folder in self.folders]
        return [entry for entry in inputs if entry is not None]

    def merge(self, name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
        inputs = self._inputs(name)
        layout = inputs[0].layout
        if any(i.layout != layout for i in inputs) or tensors[0].dim() != 2:
            raise InputError(
                f"RegMean: the statistics disagree on how {name!r} is stored (layouts "
                f"{sorted({i.layout for i in inputs})}) or it is not a matrix"
            )
        key = tuple(i.gram for i in inputs)
        if key != self._system_key:
            self._system = None  # free the previous input's Grams before reading the next
            dim = tensors[0].shape[1 if layout == "out_in" else 0]
            grams = []
            for folder, gram_name in zip(self.folders, key, strict=True):
                gram = folder.get(gram_name)
                if tuple(gram.shape) != (dim, dim):
                    raise InputError(
                        f"{folder.folder}: Gram {gram_name!r} is {list(gram.shape)}, but "
                        f"{name!r} ({layout}) reads {dim} inputs"
                    )
                grams.append(gram)
            self._system = prepare(grams, self.weights, self.settings.alpha, name, self.device)
            self._system_key = key
        assert self._system is not None
        return self._system.solve(tensors, layout)
