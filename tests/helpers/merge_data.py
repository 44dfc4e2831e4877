"""Data for the merge and stats tests: input files with padding, and an independent reference
for Gram matrices (forward hooks on named live modules, rows selected by the attention mask by hand)."""

from __future__ import annotations

from pathlib import Path

import torch


def token_inputs(
    n: int, seq: int, vocab: int, seed: int, labels: int | None = None, pad: int = 0
) -> dict[str, torch.Tensor]:
    """Right-padded token batches of varied lengths (3 .. seq), optionally with class labels."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=generator)
    mask = torch.zeros(n, seq, dtype=torch.long)
    for row in range(n):
        length = 3 + (row * 5) % (seq - 2)
        mask[row, :length] = 1
    ids[mask == 0] = pad
    inputs = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        inputs["labels"] = torch.randint(0, labels, (n,), generator=generator)
    return inputs


def save_inputs(path: Path, inputs: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".npz":
        import numpy as np

        np.savez(path, **{k: v.numpy() for k, v in inputs.items()})
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in inputs.items()}, str(path))
    return path


def hooked_rows(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], modules: list[str], token_level: dict[str, bool]
) -> dict[str, torch.Tensor]:
    """Each named live module's input rows (float64) on one forward pass over `inputs`: the
    unpadded tokens of token-level inputs, every row of the others."""
    captured: dict[str, torch.Tensor] = {}
    named = dict(model.named_modules())
    handles = [
        named[name].register_forward_pre_hook(
            lambda module, args, name=name: captured.__setitem__(name, args[0].detach())
        )
        for name in modules
    ]
    try:
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    mask = inputs.get("attention_mask")
    return {
        name: (x[mask.bool()] if token_level[name] and mask is not None else x.reshape(-1, x.shape[-1])).double()
        for name, x in captured.items()
    }


def hooked_grams(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], modules: list[str], token_level: dict[str, bool]
) -> dict[str, torch.Tensor]:
    """`X^T X / rows` of each named live module's input rows (see `hooked_rows`)."""
    return {
        name: rows.T @ rows / rows.shape[0] for name, rows in hooked_rows(model, inputs, modules, token_level).items()
    }
