"""Task vectors, the pieces task arithmetic, TIES and DARE are made of (no method here).

A task vector is a fine-tune minus its base, `delta_i = theta_i - base`; the methods trim or drop
entries of each, optionally elect a sign per parameter, and add a weighted combination back:

    theta = base + scale * combine_i(w_i * sparsify(delta_i))

Arithmetic follows `simple.weighted_average`: float64 when an input is 32- or 64-bit, float32
for half-precision checkpoints; the engine casts the result to the output dtype.

Everything here is checked against mergekit's `generalized_task_arithmetic.py` and `sparsify.py`
(tests/merge/methods/test_mergekit_conformance.py); where rotfuse differs the function says so.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from rotfuse.core.errors import UsageError
from rotfuse.merge.methods.sort_order import follows_torch_sort, leading_mask

COMBINE_CHUNK = 1 << 16  # entries of each task vector combined at a time (float64: 512 KiB a temporary)


def work_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 when any input is 32- or 64-bit, float32 for half-precision inputs."""
    wide = any(t.dtype in (torch.float32, torch.float64) or not t.is_floating_point() for t in tensors)
    return torch.float64 if wide else torch.float32


def task_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Per-model task-vector weights as given: not normalised, negatives allowed (subtracting a
    task), 1.0 each when none are given (mergekit requires them; the papers sum task vectors)."""
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise UsageError(f"--weights has {len(weights)} values for {count} models")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"--weights {','.join(map(str, weights))}: every weight must be finite")
    return weights


def no_weights(method: str, weights: Sequence[float] | None, count: int, instead: str) -> list[float]:
    """For methods whose per-model weights are not the user's to set: refuse --weights."""
    if weights is not None:
        raise UsageError(f"--method {method} takes no --weights ({instead})")
    return [1.0 / count] * count


def check_density(density: float) -> None:
    if not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise UsageError(f"--density {density}: the fraction of each task vector kept must be in (0, 1]")


def check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise UsageError(f"--scale {scale}: must be a finite number")


def check_seed(seed: int) -> None:
    if seed < 0:
        raise UsageError(f"--seed {seed}: must be >= 0")


def deltas(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The base and every model's task vector, in the working dtype on the base's device."""
    work = work_dtype([*tensors, base])
    origin = base.to(dtype=work)
    return origin, [tensor.to(origin.device, work) - origin for tensor in tensors]


def magnitude_mask(delta: torch.Tensor, density: float, ties_likely: bool = False) -> torch.Tensor:
    """TIES trimming: True at the `k = int(density * numel)` largest-magnitude entries (at least one).

    As mergekit's `sparsify.magnitude` on the CPU, so that the outputs are equal: k is
    `int(density * numel)` (0.29 of 100 keeps 28), magnitudes are ranked as float32, and where
    entries tied in magnitude straddle the k-th place -- common in 16-bit checkpoints -- the ones
    kept are those `torch.argsort(descending=True)` puts first (an arbitrary choice, but the same
    for one torch version whatever the thread count). Where torch's CPU sort is the introsort that
    `sort_order.leading_mask` follows (checked once per process), those entries are found without
    the sort; elsewhere a k-th-value threshold decides every tensor whose ties do not straddle it,
    and the rest are sorted (at once with `ties_likely`: 16-bit checkpoints, where the threshold
    rarely can). mergekit refuses a tensor where k would be 0; rotfuse keeps its largest entry.

    The magnitudes are those of the task vector as computed (exact for 16-bit checkpoints, float32
    -rounded for float32 ones): mergekit's when it runs in float32, its default for float32
    checkpoints and `dtype: float32` for 16-bit ones; its default 16-bit arithmetic rounds the task
    vector first, which can change which tied entries straddle the threshold.
    """
    count = delta.numel()
    k = max(1, int(density * count))
    if density >= 1.0 or k >= count:
        return torch.ones_like(delta, dtype=torch.bool)
    magnitudes = delta.abs().reshape(-1).to("cpu", torch.float32)
    if follows_torch_sort() and not bool(torch.isnan(magnitudes).any()):
        leading = leading_mask(magnitudes, k)  # reorders the magnitudes
        if leading is not None:
            return leading.reshape(delta.shape).to(delta.device)
        magnitudes = delta.abs().reshape(-1).to("cpu", torch.float32)
    if ties_likely:
        keep = torch.zeros(count, dtype=torch.bool)
        keep[torch.argsort(magnitudes, descending=True)[:k]] = True
        return keep.reshape(delta.shape).to(delta.device)
    threshold = torch.kthvalue(magnitudes, count - k + 1).values
    keep = magnitudes > threshold
    tied = magnitudes == threshold
    if int(keep.sum()) + int(tied.sum()) == k:  # no choice among ties to make
        keep |= tied
    else:
        keep = torch.zeros_like(keep)
        keep[torch.argsort(magnitudes, descending=True)[:k]] = True
    return keep.reshape(delta.shape).to(delta.device)


def dare_generator(seed: int, name: str, index: int) -> torch.Generator:
    """A CPU generator for model `index`'s mask of tensor `name`: one stream per (seed, tensor,
    model), so a mask never depends on the order tensors are visited, the device or threads."""
    digest = hashlib.blake2b(f"rotfuse-dare\0{seed}\0{name}\0{index}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def dare_mask(shape: torch.Size, density: float, seed: int, name: str, index: int) -> torch.Tensor:
    """DARE's drop mask on the CPU: each entry kept with probability `density` (a float32 uniform
    draw below it), independently; True where kept."""
    if density >= 1.0:
        return torch.ones(shape, dtype=torch.bool)
    return torch.rand(shape, generator=dare_generator(seed, name, index)) < density


def dare(delta: torch.Tensor, density: float, seed: int, name: str, index: int) -> torch.Tensor:
    """Drop and rescale (Yu et al. 2024): `delta * mask / density`.

    mergekit rescales by the ratio of L1 norms before and after dropping instead (`rescale: true`),
    which is 1/density only in expectation; the paper's 1/density keeps every kept entry's scale
    independent of the others, and the expected task vector unbiased."""
    if density >= 1.0:
        return delta
    mask = dare_mask(delta.shape, density, seed, name, index).to(delta.device)
    return delta * mask / density


def dare_masks(vectors: Sequence[torch.Tensor], density: float, seed: int, name: str) -> list[torch.Tensor] | None:
    """Every model's `dare_mask` on its vector's device (None where density 1 keeps everything),
    for a combination that applies them itself (`ties_combine(..., masks, rescale=density)`)."""
    if density >= 1.0:
        return None
    return [dare_mask(v.shape, density, seed, name, index).to(v.device) for index, v in enumerate(vectors)]


def dropped(vectors: Sequence[torch.Tensor], density: float, seed: int, name: str) -> list[torch.Tensor]:
    """Every model's task vector through `dare`, each with its own (seed, tensor, model) mask."""
    return [dare(vector, density, seed, name, index) for index, vector in enumerate(vectors)]


