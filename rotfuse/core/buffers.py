"""Per-thread buffers that large per-layer temporaries are written into, layer after layer.

A fresh tensor of tens of MiB is mapped anew by the allocator, and the kernel zeroes every page of
it before the first write -- with two worker threads faulting at once, a tenth of a 1B match's
CPU time. A buffer kept by the thread is written in place instead.
"""

from __future__ import annotations

import threading

import torch

_held = threading.local()  # per thread: name -> the buffer it keeps


def thread_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's buffer `name`, kept while its shape, dtype and device match (else replaced).
    Its contents are whatever was written last: use it before asking for it again."""
    held: dict[str, torch.Tensor] = _held.__dict__.setdefault("buffers", {})
    buffer = held.get(name)
    if buffer is None or tuple(buffer.shape) != tuple(shape) or buffer.dtype != dtype or buffer.device != device:
        held.pop(name, None)  # freed before the next is allocated
        buffer = held[name] = torch.empty(shape, dtype=dtype, device=device)
    return buffer


def held_buffer(name: str) -> torch.Tensor | None:
    """This thread's buffer `name`, if it holds one (for tests and diagnostics)."""
    return _held.__dict__.get("buffers", {}).get(name)
