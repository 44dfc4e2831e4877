"""SLERP: spherical linear interpolation between two models, tensor by tensor.

Each tensor is a vector; with `cos = <a, b> / (|a| |b|)` and `theta = arccos(cos)`,

    slerp(t) = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b

`t = 0` gives the first model, `t = 1` the second. Where the tensors are (anti)parallel,
`|cos| > 0.9995`, the formula is ill-conditioned and the result is the linear interpolation
`(1 - t) a + t b` instead. A tensor whose norm is at most 1e-8 is not normalised for the angle.
This is mergekit's `slerp` (its `DOT_THRESHOLD` and `eps`, with the first model as its
`base_model`), for a single `t`: mergekit also takes per-layer gradients of t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rotfuse.core.errors import UsageError
from rotfuse.merge.methods.base import MergeMethod
from rotfuse.merge.methods.task_vectors import no_weights, work_dtype

if TYPE_CHECKING:
    from rotfuse.merge.stats.folder import StatsFolder

DOT_THRESHOLD = 0.9995  # |cos| above which the tensors count as parallel (mergekit's)
EPS = 1e-8  # norms at most this are not divided by (mergekit's)


def slerp(t: float, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two tensors of one shape (see the module docstring)."""
    work = work_dtype([first, second])
    a = first.to(dtype=work)
    b = second.to(a.device, work)
    norm_a, norm_b = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    dot = float(torch.vdot(a.reshape(-1), b.reshape(-1)))
    dot /= (norm_a if norm_a > EPS else 1.0) * (norm_b if norm_b > EPS else 1.0)
    if abs(dot) > DOT_THRESHOLD:
        return a * (1.0 - t) + b * t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return a * (math.sin(theta - theta * t) / sin_theta) + b * (math.sin(theta * t) / sin_theta)


@dataclass(frozen=True)
class SlerpSettings:
    t: float = 0.5  # position between the models: 0 = the first, 1 = the second

    def validate(self) -> None:
        if not (math.isfinite(self.t) and 0.0 <= self.t <= 1.0):
            raise UsageError(f"--t {self.t}: must be in [0, 1] (0 = the first model, 1 = the second)")


class Slerp(MergeMethod):
    name = "slerp"
    summary = "spherical interpolation between two models (--t), linear where they are parallel"
    min_models = 2
    max_models = 2
    Settings = SlerpSettings

    def __init__(
        self, settings: SlerpSettings, weights: Sequence[float], stats: Sequence[StatsFolder] = (), device: str = "cpu"
    ) -> None:
        super().__init__(settings, weights, stats, device)
        self.weights = [1.0 - settings.t, settings.t]  # the report's per-model weights: the position

    @classmethod
    def normalise(cls, weights: Sequence[float] | None, count: int) -> list[float]:
        return no_weights(cls.name, weights, count, "--t sets the position between the two models")

    def merge(self, name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
        return slerp(self.settings.t, tensors[0], tensors[1])
