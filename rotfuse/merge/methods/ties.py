"""TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

Per tensor: keep each task vector's `density` fraction of largest-magnitude entries (trim), elect
each parameter's sign as that of the summed weighted task vectors, and average the entries that
agree with it, each weighted by its model's weight (with `normalize`, divided by the agreeing
weights' sum: the paper's disjoint mean); then `base + scale * merged`.

As mergekit's `ties` (tests/merge/methods/test_mergekit_conformance.py): `normalize` on by default, `lambda` is
`--scale`, k = int(density * numel) per tensor, weights not normalised (under `normalize` only
their ratios matter), entries tied in magnitude at the trimming threshold chosen by the same
torch sort (task_vectors.magnitude_mask). Differences: the default density is the paper's 0.2
(mergekit's is 1.0, no trimming); a tensor too small to keep one entry keeps one (mergekit
stops); arithmetic is float32/float64 (mergekit's default for 16-bit checkpoints is 16-bit, which
also rounds the task vectors it ranks). mergekit's `int8_mask` only changes the mask's memory,
not the result, so it has no flag.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rotfuse.merge.methods.base import TaskVectorMethod
from rotfuse.merge.methods.task_vectors import check_density, check_scale, magnitude_mask, ties_combine


@dataclass(frozen=True)
class TiesSettings:
    density: float = 0.2  # fraction of each task vector's entries kept (largest magnitudes)
    scale: float = 1.0  # lambda: multiplies the merged task vector
    normalize: bool = True  # divide by the agreeing models' weight sum (the disjoint mean)

    def validate(self) -> None:
        check_density(self.density)
        check_scale(self.scale)


class Ties(TaskVectorMethod):
    name = "ties"
    summary = "TIES: trim task vectors to their largest entries, elect signs, average the agreeing ones"
    Settings = TiesSettings

    def combine(self, name: str, vectors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        density = self.settings.density
        half = base.dtype.itemsize <= 2  # 16-bit task vectors repeat magnitudes: sort at once
        masks = [magnitude_mask(vector, density, half) for vector in vectors] if density < 1.0 else None
        return ties_combine(vectors, self.weights, self.settings.normalize, masks)
