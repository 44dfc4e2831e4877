"""Reading `pytorch_model*.bin` checkpoints without ever executing their pickles.

`torch.load(weights_only=True)` only rebuilds tensors and plain containers; a pickle that asks for
anything else (the way malicious checkpoints run code) is refused, and so is the file. Tensors are
memory-mapped where the file format allows it. Output is always written as safetensors, with the
shard names mapped (pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from rotfuse.core.errors import InputError
from rotfuse.io.safetensors_file import ShardHeader, TensorEntry

if TYPE_CHECKING:
    import torch

BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"


def safetensors_name(file_name: str) -> str:
    """The safetensors file that stands in for a pickled shard in rotfuse's output."""
    if not file_name.endswith(".bin"):
        return file_name
    return re.sub(r"^pytorch_model", "model", file_name)[: -len(".bin")] + ".safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    from rotfuse.io.dtypes import torch_dtype

    for name in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"):
        if torch_dtype(name) == dtype:
            return name
    raise KeyError(str(dtype))


def read_bin_shard(path: Path) -> tuple[ShardHeader, dict[str, torch.Tensor]]:
    """Load one pickled shard safely; return a header-like view of it and its tensors."""
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the error says enough
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?i)unsupported (?:global:? )?GLOBAL \S+|unsupported [^\n.]*", str(exc))
        detail = found.group(0) if found else type(exc).__name__
        raise InputError(
            f"{path}: refused to load: the pickle holds more than plain tensors ({detail}); "
            "rotfuse never runs code from checkpoints"
        ) from exc
    except Exception as exc:  # truncated zip, not a pickle, ...
        raise InputError(f"{path}: cannot read pickled checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    entries = {}
    for name, tensor in state.items():
        try:
            dtype = dtype_name(tensor.dtype)
        except KeyError:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {tensor.dtype}") from None
        entries[name] = TensorEntry(name, dtype, tuple(tensor.shape), -1, -1)  # no byte range: not raw-copyable
    return ShardHeader(path, 0, entries), state
