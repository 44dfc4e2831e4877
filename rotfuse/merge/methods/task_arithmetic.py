"""Task arithmetic (Ilharco et al. 2023): add weighted task vectors to their base.

    theta = base + scale * sum_i w_i (theta_i - base)

`w_i` are `--weights` as given -- not normalised, negatives allowed (a negative weight subtracts
a task), 1.0 each by default -- and `scale` is the paper's lambda (`--scale`). This is mergekit's
`task_arithmetic` (its `normalize: false` default; `lambda` is `--scale`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rotfuse.merge.methods.base import TaskVectorMethod
from rotfuse.merge.methods.task_vectors import check_scale, linear_combine


@dataclass(frozen=True)
class TaskArithmeticSettings:
    scale: float = 1.0  # lambda: multiplies the combined task vector

    def validate(self) -> None:
        check_scale(self.scale)


class TaskArithmetic(TaskVectorMethod):
    name = "task-arithmetic"
    summary = "base + scale * sum of weighted task vectors (fine-tune minus base)"
    Settings = TaskArithmeticSettings

    def combine(self, name: str, vectors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        return linear_combine(vectors, self.weights)
