"""The statistics folder written by `rotfuse stats` and read by `rotfuse merge`.

A folder holds `stats.safetensors` (the tensors) and `rotfuse_stats.json` (the manifest). Every
tensor is keyed by the checkpoint's own on-disk tensor names, never by a live model's module
names (transformers 5 renames some modules in memory):

- kind `fisher`: one tensor per parameter under the parameter's name (tied names each get a copy);
- kind `regmean`: one Gram matrix per distinct linear-layer input, named `input_gram:<first
  reader>`; the manifest's `linear` maps every linear weight to its Gram and its layout
  (`out_in` for nn.Linear, `in_out` for GPT-2's Conv1D), so q/k/v share one Gram.

The manifest also records the checkpoint's fingerprint (`Checkpoint.fingerprint()`, which tells
a checkpoint from its matched copy): statistics only hold for the exact weights they were
computed on, and `merge` refuses any other pairing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rotfuse.core.errors import InputError

if TYPE_CHECKING:
    import torch

STATS_FILE = "stats.safetensors"
MANIFEST_FILE = "rotfuse_stats.json"
KINDS = ("fisher", "regmean")
GRAM_PREFIX = "input_gram:"
SCHEMA = 1


@dataclass(frozen=True)
class LinearInput:
    """Which Gram matrix a linear weight reads, and how the weight is stored."""

    gram: str
    layout: str  # out_in (nn.Linear) or in_out (Conv1D)


@dataclass
class StatsFolder:
    """One statistics folder, opened lazily: the manifest now, tensors one at a time."""

    folder: Path
    manifest: dict[str, Any]
    names: frozenset[str]
    _handle: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, folder: str | Path) -> StatsFolder:
        folder = Path(folder)
        manifest_path = folder / MANIFEST_FILE
        if not folder.is_dir():
            raise InputError(f"{folder}: no such statistics folder")
        if not manifest_path.exists():
            hint = " (it looks like a checkpoint; statistics come from `rotfuse stats`)" if (folder / "config.json").exists() else ""
            raise InputError(f"{folder}: not a statistics folder, {MANIFEST_FILE} is missing{hint}")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{manifest_path}: cannot parse ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("kind") not in KINDS:
            raise InputError(f"{manifest_path}: not a rotfuse statistics manifest (kind must be one of {', '.join(KINDS)})")
        if not isinstance(manifest.get("checkpoint", {}).get("fingerprint"), str):
            raise InputError(f"{manifest_path}: records no checkpoint fingerprint")
        try:
            from safetensors import safe_open

            handle = safe_open(str(folder / STATS_FILE), framework="pt", device="cpu")
            names = frozenset(handle.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise InputError(f"{folder / STATS_FILE}: cannot open ({exc})") from exc
        stats = cls(folder, manifest, names, handle)
        missing = sorted(stats._referenced() - names)
        if missing:
            raise InputError(f"{folder / STATS_FILE}: tensor {missing[0]!r} named in {MANIFEST_FILE} is missing")
        return stats

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["checkpoint"]["fingerprint"])

    @property
    def source(self) -> str:
        """The checkpoint folder the statistics were computed on, as recorded."""
        return str(self.manifest["checkpoint"].get("path", "?"))

    def linear_input(self, weight: str) -> LinearInput | None:
        """The Gram matrix a linear weight reads (regmean statistics), or None for other tensors."""
        entry = (self.manifest.get("linear") or {}).get(weight)
        return None if entry is None else LinearInput(str(entry["gram"]), str(entry["layout"]))

    def has(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor; NaN, Inf or (for Fisher) negative values are refused with its name."""
        try:
            tensor = self._handle.get_tensor(name)
        except Exception as exc:
            raise InputError(f"{self.folder / STATS_FILE}: cannot read tensor {name!r} ({exc})") from exc
        if not bool(tensor.isfinite().all()):
            raise InputError(f"{self.folder / STATS_FILE}: tensor {name!r} holds NaN or Inf values")
        if self.kind == "fisher" and bool((tensor < 0).any()):
            raise InputError(f"{self.folder / STATS_FILE}: Fisher {name!r} has negative values")
        return tensor

    def squared_norm(self) -> float:
        """Sum of squares over every tensor (one at a time): for `--fisher-normalize`."""
        return sum(float(self.get(name).double().pow(2).sum()) for name in sorted(self.names))

    def _referenced(self) -> set[str]:
        if self.kind == "regmean":
            return {str(entry["gram"]) for entry in (self.manifest.get("linear") or {}).values()}
        return set()


def write_stats(folder: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Write the tensors and the manifest into `folder` (a staging folder)."""
    from safetensors.torch import save_file

    from rotfuse.core.report import write_json

    try:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(folder / STATS_FILE),
                  metadata={"format": "pt", "rotfuse_kind": str(manifest["kind"])})
    except OSError as exc:
        from rotfuse.core.errors import OutputError

        raise OutputError(f"{folder / STATS_FILE}: cannot write ({exc.strerror or exc})") from exc
    write_json(folder / MANIFEST_FILE, manifest)
