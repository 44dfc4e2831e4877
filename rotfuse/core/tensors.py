"""Tensor reductions every pass does on every tensor, made cheap, and the weighted average that
merging and interpolation share.

Both avoid float64 copies of large tensors: everything runs in the tensors' own (float32 or wider)
precision, with cascade summation; only chunk totals are added in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf: one sum (NaN and Inf propagate through it), confirmed element-wise only
    when the sum is not finite -- a large fp16 tensor can overflow its own sum. The sum runs in
    the tensor's dtype (torch accumulates half types in float32 internally): asking for a float32
    result instead is ~20x slower on bf16. float8 goes through float32, a chunk at a time."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8: torch implements no reduction for it; check in float32 chunks
        flat = tensor.reshape(-1)
        step = 1 << 20
        return all(bool(torch.isfinite(flat[i : i + step].float()).all()) for i in range(0, flat.numel(), step))
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def sq_distance(a: torch.Tensor, b: torch.Tensor, chunk_elements: int = 1 << 18) -> float:
    """||a - b||^2, a few rows at a time: each chunk's temporaries (~1 MiB of float32) come from
    memory the allocator already holds instead of freshly faulted pages, and stay in cache. Chunks
    are summed in float64; within a chunk torch's cascade summation in float32 is accurate to ~1e-7
    relative and 3x faster than asking for a float64 result."""
    row = a.numel() // a.shape[0] if a.dim() and a.shape[0] else 1
    rows = max(1, chunk_elements // max(1, row))
    if a.dim() == 0 or a.shape[0] <= rows:
        return float(_diff(a, b).square_().sum())
    return sum(float(_diff(a[i : i + rows], b[i : i + rows]).square_().sum()) for i in range(0, a.shape[0], rows))


def _diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    work = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return a.to(work) - b.to(work)


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
