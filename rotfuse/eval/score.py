"""What a loaded model scores on a set of inputs: the task loss and accuracy.

Scoring works on loaded models and input tensors; `interpolate` and the experiment scripts load
those. Everything is computed in
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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from rotfuse.core.errors import InputError
from rotfuse.eval.data import batches
from rotfuse.eval.runtime import CLASSIFIER_SUFFIXES, forward, language_model_kind

IGNORE = -100  # transformers' label for "no target here"
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
    language = language_model_kind(config)
    if language == "causal":
        return LossSpec(LABELS_FROM_DATA if "labels" in inputs else LABELS_NEXT_TOKEN, shift=True)
    if language == "seq2seq" and "labels" not in inputs:
        raise InputError(
            f"{where}: {kind} is a sequence-to-sequence model: its loss needs the target token ids as "
            "'labels' in the data (the decoder reads them shifted right)"
        )
    if not any("For" in name for name in architectures):  # BertModel, ViTModel: hidden states only
        raise InputError(
            f"{where}: {kind} has no classification or language-model head, so no loss is "
            "defined; use a checkpoint with a task head"
        )
    if "labels" in inputs:
        return LossSpec(LABELS_FROM_DATA)
    if any(name.endswith(CLASSIFIER_SUFFIXES) for name in architectures):
        return LossSpec(LABELS_ENSEMBLE)
    raise InputError(
        f"{where}: {kind} needs labels in the data to define a loss (only classifiers can be "
        "scored against their own ensemble, and causal LMs against the next token)"
    )


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
            raise InputError(
                f"regression labels of shape {list(labels.shape)} do not fit outputs of shape {list(logits.shape)}"
            )
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
    totals.loss += float(
        torch.nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE, reduction="sum")
    )
    totals.correct += int((flat_logits.argmax(-1)[keep] == flat_labels[keep]).sum())
    totals.count += int(keep.sum())


def score(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    spec: LossSpec,
    reference: torch.Tensor | None = None,
    batch_size: int = 32,
) -> Score:
    """Mean loss and accuracy of `model` on `inputs`; `reference` holds the labels for LABELS_ENSEMBLE."""
    device = next(model.parameters()).device
    totals = _Totals()
    start = 0
    for batch, outputs in run_batches(model, inputs, batch_size):
        size = next(iter(batch.values())).shape[0]
        ref = reference[start : start + size] if reference is not None else None
        start += size
        _add_batch(totals, logits_of(outputs), _targets(batch, spec.labels, ref).to(device), spec.shift)
    return totals.score()


def run_batches(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], batch_size: int
) -> Iterator[tuple[dict[str, torch.Tensor], Any]]:
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
