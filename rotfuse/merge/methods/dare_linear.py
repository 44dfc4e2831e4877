"""DARE (Yu et al. 2024) with a linear combination: drop, rescale, task arithmetic.

Each task-vector entry is kept with probability `density` and the kept ones multiplied by
1/density; then `base + scale * sum_i w_i dare(delta_i)`, as task arithmetic. The drop mask is
drawn on the CPU from a generator seeded by (`--seed`, tensor name, model index): the same seed
gives the same checkpoint whatever the device, thread count or tensor order.

mergekit's `dare_linear` draws from the global RNG (no seed) and rescales by the L1 norm ratio
(`rescale: true`) rather than by 1/density; otherwise (weights as given, `normalize: false`,
`lambda` is `--scale`) it is this. The default density 0.1 is the DARE paper's drop rate 0.9
(mergekit's default 1.0 drops nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rotfuse.merge.methods.base import TaskVectorMethod
from rotfuse.merge.methods.task_vectors import check_density, check_scale, check_seed, dropped, linear_combine


@dataclass(frozen=True)
class DareLinearSettings:
    density: float = 0.1  # probability of keeping each task-vector entry (1 - DARE's drop rate)
    scale: float = 1.0  # lambda: multiplies the combined task vector
    seed: int = 0  # drop masks: one CPU stream per (seed, tensor, model)

    def validate(self) -> None:
        check_density(self.density)
        check_scale(self.scale)
        check_seed(self.seed)


class DareLinear(TaskVectorMethod):
    name = "dare-linear"
    summary = "DARE: drop task-vector entries at random, rescale by 1/density, add the weighted sum"
    Settings = DareLinearSettings

    def combine(self, name: str, vectors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        return linear_combine(dropped(vectors, self.settings.density, self.settings.seed, name), self.weights)
