"""safetensors dtype names <-> torch dtypes (torch imported only when asked)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rotfuse.core.errors import UsageError

if TYPE_CHECKING:
    import torch

# user-facing spellings accepted by --dtype flags
DTYPE_ALIASES = {
    "fp32": "F32",
    "float32": "F32",
    "f32": "F32",
    "fp16": "F16",
    "float16": "F16",
    "f16": "F16",
    "half": "F16",
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp64": "F64",
    "float64": "F64",
    "f64": "F64",
}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "U16": torch.uint16,
        "U32": torch.uint32,
        "U64": torch.uint64,
    }
    return table[name]


def parse_dtype_flag(value: str) -> str:
    """Turn a user's --dtype value (fp16, bfloat16, F32, ...) into a safetensors dtype name."""
    key = value.strip().lower()
    if key in DTYPE_ALIASES:
        return DTYPE_ALIASES[key]
    if value.upper() in set(DTYPE_ALIASES.values()):
        return value.upper()
    raise UsageError(f"unknown dtype {value!r} (use one of fp32, fp16, bf16, fp64)")
