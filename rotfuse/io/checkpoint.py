"""Lazy, read-only access to a Hugging Face checkpoint folder.

A checkpoint is a folder with `config.json` and either one `model.safetensors` or shards listed by
`model.safetensors.index.json`. Opening one parses and validates every shard header (cheap) but
reads no tensor data; `get` reads one tensor at a time through `safetensors.safe_open`, so a
command's memory is bounded by what it holds, never by the model's size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rotfuse.core.errors import InputError
from rotfuse.core.tensors import all_finite
from rotfuse.io.pickled import BIN_FILE, BIN_INDEX_FILE, read_bin_shard
from rotfuse.io.safetensors_file import FLOAT8_DTYPES, ShardHeader, TensorEntry, read_header
from rotfuse.io.untrusted import read_json_object, require_text

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """One checkpoint folder: its config, its shard headers and where every tensor lives."""

    folder: Path
    config: dict[str, Any]
    shards: list[ShardHeader]
    index: dict[str, Any] | None = None
    allow_nonfinite: bool = False
    _shard_of: dict[str, int] = field(default_factory=dict, repr=False)
    _pickled: dict[str, Any] = field(default_factory=dict, repr=False)  # .bin tensors (memory-mapped)
    _finite: set[str] = field(default_factory=set, repr=False, compare=False)  # stored values checked finite

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, folder: str | Path, allow_nonfinite: bool = False) -> Checkpoint:
        """Validate the folder and every shard header; read no tensor data.

        NaN or Inf values are refused when a tensor is read, unless `allow_nonfinite`.
        """
        folder = Path(folder)
        if not folder.exists():
            raise InputError(f"{folder}: no such checkpoint folder")
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder (expected a checkpoint folder with config.json)")
        config = _read_json(folder / CONFIG_FILE, what="config")
        pickled: dict[str, Any] = {}
        if (folder / INDEX_FILE).exists():
            index = _read_json(folder / INDEX_FILE, what="shard index")
            shards = [read_header(folder / name) for name in _shard_files_from_index(folder, index)]
        elif (folder / SINGLE_FILE).exists():
            index, shards = None, [read_header(folder / SINGLE_FILE)]
        elif (folder / BIN_INDEX_FILE).exists() or (folder / BIN_FILE).exists():
            index = (
                _read_json(folder / BIN_INDEX_FILE, what="shard index") if (folder / BIN_INDEX_FILE).exists() else None
            )
            shards = []
            for name in _shard_files_from_index(folder, index, BIN_INDEX_FILE) if index else [BIN_FILE]:
                shard, tensors = read_bin_shard(folder / name)
                shards.append(shard)
                pickled.update(tensors)
        else:
            raise InputError(f"{folder}: no weights found (expected {SINGLE_FILE}, {INDEX_FILE} or {BIN_FILE})")

        checkpoint = cls(folder, config, shards, index, allow_nonfinite, _pickled=pickled)
        for number, shard in enumerate(shards):
            for name in shard.entries:
                if name in checkpoint._shard_of:
                    other = shards[checkpoint._shard_of[name]].path.name
                    raise InputError(f"{folder}: tensor {name!r} appears in both {other} and {shard.path.name}")
                checkpoint._shard_of[name] = number
        if index is not None:
            _check_index_against_shards(folder, index, checkpoint)
        return checkpoint

    # ------------------------------------------------------------------ queries
    def names(self) -> list[str]:
        """Every tensor name, in shard order then file order."""
        return [name for shard in self.shards for name in shard.entries]

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def entry(self, name: str) -> TensorEntry:
        return self.shard_of(name).entries[name]

    def shard_of(self, name: str) -> ShardHeader:
        try:
            return self.shards[self._shard_of[name]]
        except KeyError:
            raise InputError(f"{self.folder}: tensor {name!r} not found in the checkpoint") from None

    @property
    def weight_files(self) -> list[str]:
        """File names (relative to the folder) that hold weights or the shard index."""
        files = [shard.path.name for shard in self.shards]
        if self.index is not None:
            files.append(BIN_INDEX_FILE if self.pickled else INDEX_FILE)
        return files

    @property
    def pickled(self) -> bool:
        """True for pytorch_model*.bin checkpoints (no byte ranges to copy raw)."""
        return bool(self._pickled) or any(shard.path.suffix == ".bin" for shard in self.shards)

    def float8_tensors(self) -> list[str]:
        """Tensors stored as float8 (quantized): checked and copied, never averaged."""
        return [name for shard in self.shards for name, e in shard.entries.items() if e.dtype in FLOAT8_DTYPES]

    def refuse_float8(self, name: str, doing: str) -> None:
        """Quantized float8 tensors are checked and copied byte for byte, but never averaged or
        interpolated: a float8 weight usually comes with scales that would have to be reconciled."""
        dtype = self.entry(name).dtype
        if dtype in FLOAT8_DTYPES:
            raise InputError(
                f"{self.shard_of(name).path}: tensor {name!r} is float8 ({dtype}); rotfuse does not "
                f"{doing} quantized tensors (their scales would have to be reconciled): dequantize first"
            )

    def check_values(self) -> None:
        """Read every tensor once, refusing NaN/Inf (unless allowed) with the tensor's name."""
        for name in self.names():
            self.get(name)

    @property
    def num_parameters(self) -> int:
        return sum(entry.numel for shard in self.shards for entry in shard.entries.values())

    # ------------------------------------------------------------------ reading
    def get(self, name: str, device: str = "cpu", check: bool = True) -> torch.Tensor:
        """Read one tensor, in its stored dtype, on `device`. It is the caller's own: on the CPU
        it maps the file copy-on-write, so even writes to it never reach the file.

        NaN/Inf are refused unless the checkpoint allows them. `check=False` leaves that to a
        caller that checks a result every input flows into (see `refuse_nonfinite`)."""
        number = self._shard_of.get(name)
        if number is None:
            raise InputError(f"{self.folder}: tensor {name!r} not found in the checkpoint")
        tensor = self._pickled[name].clone() if name in self._pickled else self._read(number, name)
        if check:
            self.refuse_nonfinite(name, tensor)
        return tensor if device == "cpu" else tensor.to(device)

    def refuse_nonfinite(self, name: str, tensor: torch.Tensor) -> None:
        """Refuse `tensor`, tensor `name`'s stored values, if it holds NaN or Inf (unless allowed)."""
        if not self.allow_nonfinite and not all_finite(tensor):
            raise InputError(
                f"{self.shard_of(name).path}: tensor {name!r} contains NaN or Inf values "
                "(pass --allow-nonfinite to accept them)"
            )
        self._finite.add(name)

    def ensure_finite(self, name: str) -> None:
        """`refuse_nonfinite` for a tensor that is not read otherwise (copied as bytes): read and
        checked now, unless this checkpoint checked it already -- a layer's tensors are, when the
        layer is read -- or allows NaN/Inf."""
        if not self.allow_nonfinite and name not in self._finite:
            self.get(name)

    def _read(self, number: int, name: str) -> torch.Tensor:
        """One tensor through a `safe_open` handle opened for this read alone.

        The tensor maps the file copy-on-write, and the mapping lives exactly as long as the
        tensor: a handle kept open for the whole run would keep every page ever read mapped, and
        the process's resident memory would grow to the size of the checkpoint.
        """
        from safetensors import safe_open

        path = self.shards[number].path
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types
            raise InputError(f"{path}: cannot read tensor {name!r} ({exc})") from exc

    def fingerprint(self) -> str:
        """A content hash that tells this checkpoint from any transformed copy of it.

        Headers alone cannot: matching changes values, never names, dtypes or shapes. So besides
        every header entry it hashes 16 evenly spaced 64-byte windows of every tensor's data --
        cheap on a multi-GB model, and any symmetry applied to a tensor changes its windows.
        """
        windows: dict[str, bytes] = {}
        for name, tensor in self._pickled.items():
            import torch

            raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            windows[name] = f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode() + hashlib.sha256(raw).digest()
        for shard in (s for s in self.shards if s.path.suffix != ".bin"):
            fd = os.open(shard.path, os.O_RDONLY)
            try:
                for name, entry in shard.entries.items():
                    width = min(64, entry.nbytes)
                    count = min(16, entry.nbytes // width) if width else 0
                    step = (entry.nbytes - width) // max(count - 1, 1)
                    sample = b"".join(os.pread(fd, width, entry.begin + k * step) for k in range(count))
                    windows[name] = f"{name}|{entry.dtype}|{list(entry.shape)}|".encode() + sample
            finally:
                os.close(fd)
        digest = hashlib.sha256()
        for name in sorted(windows):
            digest.update(windows[name])
        return digest.hexdigest()[:32]

    def close(self) -> None:
        """Nothing stays open between reads; kept so a Checkpoint works as a context manager."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.exists():
        raise InputError(f"{path}: missing {what} file")
    return read_json_object(path, what)


def read_config(folder: Path) -> dict[str, Any]:
    """A checkpoint's config.json, parsed as every untrusted JSON file is (io/untrusted.py)."""
    return _read_json(Path(folder) / CONFIG_FILE, what="config")


def _shard_files_from_index(folder: Path, index: dict[str, Any], name: str = INDEX_FILE) -> list[str]:
    """The shard files an index names, after checking its shape: `weight_map` maps tensor names
    to plain file names in the folder, `metadata` (optional) is an object."""
    where = folder / name
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{where}: no weight_map in the shard index")
    if not isinstance(index.get("metadata", {}), dict):
        raise InputError(f"{where}: metadata must be a JSON object")
    for tensor, file in weight_map.items():
        require_text(file, where, f"weight_map[{tensor!r}]")
        if not file or Path(file).name != file or file in (".", ".."):
            raise InputError(f"{where}: weight_map[{tensor!r}] = {file!r} is not a file name in the checkpoint folder")
    files = sorted(set(weight_map.values()))
    for file in files:
        if not (folder / file).is_file():
            raise InputError(f"{where}: names shard {file!r}, which does not exist")
    return files


def _check_index_against_shards(folder: Path, index: dict[str, Any], checkpoint: Checkpoint) -> None:
    for name, file in index["weight_map"].items():
        where = checkpoint._shard_of.get(name)
        if where is None or checkpoint.shards[where].path.name != file:
            raise InputError(f"{folder / INDEX_FILE}: tensor {name!r} is listed in {file} but not found there")
