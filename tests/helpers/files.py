"""Checkpoint folders as data (every file's digest and bytes, every tensor's value), leftovers of
staging, and hand-made damage to safetensors headers and JSON files."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rotfuse.io.checkpoint import Checkpoint


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, by name."""
    checkpoint = Checkpoint.open(folder)
    return {name: checkpoint.get(name) for name in checkpoint.names()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".rotfuse-tmp-", ".rotfuse-old-")))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def header_of(path: Path) -> tuple[str, bytes]:
    """A safetensors file's header text and its data buffer."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + length].decode("utf-8"), raw[8 + length :]


def write_header(path: Path, text: str | bytes, data: bytes) -> None:
    encoded = text.encode("utf-8") if isinstance(text, str) else text
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def edit_header(path: Path, change: Callable[[str], str | bytes]) -> None:
    """Rewrite a safetensors header through `change` (text in, text out), keeping the data."""
    text, data = header_of(path)
    write_header(path, change(text), data)


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
