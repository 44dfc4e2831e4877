"""Simple merging: a weighted average of the models' tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rotfuse.errors import UsageError


def normalise_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Per-model weights scaled to sum to one (uniform when none are given).

    Negative weights are refused: Fisher and RegMean multiply statistics by them, and a negative
    multiple of a Fisher or Gram matrix is no longer one.
    """
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise UsageError(f"--weights has {len(weights)} values for {count} models")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise UsageError(f"--weights {','.join(map(str, weights))}: every weight must be finite and >= 0")
    total = sum(weights)
    if total <= 0:
        raise UsageError("--weights: at least one weight must be positive")
    return [w / total for w in weights]


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`sum_i w_i t_i` accumulated in float64.

    float64 makes merging a model with itself give it back bit for bit once cast to the output
    dtype, whatever the weights (in float32, 0.3x + 0.7x can be one ulp off x). The result lives
    on the first tensor's device (with `merge --match` on CUDA the others may not).
    """
    total = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for tensor, weight in zip(tensors, weights, strict=True):
        if weight:
            total.add_(tensor.to(total.device, torch.float64), alpha=weight)
    return total
