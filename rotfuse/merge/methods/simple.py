"""Simple merging: a weighted average of the models' tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rotfuse.merge.methods.base import MergeMethod


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`sum_i w_i t_i`, accumulated in float64 for 32- and 64-bit tensors, float32 for 16-bit ones.

    Either makes merging a model with itself give it back bit for bit once cast to the output
    dtype, whatever the weights: in float32, 0.3x + 0.7x can be one float32 ulp off x, which a
    16-bit cast rounds away but a float32 output would keep -- hence float64 there. float32 for
    half-precision checkpoints halves the memory traffic of the commonest merge. The result lives
    on the first tensor's device (with `merge --match` on CUDA the others may not).
    """
    wide = any(t.dtype in (torch.float32, torch.float64) or not t.is_floating_point() for t in tensors)
    if not wide and len(tensors) == 2 and weights[0] == weights[1] == 0.5 and tensors[0].dtype == tensors[1].dtype:
        # the default merge: torch's lerp computes a + (b - a)/2 in float32 with one final rounding,
        # bit for bit the float32 path's round(a/2 + b/2) (every step is exact), without
        # materialising float32 copies of either tensor
        return torch.lerp(tensors[0], tensors[1].to(tensors[0].device), 0.5)
    work = torch.float64 if wide else torch.float32
    total: torch.Tensor | None = None
    for tensor, weight in zip(tensors, weights, strict=True):
        if not weight:
            continue
        if total is None:
            total = tensor.to(tensors[0].device, work) * weight
        else:  # add_ promotes a half-precision operand on the fly: no full-size float copy
            total.add_(tensor.to(tensors[0].device), alpha=weight)
    if total is None:  # every weight zero: normalise_weights refuses that, but stay total
        return torch.zeros(tensors[0].shape, dtype=work, device=tensors[0].device)
    return total


class Simple(MergeMethod):
    name = "simple"
    summary = "weighted average of every parameter"

    def merge(self, name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
        return weighted_average(tensors, self.weights)
