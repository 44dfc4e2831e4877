"""Tiny Hugging Face models built from configs with random weights, saved as checkpoint folders.

One entry per architecture family in TINY; tests pick by name. Weights use a large init range so
attention is far from uniform and a broken symmetry shows up in the outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Tiny:
    config: Callable[..., Any]  # **overrides -> transformers config
    model: str  # transformers class name


def _bert(**kw: Any) -> Any:
    from transformers import BertConfig

    base = dict(vocab_size=61, hidden_size=30, num_hidden_layers=2, num_attention_heads=3,
                intermediate_size=37, max_position_embeddings=32, initializer_range=0.25, num_labels=3)
    return BertConfig(**{**base, **kw})


def _roberta(**kw: Any) -> Any:
    from transformers import RobertaConfig

    base = dict(vocab_size=61, hidden_size=30, num_hidden_layers=2, num_attention_heads=5,
                intermediate_size=23, max_position_embeddings=40, initializer_range=0.25, num_labels=2)
    return RobertaConfig(**{**base, **kw})


def _vit(**kw: Any) -> Any:
    from transformers import ViTConfig

    base = dict(image_size=12, patch_size=4, num_channels=3, hidden_size=24, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=29, initializer_range=0.25, num_labels=5)
    return ViTConfig(**{**base, **kw})


TINY: dict[str, Tiny] = {
    "bert": Tiny(_bert, "BertForSequenceClassification"),
    "bert-bare": Tiny(_bert, "BertModel"),
    "roberta": Tiny(_roberta, "RobertaForSequenceClassification"),
    "vit": Tiny(_vit, "ViTForImageClassification"),
    "vit-bare": Tiny(_vit, "ViTModel"),
}


def build(name: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    import transformers

    entry = TINY[name]
    torch.manual_seed(seed)
    return getattr(transformers, entry.model)(entry.config(**overrides)).eval()


def save_tiny(name: str, folder: Path, seed: int = 0, dtype: torch.dtype | None = None,
              max_shard_size: str | None = None, **overrides: Any) -> Path:
    """Build a tiny model and save it as a checkpoint folder (optionally cast and sharded)."""
    model = build(name, seed, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    return Path(folder)
