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

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rotfuse.core.errors import InputError
from rotfuse.io.safetensors_file import FLOAT_DTYPES
from rotfuse.io.untrusted import read_json_object, require_object, require_text

if TYPE_CHECKING:
    import torch

STATS_FILE = "stats.safetensors"
MANIFEST_FILE = "rotfuse_stats.json"
KINDS = ("fisher", "regmean")
GRAM_PREFIX = "input_gram:"
SCHEMA = 1
LAYOUTS = ("out_in", "in_out")
MAX_GRAM = 1e20  # larger entries mean inputs of size 1e10: a corrupt file


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
            hint = (
                " (it looks like a checkpoint; statistics come from `rotfuse stats`)"
                if (folder / "config.json").exists()
                else ""
            )
            raise InputError(f"{folder}: not a statistics folder, {MANIFEST_FILE} is missing{hint}")
        manifest = read_json_object(manifest_path, "statistics manifest")
        _check_manifest(manifest, manifest_path)
        try:
            from safetensors import safe_open

            handle = safe_open(str(folder / STATS_FILE), framework="pt", device="cpu")
            names = frozenset(handle.keys())
            dtypes = {name: handle.get_slice(name).get_dtype() for name in names}
        except Exception as exc:  # safetensors raises its own error types
            raise InputError(f"{folder / STATS_FILE}: cannot open ({exc})") from exc
        for name, dtype in sorted(dtypes.items()):
            if dtype not in FLOAT_DTYPES:
                raise InputError(
                    f"{folder / STATS_FILE}: tensor {name!r} is {dtype}; statistics are floating point "
                    "(F32, F16, BF16 or F64)"
                )
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
        where = f"{self.folder / STATS_FILE}: tensor {name!r}"
        if not bool(tensor.isfinite().all()):
            raise InputError(f"{where} holds NaN or Inf values")
        if self.kind == "fisher" and bool((tensor < 0).any()):
            raise InputError(f"{self.folder / STATS_FILE}: Fisher {name!r} has negative values")
        if self.kind == "regmean" and name.startswith(GRAM_PREFIX):
            _check_gram(tensor, where)
        return tensor

    def squared_norm(self) -> float:
        """Sum of squares over every tensor (one at a time): for `--fisher-normalize`."""
        return sum(float(self.get(name).double().pow(2).sum()) for name in sorted(self.names))

    def _referenced(self) -> set[str]:
        if self.kind == "regmean":
            return {str(entry["gram"]) for entry in (self.manifest.get("linear") or {}).values()}
        return set()


def _check_manifest(manifest: dict[str, Any], where: Path) -> None:
    """The manifest's shape, field by field, so that merge never trips over it mid-run."""
    if manifest.get("kind") not in KINDS:
        raise InputError(f"{where}: not a rotfuse statistics manifest (kind must be one of {', '.join(KINDS)})")
    checkpoint = manifest.get("checkpoint")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("fingerprint"), str):
        raise InputError(f"{where}: records no checkpoint fingerprint")
    linear = manifest.get("linear")
    if linear is None:
        return
    require_object(linear, where, "linear")
    for weight, entry in linear.items():
        field = f"linear[{weight!r}]"
        require_object(entry, where, field)
        require_text(entry.get("gram"), where, f"{field}.gram")
        if entry.get("layout") not in LAYOUTS:
            raise InputError(
                f"{where}: {field}.layout must be one of {', '.join(LAYOUTS)}, got {entry.get('layout')!r}"
            )


def _check_gram(gram: torch.Tensor, where: str) -> None:
    """A Gram matrix X^T X / n is square, symmetric, has a non-negative diagonal, is bounded by it
    (|G_ij| <= sqrt(G_ii G_jj)) and is not zero; entries beyond MAX_GRAM (inputs of size 1e10,
    which no network computes) mean a corrupt file. Anything else is refused by name: merged
    silently, a degenerate Gram decides a layer's weights."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise InputError(f"{where} is not a square matrix ({list(gram.shape)}), so not a Gram matrix")
    g = gram.double()
    scale = float(g.abs().max()) if g.numel() else 0.0
    if scale == 0.0:
        raise InputError(f"{where} is all zero: the layer saw no nonzero input, so RegMean has nothing to weigh")
    if scale > MAX_GRAM:
        raise InputError(f"{where} has entries up to {scale:.3g} (inputs of size {scale**0.5:.3g}): corrupt statistics")
    diagonal = g.diagonal()
    tolerance = 1e-3 * scale
    bound = (diagonal.clamp_min(0).unsqueeze(0) * diagonal.clamp_min(0).unsqueeze(1)).sqrt()
    if (
        bool((diagonal < -tolerance).any())
        or bool(((g - g.T).abs() > tolerance).any())
        or bool((g.abs() > bound * (1 + 1e-3) + tolerance).any())
    ):
        raise InputError(
            f"{where} is not a Gram matrix (not symmetric, a negative diagonal, or entries "
            "beyond their diagonal's bound): corrupt statistics"
        )


def write_stats(folder: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Write the tensors and the manifest into `folder` (a staging folder), through the same
    streaming writer as checkpoints: a full disk is an OutputError naming the file, and the
    tensors are flushed with the folder."""
    from rotfuse.io.pickled import dtype_name
    from rotfuse.io.staging import write_json
    from rotfuse.io.writer import CheckpointWriter, ShardPlan

    plan = ShardPlan(
        STATS_FILE,
        [(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()],
        {"format": "pt", "rotfuse_kind": str(manifest["kind"])},
    )
    writer = CheckpointWriter(folder, [plan])
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.finish()
    finally:
        writer.abort()
    write_json(folder / MANIFEST_FILE, manifest)
