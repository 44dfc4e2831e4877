"""Which torch device a command runs on."""

from __future__ import annotations

import torch

from rotfuse.core.errors import UsageError


def resolve_device(name: str) -> str:
    """auto, cpu, cuda or cuda:N -> a device torch has here; anything else is a usage error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    kind, _, number = name.partition(":")
    if kind != "cuda" or (number and not number.isdigit()):
        raise UsageError(f"unknown --device {name!r} (use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available (use --device cpu or auto)")
    if number and int(number) >= torch.cuda.device_count():
        raise UsageError(
            f"--device {name}: there is no such CUDA device (this machine has "
            f"{torch.cuda.device_count()}: cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    return name
