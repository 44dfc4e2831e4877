"""Linear interpolation between two checkpoints, scored on data: the loss barrier.

For each `l` on a grid, `(1-l)*A + l*B` is written tensor by tensor into a temporary checkpoint
folder (so memory holds one tensor of each input at a time) and loaded from there with
transformers, which keeps transformers 5's on-disk <-> in-memory name conversion correct (tensor
names always come from the files, never from a live model). At most one interpolated model is in
memory; A and B themselves are loaded only to label unlabelled data with their ensemble.

The barrier is `max_l [L(l) - ((1-l) L(0) + l L(1))]` (Frankle et al.; GLMC): how far the path
rises above the straight line between the endpoint losses. 0 means linearly mode connected.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rotfuse.core.errors import InputError, UsageError
from rotfuse.core.progress import Progress
from rotfuse.core.tensors import weighted_average
from rotfuse.eval.runtime import load_model, refuse_remote_code
from rotfuse.eval.score import (
    LABELS_ENSEMBLE,
    LossSpec,
    ensemble_labels,
    located,
    loss_spec,
    probabilities,
    score,
)
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.io.compat import compare_tensors
from rotfuse.io.safetensors_file import FLOAT_DTYPES
from rotfuse.io.staging import temporary_folder
from rotfuse.io.writer import CheckpointWriter, copy_side_files, plan_like, side_files


def grid(steps: int) -> list[float]:
    """`steps` evenly spaced values from 0 to 1 inclusive."""
    if steps < 2:
        raise UsageError(f"--steps {steps}: need at least 2 points (the two endpoints)")
    return [i / (steps - 1) for i in range(steps)]


def barrier(lambdas: Sequence[float], values: Sequence[float], higher_is_worse: bool = True) -> tuple[float, float]:
    """Largest rise of `values` above the straight line between its endpoints, and where.

    For a loss: `max_l [L(l) - ((1-l) L(0) + l L(1))]`; with `higher_is_worse=False` (accuracy)
    the largest drop below the line. Needs a grid that starts at 0 and ends at 1.
    """
    if len(lambdas) != len(values) or len(lambdas) < 2 or lambdas[0] != 0 or lambdas[-1] != 1:
        raise ValueError("a barrier needs values on a grid from 0 to 1 inclusive")
    sign = 1.0 if higher_is_worse else -1.0
    start, end = values[0], values[-1]
    gaps = [sign * (v - ((1 - lam) * start + lam * end)) for lam, v in zip(lambdas, values)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    return gaps[worst], lambdas[worst]


@dataclass
class Curve:
    """Loss (and accuracy) along one interpolation path; `*_spread` only for averaged curves."""

    label: str
    lambdas: list[float]
    losses: list[float]
    accuracies: list[float] | None = None
    labels: str = "data"  # where the loss targets came from (score.LossSpec.labels)
    endpoints: tuple[str, str] = ("", "")
    loss_spread: list[float] | None = None
    accuracy_spread: list[float] | None = None

    @property
    def barrier(self) -> float:
        return barrier(self.lambdas, self.losses)[0]

    @property
    def accuracy_drop(self) -> float | None:
        return None if self.accuracies is None else barrier(self.lambdas, self.accuracies, higher_is_worse=False)[0]

    def at(self, lam: float) -> dict[str, float | None]:
        """Loss and accuracy at grid point `lam` (e.g. 0.5: the simple average)."""
        if lam not in self.lambdas:
            raise UsageError(f"{lam} is not on the interpolation grid {self.lambdas}")
        i = self.lambdas.index(lam)
        return {"loss": self.losses[i], "accuracy": None if self.accuracies is None else self.accuracies[i]}

    def as_dict(self) -> dict[str, Any]:
        height, at = barrier(self.lambdas, self.losses)
        result: dict[str, Any] = {
            "label": self.label,
            "a": self.endpoints[0],
            "b": self.endpoints[1],
            "labels": self.labels,
            "lambdas": self.lambdas,
            "loss": self.losses,
            "accuracy": self.accuracies,
            "barrier": height,
            "barrier_lambda": at,
            "accuracy_drop": self.accuracy_drop,
        }
        if 0.5 in self.lambdas:
            result["midpoint"] = self.at(0.5)
        if self.loss_spread is not None:
            result["loss_spread"] = self.loss_spread
            result["accuracy_spread"] = self.accuracy_spread
        return result

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Curve:
        """Read a curve back from `interpolate --json` output (for plotting earlier runs)."""
        try:
            return cls(
                str(data["label"]),
                [float(x) for x in data["lambdas"]],
                [float(x) for x in data["loss"]],
                None if data.get("accuracy") is None else [float(x) for x in data["accuracy"]],
                str(data.get("labels", "data")),
                (str(data.get("a", "")), str(data.get("b", ""))),
                data.get("loss_spread"),
                data.get("accuracy_spread"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: not an interpolation curve ({type(exc).__name__}: {exc})") from exc


def check_pair(a: Checkpoint, b: Checkpoint) -> None:
    """Both checkpoints must hold the same tensors with the same shapes."""
    compare_tensors(a, b)
    for name in a.names():
        for checkpoint in (a, b):
            checkpoint.refuse_float8(name, "interpolate")


def write_interpolated(a: Checkpoint, b: Checkpoint, lam: float, folder: Path) -> None:
    """Write `(1-lam)*a + lam*b` into `folder` in A's layout and dtypes, one tensor at a time.

    The average is `merge --method simple`'s own (float64), so λ = 0.5 is exactly what `rotfuse
    merge` writes, the endpoints are A and B bit for bit, and A with itself gives A back.
    Integer tensors (buffers) are copied from A.
    """
    writer = CheckpointWriter(folder, plan_like(a), a, fsync=False)  # read once and deleted: no flush
    try:
        for name in a.names():
            if a.entry(name).dtype not in FLOAT_DTYPES:
                continue  # finish() copies it byte for byte
            writer.write(name, weighted_average([a.get(name), b.get(name)], [1.0 - lam, lam]))
        writer.finish()
    finally:
        writer.abort()
    copy_side_files(a, folder)


@dataclass
class InterpolationSettings:
    lambdas: list[float] = field(default_factory=lambda: grid(11))
    batch_size: int = 32
    device: str = "cpu"
    work_dir: Path | None = None  # where the temporary checkpoints go (default: the system's)


def interpolate(
    a_path: Path,
    b_path: Path,
    inputs: dict[str, torch.Tensor],
    settings: InterpolationSettings,
    label: str | None = None,
    progress: Progress | None = None,
) -> Curve:
    """Score `(1-l)*A + l*B` on `inputs` for every `l` in `settings.lambdas`."""
    a, b = Checkpoint.open(a_path), Checkpoint.open(b_path)
    check_pair(a, b)
    side_files(a)
    for folder in (a_path, b_path):
        refuse_remote_code(folder)
    spec = loss_spec(a.config, inputs, where=str(a_path))
    reference = _reference_labels(a_path, b_path, inputs, spec, settings)
    losses: list[float] = []
    accuracies: list[float | None] = []
    with temporary_folder(Path(a_path).name, settings.work_dir) as tmp:
        for done, lam in enumerate(settings.lambdas, start=1):
            folder = Path(tmp) / f"lambda-{done}"
            folder.mkdir()
            write_interpolated(a, b, lam, folder)
            with located(f"{a_path} -> {b_path} at λ={lam:g}"):
                result = score(load_model(folder, settings.device), inputs, spec, reference, settings.batch_size)
            shutil.rmtree(folder)
            losses.append(result.loss)
            accuracies.append(result.accuracy)
            if progress:
                progress(done, len(settings.lambdas))
    name = label or f"{Path(a_path).name} -> {Path(b_path).name}"
    accs = None if None in accuracies else [float(x) for x in accuracies if x is not None]
    return Curve(name, list(settings.lambdas), losses, accs, spec.labels, (str(a_path), str(b_path)))


def _reference_labels(
    a_path: Path, b_path: Path, inputs: dict[str, torch.Tensor], spec: LossSpec, settings: InterpolationSettings
) -> torch.Tensor | None:
    """Labels for unlabelled classifier data: the endpoint ensemble's predictions."""
    if spec.labels != LABELS_ENSEMBLE:
        return None
    probs = []
    for path in (a_path, b_path):  # one model in memory at a time
        with located(path):
            probs.append(probabilities(load_model(path, settings.device), inputs, settings.batch_size))
    return ensemble_labels(probs, inputs)
