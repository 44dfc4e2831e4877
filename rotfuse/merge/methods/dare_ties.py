"""DARE (Yu et al. 2024) with TIES's sign election: drop, rescale, elect, merge.

Each task-vector entry is kept with probability `density` and rescaled by 1/density (the drop
mask as in dare_linear.py: seeded per tensor and model, on the CPU); the parameters' signs are
then elected and the agreeing entries summed as in TIES -- by default without dividing by the
agreeing weights (mergekit's `dare_ties` default, `normalize: false`); `--normalize` divides,
as TIES does. Then `base + scale * merged`.

Differences from mergekit's `dare_ties`: the seeded mask and the 1/density rescale (mergekit
matches L1 norms); the default density 0.1 (the DARE paper's drop rate 0.9; mergekit's 1.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rotfuse.merge.methods.base import MergeMethod
from rotfuse.merge.methods.dare_linear import check_seed
from rotfuse.merge.methods.task_vectors import (
    add_back,
    check_density,
    check_scale,
    dare,
    deltas,
    task_weights,
    ties_combine,
)


@dataclass(frozen=True)
class DareTiesSettings:
    density: float = 0.1  # probability of keeping each task-vector entry (1 - DARE's drop rate)
    scale: float = 1.0  # lambda: multiplies the merged task vector
    seed: int = 0  # drop masks: one CPU stream per (seed, tensor, model)
    normalize: bool = False  # divide by the agreeing models' weight sum (TIES's disjoint mean)

    def validate(self) -> None:
        check_density(self.density)
        check_scale(self.scale)
        check_seed(self.seed)


class DareTies(MergeMethod):
    name = "dare-ties"
    summary = "DARE drop and rescale, then TIES sign election over the task vectors"
    needs_base = True
    min_models = 1
    Settings = DareTiesSettings

    @classmethod
    def normalise(cls, weights: Sequence[float] | None, count: int) -> list[float]:
        return task_weights(weights, count)

    def merge(self, name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
        assert base is not None
        origin, vectors = deltas(tensors, base)
        settings = self.settings
        dropped = [dare(vector, settings.density, settings.seed, name, index) for index, vector in enumerate(vectors)]
        return add_back(origin, ties_combine(dropped, self.weights, settings.normalize), settings.scale)
