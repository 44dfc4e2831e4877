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

from dataclasses import dataclass

import torch

from rotfuse.merge.methods.base import TaskVectorMethod
from rotfuse.merge.methods.task_vectors import check_density, check_scale, check_seed, dare_masks, ties_combine


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


class DareTies(TaskVectorMethod):
    name = "dare-ties"
    summary = "DARE drop and rescale, then TIES sign election over the task vectors"
    Settings = DareTiesSettings

    def combine(self, name: str, vectors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        density = self.settings.density
        masks = dare_masks(vectors, density, self.settings.seed, name)
        return ties_combine(vectors, self.weights, self.settings.normalize, masks, rescale=density)
