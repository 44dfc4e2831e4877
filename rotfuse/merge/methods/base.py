"""What a merge method is: the protocol every module in this package implements.

A method declares, as class attributes, its name, a one-line summary, the kind of statistics it
needs (`rotfuse stats --kind`, or None), whether it needs a base model (`--base`), how many models
it takes, and its settings dataclass (whose fields are the method's flags and job-file keys). An
instance is made once per merge job with the settings, the per-model weights and the statistics;
the engine then calls `covers` once per tensor to decide the rule, and `merge` per tensor with one
tensor per model (and the base's, when the method takes one). Methods never open files: what they
need arrives as tensors or through the statistics folders the engine opened.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from rotfuse.core.errors import InputError, UsageError
from rotfuse.merge.methods.task_vectors import add_back, deltas, task_weights

if TYPE_CHECKING:
    import torch

    from rotfuse.merge.stats.folder import StatsFolder


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


@dataclass(frozen=True)
class NoSettings:
    """The settings of a method that has none."""

    def validate(self) -> None:
        """Raise UsageError for an out-of-range value (called once, before any work)."""


class MergeMethod(ABC):
    """One merge method. Subclasses set the class attributes and implement `merge`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    stats: ClassVar[str | None] = None  # kind of statistics each model needs, if any
    needs_base: ClassVar[bool] = False  # takes --base BASE (a task vector's origin)
    min_models: ClassVar[int] = 2
    max_models: ClassVar[int | None] = None
    Settings: ClassVar[type[Any]] = NoSettings

    def __init__(
        self, settings: Any, weights: Sequence[float], stats: Sequence[StatsFolder] = (), device: str = "cpu"
    ) -> None:
        self.settings = settings
        self.weights = list(weights)
        self.folders = list(stats)  # one statistics folder per model (statistics methods)
        self.device = device

    # ---- declared once per job

    @classmethod
    def make_settings(cls, values: Mapping[str, Any]) -> Any:
        """The settings dataclass from flag values (only those given); unknown names are refused."""
        fields = {f.name for f in dataclasses.fields(cls.Settings)}
        unknown = sorted(set(values) - fields)
        if unknown:
            flag = "--" + unknown[0].replace("_", "-")
            takes = ", ".join("--" + f.replace("_", "-") for f in sorted(fields)) or "no settings"
            raise UsageError(f"{flag} is not a setting of --method {cls.name} (it takes {takes})")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls.Settings)}
        settings = cls.Settings(**{key: _typed(key, value, types[key]) for key, value in values.items()})
        settings.validate()
        return settings

    @classmethod
    def normalise(cls, weights: Sequence[float] | None, count: int) -> list[float]:
        """The per-model weights the method uses (default: non-negative, scaled to sum to one)."""
        return normalise_weights(weights, count)

    def describe(self) -> dict[str, Any]:
        """The settings as the report records them."""
        return dataclasses.asdict(self.settings)

    # ---- per tensor

    def covers(self, name: str) -> bool:
        """Whether the method's own rule applies to floating tensor `name` (else the engine takes
        the weighted average). Raise InputError when only some models can be merged by it."""
        return True

    def group(self, name: str) -> str:
        """Tensors with one group key are merged back to back (RegMean: weights reading one Gram)."""
        return name

    @abstractmethod
    def merge(self, name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
        """The merged tensor `name` from one tensor per model (same shape), and the base's."""


class StatsMethod(MergeMethod):
    """A method driven by per-model statistics: its rule covers the tensors every model's
    statistics hold (`has`), the rest are averaged; statistics that cover a tensor for some
    models only are refused."""

    @abstractmethod
    def has(self, stats: StatsFolder, name: str) -> bool:
        """Whether one model's statistics cover tensor `name`."""

    def covers(self, name: str) -> bool:
        covered = [self.has(stats, name) for stats in self.folders]
        if all(covered):
            return True
        if any(covered):
            missing, holder = self.folders[covered.index(False)], self.folders[covered.index(True)]
            raise InputError(
                f"{missing.folder}: no {self.name} statistics for tensor {name!r}, "
                f"but {holder.folder} has them; were they computed on different architectures?"
            )
        return False


def _typed(key: str, value: Any, kind: str) -> Any:
    """A setting's value as its declared type (`float`, `int`, `bool`, `str`, or `X | None`):
    job files hand over YAML values, which must not slip through as another type."""
    if value is None and kind.endswith("| None"):
        return None
    kind = kind.removesuffix(" | None")
    flag = "--" + key.replace("_", "-")
    if kind == "bool":
        if not isinstance(value, bool):
            raise UsageError(f"{flag}: {value!r} is not true or false")
        return value
    if kind in ("float", "int"):
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if kind == "int":
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return number
        except (TypeError, ValueError):
            raise UsageError(f"{flag}: {value!r} is not {'an integer' if kind == 'int' else 'a number'}") from None
    if kind == "str":
        return str(value)
    return value


class TaskVectorMethod(MergeMethod):
    """A method on task vectors (fine-tune minus base): the weights are used as given (negatives
    negate a task), and the merged tensor is `base + scale * combine(task vectors)`, computed in
    float32 (16-bit checkpoints) or float64 and cast by the engine."""

    needs_base = True
    min_models = 1

    @classmethod
    def normalise(cls, weights: Sequence[float] | None, count: int) -> list[float]:
        return task_weights(weights, count)

    def merge(self, name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
        assert base is not None  # needs_base: the engine passes it
        origin, vectors = deltas(tensors, base)
        return add_back(origin, self.combine(name, vectors, base), self.settings.scale)

    @abstractmethod
    def combine(self, name: str, vectors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        """The merged task vector of tensor `name` from one task vector per model."""
