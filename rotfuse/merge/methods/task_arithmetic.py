"""Task arithmetic (Ilharco et al. 2023): add weighted task vectors to their base.

    theta = base + scale * sum_i w_i (theta_i - base)

`w_i` are `--weights` as given -- not normalised, negatives allowed (a negative weight subtracts
a task), 1.0 each by default -- and `scale` is the paper's lambda (`--scale`). This is mergekit's
`task_arithmetic` (its `normalize: false` default; `lambda` is `--scale`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rotfuse.merge.methods.base import MergeMethod
from rotfuse.merge.methods.task_vectors import add_back, check_scale, deltas, linear_combine, task_weights


@dataclass(frozen=True)
class TaskArithmeticSettings:
    scale: float = 1.0  # lambda: multiplies the combined task vector

    def validate(self) -> None:
        check_scale(self.scale)


class TaskArithmetic(MergeMethod):
    name = "task-arithmetic"
    summary = "base + scale * sum of weighted task vectors (fine-tune minus base)"
    needs_base = True
    min_models = 1
    Settings = TaskArithmeticSettings

    @classmethod
    def normalise(cls, weights: Sequence[float] | None, count: int) -> list[float]:
        return task_weights(weights, count)

    def merge(self, name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
        assert base is not None
        origin, vectors = deltas(tensors, base)
        return add_back(origin, linear_combine(vectors, self.weights), self.settings.scale)
