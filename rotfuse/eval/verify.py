"""`rotfuse verify`: run two checkpoints with transformers and compare their main outputs, with a
tolerance that fits the checkpoints' precision."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rotfuse.core.errors import InputError
from rotfuse.eval.runtime import load_model, main_output
from rotfuse.eval.score import located, run_batches


@dataclass(frozen=True)
class Tolerance:
    """Elementwise `|a - b| <= atol + rtol * |b|`, as torch.allclose with b the reference."""

    atol: float
    rtol: float


# Defaults by the least precise floating dtype stored in either checkpoint. A matched fp32 model
# differs from its original by float rounding (~1e-6 relative); a half-precision checkpoint also
# carries the rounding of every transformed weight back to 16 bits.
DEFAULT_TOLERANCE = {
    "F64": Tolerance(1e-6, 1e-6),
    "F32": Tolerance(1e-4, 1e-4),
    "F16": Tolerance(1e-2, 1e-2),
    "BF16": Tolerance(5e-2, 5e-2),
}
PRECISION_ORDER = ("F64", "F32", "F16", "BF16")


def default_tolerance(dtypes: set[str]) -> Tolerance:
    """The tolerance for the least precise floating dtype among `dtypes` (float32 if none)."""
    present = [name for name in PRECISION_ORDER if name in dtypes] or ["F32"]
    return DEFAULT_TOLERANCE[present[-1]]


@dataclass
class OutputDiff:
    """How far `candidate` outputs are from `reference` outputs, accumulated over batches."""

    tolerance: Tolerance
    max_abs: float = 0.0
    max_ref: float = 0.0  # largest |reference| seen: the scale of the outputs
    worst: float = 0.0  # max |a - b| / (atol + rtol |b|): within tolerance iff <= 1
    elements: int = 0

    def add(self, reference: torch.Tensor, candidate: torch.Tensor) -> None:
        if reference.shape != candidate.shape:
            raise InputError(
                f"outputs have different shapes ({list(reference.shape)} vs {list(candidate.shape)}): "
                "not the same architecture"
            )
        ref, cand = reference.double(), candidate.double()
        diff = (ref - cand).abs()
        if not bool(torch.isfinite(cand).all()) or not bool(torch.isfinite(ref).all()):
            self.worst = math.inf
            self.max_abs = math.inf
        allowed = self.tolerance.atol + self.tolerance.rtol * ref.abs()
        self.max_abs = max(self.max_abs, float(diff.max()) if diff.numel() else 0.0)
        self.max_ref = max(self.max_ref, float(ref.abs().max()) if ref.numel() else 0.0)
        self.worst = max(self.worst, float((diff / allowed).max()) if diff.numel() else 0.0)
        self.elements += diff.numel()

    @property
    def max_rel(self) -> float:
        """Largest absolute difference relative to the largest reference output."""
        return self.max_abs / self.max_ref if self.max_ref > 0 else (0.0 if self.max_abs == 0 else math.inf)

    @property
    def agree(self) -> bool:
        return self.worst <= 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "agree": self.agree,
            "max_abs_diff": self.max_abs,
            "max_rel_diff": self.max_rel,
            "output_scale": self.max_ref,
            "worst_ratio_to_tolerance": self.worst,
            "elements": self.elements,
            "atol": self.tolerance.atol,
            "rtol": self.tolerance.rtol,
        }


def main_outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor], batch_size: int = 32) -> list[torch.Tensor]:
    """The main output (logits or hidden states) of every batch, in float32 on the CPU."""
    return [main_output(outputs).float().cpu() for _, outputs in run_batches(model, inputs, batch_size)]


@dataclass(frozen=True)
class VerifyOptions:
    data: Path | None = None  # a data file; None: random inputs valid for the architecture
    samples: int | None = None  # first N of the data [all], or N random inputs [8]
    seq_len: int = 32
    seed: int = 0
    atol: float | None = None  # None: by the least precise stored dtype (DEFAULT_TOLERANCE)
    rtol: float | None = None
    device: str = "cpu"
    batch_size: int = 16
    allow_nonfinite: bool = False  # else NaN/Inf weights are refused: outputs built on them prove nothing


def verify(original: Path, aligned: Path, options: VerifyOptions) -> dict[str, Any]:
    """Run both checkpoints with transformers (one at a time, in float32) and compare main outputs."""
    from rotfuse.eval.data import load_inputs
    from rotfuse.eval.runtime import example_inputs, refuse_remote_code
    from rotfuse.io.checkpoint import Checkpoint

    first, second = (Checkpoint.open(path, options.allow_nonfinite) for path in (original, aligned))
    for folder in (original, aligned):
        refuse_remote_code(folder)
    for checkpoint in (first, second):
        checkpoint.check_values()
    for key in ("model_type", "architectures"):
        if first.config.get(key) != second.config.get(key):
            raise InputError(
                f"{aligned}: {key} {second.config.get(key)!r} differs from {first.config.get(key)!r} "
                f"in {original}: not the same architecture"
            )
    base = default_tolerance({ckpt.entry(name).dtype for ckpt in (first, second) for name in ckpt.names()})
    tolerance = Tolerance(
        base.atol if options.atol is None else options.atol, base.rtol if options.rtol is None else options.rtol
    )
    if options.data is not None:
        inputs = load_inputs(options.data, original, options.samples)
        source = str(options.data)
    else:
        inputs = example_inputs(first.config, batch=options.samples or 8, seq_len=options.seq_len, seed=options.seed)
        source = f"random (seed {options.seed})"
    outputs = []
    for folder in (original, aligned):  # one model in memory at a time
        with located(folder):
            outputs.append(main_outputs(load_model(folder, options.device), inputs, options.batch_size))
    diff = OutputDiff(tolerance)
    for ref, cand in zip(*outputs):
        diff.add(ref, cand)
    return {
        "tool": "rotfuse",
        "command": "verify",
        "original": str(original),
        "aligned": str(aligned),
        "inputs": {"source": source, "samples": next(iter(inputs.values())).shape[0]},
        **diff.as_dict(),
    }
