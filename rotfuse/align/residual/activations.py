"""Residual-stream scores from activations: run MODEL and ANCHOR on the same inputs and compare
their hidden states feature by feature (Verma & Elbayad's "all layers" correlation matching).

C[i, j] sums, over every hidden state the model returns (the embedding output and each layer's
output, all in the residual stream's basis), the Pearson correlation of MODEL's feature i with
ANCHOR's feature j -- for a permutation -- or their cross-covariance normalised per layer -- for
an orthogonal map (a Procrustes fit of the states). Padding tokens are left out. Two passes over
the data (moments, then scores) keep memory at one d x d matrix whatever the depth.

An encoder-decoder whose two stacks share one stream map (the shared embedding couples them)
contributes the encoder's and the decoder's hidden states alike, each under its own mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rotfuse.core.errors import InputError


def stream_states(outputs: Any, inputs: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every hidden state on the residual stream with the mask of its real tokens: the model's
    `hidden_states`, or an encoder-decoder's encoder and decoder states."""
    found: list[tuple[torch.Tensor, torch.Tensor]] = []
    for states_key, mask_key in (
        ("hidden_states", "attention_mask"),
        ("encoder_hidden_states", "attention_mask"),
        ("decoder_hidden_states", "decoder_attention_mask"),
    ):
        states = getattr(outputs, states_key, None)
        for state in states or ():
            mask = inputs.get(mask_key)
            keep = mask.bool() if mask is not None else torch.ones(state.shape[:2], dtype=torch.bool)
            found.append((state, keep.to(state.device)))
    return found


def activation_scores(
    model_dir: Path,
    anchor_dir: Path,
    data: Path,
    orthogonal: bool,
    max_samples: int = 256,
    batch_size: int = 16,
    device: str = "cpu",
) -> torch.Tensor:
    from rotfuse.eval.data import batches, load_inputs
    from rotfuse.eval.runtime import forward, load_model

    model, anchor = load_model(model_dir, device), load_model(anchor_dir, device)
    inputs = load_inputs(data, tokenizer_folder=model_dir, max_samples=max_samples)
    inputs.pop("labels", None)

    def states(batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        moved = {k: v.to(device) for k, v in batch.items()}
        mine = stream_states(forward(model, moved, output_hidden_states=True), moved)
        theirs = stream_states(forward(anchor, moved, output_hidden_states=True), moved)
        if not mine or len(mine) != len(theirs):
            raise InputError(f"{model_dir}: the model does not return hidden states to compare")
        return [(x[keep].double(), y[keep].double()) for (x, keep), (y, _) in zip(mine, theirs)]

    # pass 1: per-layer means and spreads (or norms)
    count, sums, squares = 0, None, None
    for batch in batches(inputs, batch_size):
        pairs = states(batch)
        count += pairs[0][0].shape[0]
        s = torch.stack([torch.stack([x.sum(0), y.sum(0)]) for x, y in pairs])  # [L, 2, d]
        q = torch.stack([torch.stack([x.pow(2).sum(0), y.pow(2).sum(0)]) for x, y in pairs])
        sums, squares = (s, q) if sums is None or squares is None else (sums + s, squares + q)
    if not count or sums is None or squares is None:
        raise InputError(f"{data}: no tokens to compare")
    if orthogonal:
        center = torch.zeros_like(sums)
        scale = squares.sum(-1, keepdim=True).sqrt().clamp_min(1e-12).expand_as(sums)  # per-layer norm
    else:
        center = sums / count
        scale = (squares / count - center.pow(2)).clamp_min(0).sqrt().clamp_min(1e-8) * count**0.5

    # pass 2: the summed scores
    scores = torch.zeros(sums.shape[-1], sums.shape[-1], dtype=torch.float64, device=device)
    for batch in batches(inputs, batch_size):
        for layer, (x, y) in enumerate(states(batch)):
            xs = (x - center[layer, 0]) / scale[layer, 0]
            ys = (y - center[layer, 1]) / scale[layer, 1]
            scores += xs.T @ ys
    return scores.cpu()
