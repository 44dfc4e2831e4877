"""Simple merging: a weighted average of the models' tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rotfuse.core.tensors import weighted_average
from rotfuse.merge.methods.base import MergeMethod


class Simple(MergeMethod):
    name = "simple"
    summary = "weighted average of every parameter"

    def merge(self, name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
        return weighted_average(tensors, self.weights)
