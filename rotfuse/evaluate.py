"""What a loaded model scores on a set of inputs, and how far apart two models' outputs are.

Scoring and comparing work on loaded models and input tensors; `interpolate` and the experiment
scripts load those, and only `verify()` opens checkpoints itself. Everything is computed in
float32 whatever the checkpoint's dtype, and accumulated as sums over batches, so the batch size
never changes a result.

Loss definitions (documented for users in the README, under `rotfuse interpolate`):
- labels in the data: the model's task loss -- cross-entropy on the logits for classification
  (sequence, image or token level; label -100 is ignored, as in transformers), mean squared error
  for float labels or a single-output head (regression, as transformers does for num_labels 1).
- causal language models (`...ForCausalLM`, `...LMHeadModel`): next-token cross-entropy with the
  input ids as labels, padding (attention_mask == 0) excluded; labels in the data replace them.
- a classifier without labels: cross-entropy against *reference labels* supplied by the caller;
  `interpolate` uses the endpoint ensemble's predictions (argmax of the mean of both endpoints'
  probabilities), so accuracy reads as agreement with that ensemble.
- anything else (a bare encoder with no head, or another head without labels) has no loss:
  refused with a message naming the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rotfuse.data import batches
from rotfuse.errors import InputError
from rotfuse.runtime import forward, load_model, main_output

IGNORE = -100  # transformers' label for "no target here"
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForImageClassification", "ForTokenClassification",
                       "ForAudioClassification")

# label sources, as reported in results
LABELS_FROM_DATA = "data"
LABELS_NEXT_TOKEN = "next-token"
LABELS_ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class LossSpec:
    """Where the targets of the loss come from, and whether logits predict the next position."""

    labels: str  # LABELS_FROM_DATA, LABELS_NEXT_TOKEN or LABELS_ENSEMBLE
    shift: bool = False  # causal LM: the logits at position t are scored against the label at t+1


def loss_spec(config: dict[str, Any], inputs: dict[str, torch.Tensor], where: str) -> LossSpec:
    """The loss this model and data support (see the module doc); refuses a model without a head."""
    architectures = tuple(config.get("architectures") or ())
    kind = ", ".join(architectures) or config.get("model_type", "this model")
    if any(name.endswith(CAUSAL_SUFFIXES) for name in architectures):
        return LossSpec(LABELS_FROM_DATA if "labels" in inputs else LABELS_NEXT_TOKEN, shift=True)
    if not any("For" in name for name in architectures):  # BertModel, ViTModel: hidden states only
        raise InputError(f"{where}: {kind} has no classification or language-model head, so no loss is "
                         "defined; use a checkpoint with a task head")
    if "labels" in inputs:
        return LossSpec(LABELS_FROM_DATA)
    if any(name.endswith(CLASSIFIER_SUFFIXES) for name in architectures):
        return LossSpec(LABELS_ENSEMBLE)
    raise InputError(f"{where}: {kind} needs labels in the data to define a loss (only classifiers can be "
                     "scored against their own ensemble, and causal LMs against the next token)")


@dataclass
class Score:
    """Mean loss (and accuracy for class targets) over every counted sample or token."""

    loss: float
    accuracy: float | None
    count: int


@dataclass
class _Totals:
    loss: float = 0.0
    correct: int = 0
    count: int = 0
    classes: bool = True

    def score(self) -> Score:
        if self.count == 0:
            raise InputError("no labelled samples to score (every label is -100 or masked out)")
        return Score(self.loss / self.count, self.correct / self.count if self.classes else None, self.count)


def logits_of(outputs: Any) -> torch.Tensor:
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise InputError("the model returns no logits (a bare encoder?): a loss needs a task head")
    return logits.float()


def _targets(batch: dict[str, torch.Tensor], source: str, reference: torch.Tensor | None) -> torch.Tensor:
    if source == LABELS_ENSEMBLE:
        if reference is None:
            raise ValueError("ensemble labels need reference labels from the caller")
        return reference
    if source == LABELS_NEXT_TOKEN:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = IGNORE
        return labels
    return batch["labels"]


def _add_batch(totals: _Totals, logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> None:
    if shift:  # position t predicts token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    if labels.is_floating_point() or logits.shape[-1] == 1:  # regression (transformers: num_labels == 1)
        if logits.numel() != labels.numel():
            raise InputError(f"regression labels of shape {list(labels.shape)} do not fit outputs of shape "
                             f"{list(logits.shape)}")
        totals.classes = False
        predictions = logits.reshape(labels.shape)
        totals.loss += float(torch.nn.functional.mse_loss(predictions, labels.float(), reduction="sum"))
        totals.count += labels.numel()
        return
    if logits.shape[:-1] != labels.shape:
        raise InputError(f"labels of shape {list(labels.shape)} do not fit logits of shape {list(logits.shape)}")
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long()
    keep = flat_labels != IGNORE
    if bool(((flat_labels[keep] < 0) | (flat_labels[keep] >= logits.shape[-1])).any()):
        raise InputError(f"labels must lie in 0..{logits.shape[-1] - 1} (the model's number of classes)")
    totals.loss += float(torch.nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE, reduction="sum"))
    totals.correct += int((flat_logits.argmax(-1)[keep] == flat_labels[keep]).sum())
    totals.count += int(keep.sum())


def score(model: torch.nn.Module, inputs: dict[str, torch.Tensor], spec: LossSpec,
          reference: torch.Tensor | None = None, batch_size: int = 32) -> Score:
    """Mean loss and accuracy of `model` on `inputs`; `reference` holds the labels for LABELS_ENSEMBLE."""
    device = next(model.parameters()).device
    totals = _Totals()
    start = 0
    for batch, outputs in run_batches(model, inputs, batch_size):
        size = next(iter(batch.values())).shape[0]
        ref = reference[start:start + size] if reference is not None else None
        start += size
        _add_batch(totals, logits_of(outputs), _targets(batch, spec.labels, ref).to(device), spec.shift)
    return totals.score()


def run_batches(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                batch_size: int) -> Iterator[tuple[dict[str, torch.Tensor], Any]]:
    """Each batch with the model's outputs. Labels are not passed (the model computes no loss of its
    own); inputs the model cannot take are the data's fault, so they raise InputError (exit 2)."""
    device = next(model.parameters()).device
    for batch in batches(inputs, batch_size):
        features = {name: t.to(device) for name, t in batch.items() if name != "labels"}
        try:
            outputs = forward(model, features)
        except (ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise InputError(f"the inputs do not fit this model ({type(exc).__name__}: {exc})") from exc
        yield batch, outputs


@contextmanager
def located(where: object) -> Iterator[None]:
    """Name the checkpoint in an InputError raised while running it (scoring itself knows no files)."""
    try:
        yield
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from exc


def probabilities(model: torch.nn.Module, inputs: dict[str, torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """Softmax of the logits for every sample (on the CPU): what ensemble labels are built from."""
    return torch.cat([logits_of(outputs).softmax(-1).cpu() for _, outputs in run_batches(model, inputs, batch_size)])


def ensemble_labels(probs: Sequence[torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Argmax of the models' mean probabilities; padded token positions get -100."""
    labels = torch.stack(list(probs)).mean(0).argmax(-1)
    mask = inputs.get("attention_mask")
    if labels.dim() == 2 and mask is not None and mask.shape == labels.shape:
        labels[mask == 0] = IGNORE
    return labels


# ---------------------------------------------------------------------- comparing outputs


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
            "agree": self.agree, "max_abs_diff": self.max_abs, "max_rel_diff": self.max_rel,
            "output_scale": self.max_ref, "worst_ratio_to_tolerance": self.worst,
            "elements": self.elements, "atol": self.tolerance.atol, "rtol": self.tolerance.rtol,
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
    from rotfuse.data import load_inputs
    from rotfuse.io.checkpoint import Checkpoint
    from rotfuse.runtime import example_inputs, refuse_remote_code

    first, second = (Checkpoint.open(path, options.allow_nonfinite) for path in (original, aligned))
    for folder in (original, aligned):
        refuse_remote_code(folder)
    for checkpoint in (first, second):
        checkpoint.check_values()
    for key in ("model_type", "architectures"):
        if first.config.get(key) != second.config.get(key):
            raise InputError(f"{aligned}: {key} {second.config.get(key)!r} differs from {first.config.get(key)!r} "
                             f"in {original}: not the same architecture")
    base = default_tolerance({ckpt.entry(name).dtype for ckpt in (first, second) for name in ckpt.names()})
    tolerance = Tolerance(base.atol if options.atol is None else options.atol,
                          base.rtol if options.rtol is None else options.rtol)
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
    return {"tool": "rotfuse", "command": "verify", "original": str(original), "aligned": str(aligned),
            "inputs": {"source": source, "samples": next(iter(inputs.values())).shape[0]}, **diff.as_dict()}