def linear_combine(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`sum_i w_i delta_i` (mergekit's task arithmetic with `normalize: false`)."""
    mixed = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights, strict=True):
        if weight:
            mixed.add_(delta, alpha=weight)
    return mixed


def ties_combine(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool,
    masks: Sequence[torch.Tensor | None] | None = None,
    rescale: float | None = None,
) -> torch.Tensor:
    """TIES's elect-and-merge (Yadav et al. 2023), as mergekit's `get_mask(method="sum")`.

    The weighted task vectors `w_i delta_i` vote: the elected sign of a parameter is that of their
    sum (+ on a tie at zero). Entries whose weighted sign agrees are summed (zero entries never
    agree); with `normalize` the sum is divided by the agreeing models' total weight -- the
    disjoint mean for positive weights -- left as is where no model agrees. `masks` (TIES's
    trimming, DARE's drop): each delta is first multiplied by its mask, where one is given, and
    then divided by `rescale` where that is given (DARE's 1/density: `dare`'s very arithmetic).

    Every step is element-wise, so on the CPU the tensors are taken COMBINE_CHUNK entries at a
    time: the temporaries stay in cache and are reused, instead of a dozen fresh tensors of the
    whole size (on a GPU, whole: one kernel per step).
    """
    masks = masks if masks is not None else [None] * len(deltas)
    flat = [delta.reshape(-1) for delta in deltas]
    flat_masks = [None if mask is None else mask.reshape(-1) for mask in masks]
    merged = torch.empty(deltas[0].shape, dtype=deltas[0].dtype, device=deltas[0].device)
    out = merged.view(-1)
    step = COMBINE_CHUNK if out.device.type == "cpu" else max(1, out.numel())
    for start in range(0, out.numel(), step):
        chunk = slice(start, start + step)
        trimmed = [
            d[chunk] if m is None else _masked(d[chunk], m[chunk], rescale)
            for d, m in zip(flat, flat_masks, strict=True)
        ]
        out[chunk] = _elect_and_merge(trimmed, weights, normalize)
    return merged


def _masked(delta: torch.Tensor, mask: torch.Tensor, rescale: float | None) -> torch.Tensor:
    """`delta * mask`, divided by `rescale` where given (DARE's `delta * mask / density`)."""
    kept = delta * mask
    return kept if rescale is None else kept.div_(rescale)


def _elect_and_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """`ties_combine` on one chunk of every (trimmed) task vector."""
    weighted = [delta * weight for delta, weight in zip(deltas, weights, strict=True)]
    positive = sum(weighted[1:], weighted[0].clone()) >= 0
    mixed = torch.zeros_like(weighted[0])
    divisor = torch.zeros_like(weighted[0])
    for vector, weight in zip(weighted, weights, strict=True):
        agree = torch.where(positive, vector > 0, vector < 0)
        mixed.add_(vector * agree)
        if normalize:
            divisor.add_(agree, alpha=weight)
    if normalize:
        mixed /= divisor.masked_fill_(divisor == 0, 1.0)
    return mixed


def add_back(base: torch.Tensor, mixed: torch.Tensor, scale: float) -> torch.Tensor:
    """`base + scale * mixed` (mergekit's `lambda`)."""
    return torch.add(base, mixed, alpha=scale)
