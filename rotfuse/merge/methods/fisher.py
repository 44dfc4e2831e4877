"""Fisher merging (Matena & Raffel 2022): a per-parameter average weighted by diagonal Fishers.

    theta = sum_j w_j max(F_j, eps) theta_j / sum_j w_j max(F_j, eps)

`F_j` is model j's diagonal Fisher, `w_j` the per-model weights (`--weights`, normalised).

The estimator (rotfuse/merge/stats/collect.py): the mean over examples of per-example squared gradients of
log p(y|x), y sampled from the model's own prediction (or the data's label with --labels data).
Per-example squares are the faithful diagonal; squaring a batch gradient, as the RegMean
reference code does, adds cross terms between examples.

Normalisation (`--fisher-normalize`, off by default): `F_j / ||F_j||`, the global L2 norm over
all of model j's statistics (FusionBench's normalize_fisher_weight). Off by default because the
plain form is the paper's (the mode of a product of Laplace posteriors) and, with Fishers that are
means over examples, models of one task fitted to similar data are on one scale already. Turn it
on when they are not (different tasks, a confident model next to an uncertain one): otherwise the
model with the larger Fisher wins almost every parameter.

The floor `eps` (`--fisher-floor`) is applied to every model alike, after normalisation (the
original code can favour the first model instead): a parameter without signal in any model falls
back to the `w`-weighted simple average, and one whose Fisher is zero in one model takes the
others' values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rotfuse.core.errors import InputError, UsageError
from rotfuse.core.tensors import weighted_average
from rotfuse.merge.methods.base import StatsMethod

if TYPE_CHECKING:
    from rotfuse.merge.stats.folder import StatsFolder


def fisher_average(
    tensors: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], weights: Sequence[float], floor: float
) -> torch.Tensor:
    """Fisher-weighted average of one parameter, in float64.

    Elements where every model's (floored) Fisher is zero -- possible only with `floor` 0 --
    take the weighted simple average instead of 0/0.
    """
    numerator = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    denominator = torch.zeros_like(numerator)
    for tensor, fisher, weight in zip(tensors, fishers, weights, strict=True):
        importance = fisher.to(numerator.device, torch.float64).clamp_min(floor) * weight
        numerator.addcmul_(importance, tensor.to(numerator.device, torch.float64))
        denominator.add_(importance)
    empty = denominator == 0
    if bool(empty.any()):
        fallback = weighted_average(tensors, weights)
        return torch.where(empty, fallback, numerator / denominator.masked_fill(empty, 1.0))
    return numerator / denominator


@dataclass(frozen=True)
class FisherSettings:
    fisher_floor: float = 1e-6  # lower bound on every model's Fisher (after normalisation)
    fisher_normalize: bool = False  # divide each model's Fisher by its global L2 norm first

    def validate(self) -> None:
        if not (math.isfinite(self.fisher_floor) and self.fisher_floor >= 0.0):
            raise UsageError(f"--fisher-floor {self.fisher_floor}: must be finite and >= 0")


class Fisher(StatsMethod):
    name = "fisher"
    summary = "per-parameter average weighted by each model's diagonal Fisher"
    stats = "fisher"
    Settings = FisherSettings

    def __init__(
        self, settings: FisherSettings, weights: Sequence[float], stats: Sequence[StatsFolder] = (), device: str = "cpu"
    ) -> None:
        super().__init__(settings, weights, stats, device)
        self.scales = [1.0] * len(self.folders)
        if settings.fisher_normalize:
            for index, folder in enumerate(self.folders):
                squares = folder.squared_norm()
                if squares <= 0:
                    raise InputError(
                        f"{folder.folder}: the Fisher is zero everywhere; --fisher-normalize cannot scale it"
                    )
                self.scales[index] = 1.0 / squares**0.5

    def has(self, stats: StatsFolder, name: str) -> bool:
        return stats.has(name)

    def merge(self, name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
        fishers = [folder.get(name) * scale for folder, scale in zip(self.folders, self.scales, strict=True)]
        for folder, fisher in zip(self.folders, fishers, strict=True):
            if fisher.shape != tensors[0].shape:
                raise InputError(
                    f"{folder.folder}: Fisher {name!r} has shape {list(fisher.shape)}, "
                    f"the tensor {list(tensors[0].shape)}"
                )
        return fisher_average(tensors, fishers, self.weights, self.settings.fisher_floor)
