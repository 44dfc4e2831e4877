"""Tiny multimodal Gemma 3 checkpoints with trained-like values where transformers initialises a
constant: the projector (zeros, which would cut the image off the text) and every norm's gain and
bias (a gain of exactly 1 commutes with maps that a trained gain does not)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from helpers.functions import save_pair

PROJECTOR = "multi_modal_projector.mm_input_projection_weight"  # [vision_hidden, text_hidden], used as x @ W


def trained_like_pair(root: Path) -> tuple[Path, Path]:
    """Model (seed 0) and anchor (seed 1) of the tiny `gemma3-mm`, projector and norms randomised."""
    model, anchor = save_pair("gemma3-mm", root)
    for seed, folder in enumerate((model, anchor)):
        gen = torch.Generator().manual_seed(seed)
        tensors = load_file(str(folder / "model.safetensors"))
        for name, value in tensors.items():
            if name == PROJECTOR:
                tensors[name] = 0.25 * torch.randn(value.shape, generator=gen)
            elif "norm" in name:
                tensors[name] = value + 0.5 * torch.randn(value.shape, generator=gen)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return model, anchor
