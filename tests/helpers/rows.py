"""FFN-like neuron rows of two models for the assignment tests: random rows of unit scale, the
source an unrelated model, a noisy scrambled copy of the anchor (a relative) or rows of norms
over two decades."""

from __future__ import annotations

import torch


def model_rows(kind: str, n: int, width: int, seed: int, noise: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, anchor) rows: `kind` "unrelated", "related" (the anchor's rows shuffled, plus
    `noise` times fresh ones) or "scaled" (unrelated rows, norms from 0.1 to 10)."""
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn(n, width, generator=g) / width**0.5
    src = torch.randn(n, width, generator=g) / width**0.5
    if kind == "related":
        src = anchor[torch.randperm(n, generator=g)] + noise * src
    elif kind == "scaled":  # rows of very different norms: the bound is per entry
        src = src * torch.logspace(-1, 1, n)[torch.randperm(n, generator=g), None]
    return src, anchor
