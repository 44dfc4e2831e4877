"""The safetensors file format, read and written by hand.

Why not only `safetensors.torch.save_file`: it needs every tensor of a file in memory at once.
rotfuse writes the header first (names, dtypes and shapes are known before any value is) and then
each tensor's bytes at its offset as soon as it is ready, so memory stays at one layer. Parsing the
header ourselves also lets us reject a truncated or corrupt file with a precise message before any
work is done. Format: 8-byte little-endian header length N, N bytes of JSON, then the data buffer.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rotfuse.core.errors import InputError
from rotfuse.io.untrusted import parse_json, require_int

# safetensors dtype name -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})  # what rotfuse computes with
FLOAT8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})  # quantized: checked through float32, never merged
FLOATING_DTYPES = FLOAT_DTYPES | FLOAT8_DTYPES  # what can hold NaN or Inf
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
ALIGNMENT = 8


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a shard file. `begin`/`end` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ShardHeader:
    """The parsed header of one .safetensors file, tensors in file order."""

    path: Path
    data_start: int
    entries: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: Path) -> ShardHeader:
    """Parse and validate a safetensors header without reading any tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise InputError(
                    f"{path}: corrupt or truncated safetensors file (header says {header_len} bytes, file has {size})"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    header = parse_json(raw, path, "safetensors header", problem="corrupt")
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")

    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    entries = [_parse_entry(path, name, info, data_start, size) for name, info in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    for before, after in zip(entries, entries[1:]):
        if after.begin < before.end:
            raise InputError(
                f"{path}: corrupt safetensors header (tensors {before.name!r} and {after.name!r} share bytes)"
            )
    return ShardHeader(path, data_start, {e.name: e for e in entries}, dict(metadata))


def _parse_entry(path: Path, name: str, info: object, data_start: int, size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise InputError(f"{path}: corrupt safetensors header entry for tensor {name!r}")
    dtype = info.get("dtype")
    if not isinstance(dtype, str):
        raise InputError(f"{where}: dtype must be a string, got {dtype!r}"[:300])
    if dtype not in DTYPE_SIZES:
        raise InputError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        raise InputError(
            f"{path}: corrupt safetensors header entry for tensor {name!r} (shape and data_offsets must be lists)"
        )
    dims = tuple(require_int(d, where, "shape") for d in shape)
    begin, end = (require_int(o, where, "data_offsets") for o in offsets)
    if end - begin != math.prod(dims) * DTYPE_SIZES[dtype]:
        raise InputError(f"{path}: tensor {name!r}: byte range does not match shape {list(dims)}")
    if data_start + end > size:
        raise InputError(f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end}, file has {size}")
    return TensorEntry(name, dtype, dims, data_start + begin, data_start + end)


def encode_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (length prefix included) for tensors laid out back to back in the given order.

    Returns the bytes and each tensor's absolute (begin, end) file offsets.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    relative: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        relative[name] = (offset, offset + nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % ALIGNMENT)
    data_start = 8 + len(raw)
    absolute = {name: (data_start + b, data_start + e) for name, (b, e) in relative.items()}
    return struct.pack("<Q", len(raw)) + raw, absolute


def copy_byte_range(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, length: int) -> None:
    """Copy bytes between two open files without passing them through Python objects."""
    chunk = 64 * 1024 * 1024
    done = 0
    while done < length:
        count = min(chunk, length - done)
        try:
            copied = os.copy_file_range(src_fd, dst_fd, count, src_offset + done, dst_offset + done)
        except (AttributeError, OSError):
            data = os.pread(src_fd, count, src_offset + done)
            copied = os.pwrite(dst_fd, data, dst_offset + done)
        if copied <= 0:
            raise OSError(f"short copy at byte {src_offset + done}")
        done += copied


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing a byte range to disk now, without waiting for it (Linux's
    sync_file_range; a no-op elsewhere). Otherwise dirty pages wait for their shard's fsync, and
    the last shards' fsyncs write hundreds of MB after all the work is done."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE; a failure is left to fsync


def _load_sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()
