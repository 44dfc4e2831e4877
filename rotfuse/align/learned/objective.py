"""`interpolate`'s loss (eval/score.py), differentiable: the task loss with labels, next-token
cross-entropy for causal LMs, the endpoint ensemble's labels otherwise -- mean over counted targets."""

from __future__ import annotations

import torch

from rotfuse.eval.score import IGNORE, LossSpec, _targets, logits_of


def batch_loss(
    outputs: object, batch: dict[str, torch.Tensor], spec: LossSpec, reference: torch.Tensor | None
) -> torch.Tensor:
    logits = logits_of(outputs)
    labels = _targets(batch, spec.labels, reference).to(logits.device)
    if spec.shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    if labels.is_floating_point() or logits.shape[-1] == 1:
        return torch.nn.functional.mse_loss(logits.reshape(labels.shape), labels.float())
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=IGNORE
    )
