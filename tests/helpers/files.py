"""Checkpoint folders as data: every file's digest, every tensor's value."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from rotfuse.io.checkpoint import Checkpoint


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, by name."""
    checkpoint = Checkpoint.open(folder)
    return {name: checkpoint.get(name) for name in checkpoint.names()}
