"""Which torch device a command runs on."""

from __future__ import annotations

import torch

from rotfuse.core.errors import UsageError


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"unknown --device {name!r} (use auto, cpu or cuda)")
    return name
