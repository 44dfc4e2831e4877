"""The streaming loop behind `rotfuse match` and `rotfuse scramble`.

For each layer: read the model's (and the anchor's) tensors of that layer, transform them, write
them at their place in the output; then copy every untouched tensor byte for byte. At most one
layer of each checkpoint is in memory at a time. The output is staged and renamed into place only
when complete (io/staging.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rotfuse import __version__
from rotfuse.archs.layer_io import layer_tensor_names, read_layer, write_layer
from rotfuse.archs.spec import ALL_SYMMETRIES, BoundArch, LayerId, bind, select_spec
from rotfuse.errors import InputError, UsageError
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.io.staging import StagedFolder, check_output_location
from rotfuse.io.writer import CheckpointWriter, copy_side_files, plan_like
from rotfuse.matching import LayerSettings, match_layer, scramble_layer
from rotfuse.report import Distance, Timings, write_json
from rotfuse.symmetry.weights import LayerWeights

REPORT_NAME = "rotfuse_report.json"
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class MatchOptions:
    symmetries: frozenset[str] = ALL_SYMMETRIES
    layers: frozenset[int] | None = None  # None: every layer
    device: str = "auto"
    max_rounds: int = 20
    arch: str | None = None
    arch_spec: Path | None = None


@dataclass
class OpenedModel:
    """A checkpoint and its architecture spec bound to it."""

    checkpoint: Checkpoint
    bound: BoundArch

    @property
    def folder(self) -> Path:
        return self.checkpoint.folder


def open_model(path: Path, arch: str | None = None, arch_spec: Path | None = None) -> OpenedModel:
    checkpoint = Checkpoint.open(path)
    where = str(Path(path) / "config.json")
    spec = select_spec(checkpoint.config, arch, arch_spec, where=where)
    return OpenedModel(checkpoint, bind(spec, checkpoint.config, checkpoint, where=str(path)))


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"unknown --device {name!r} (use auto, cpu or cuda)")
    return name


def counterpart(name: str, model: OpenedModel, anchor: OpenedModel) -> str:
    """The anchor's name for a model tensor (their key prefixes may differ, e.g. bert. vs none)."""
    prefix = model.bound.prefix
    if prefix and name.startswith(prefix):
        return anchor.bound.prefix + name[len(prefix):]
    if not prefix and anchor.bound.prefix and not name.startswith(anchor.bound.prefix):
        candidate = anchor.bound.prefix + name
        if candidate in anchor.checkpoint:
            return candidate
    return name


def check_compatible(anchor: OpenedModel, model: OpenedModel) -> list[str]:
    """Refuse pairs that cannot be matched; return the names of model tensors without an anchor twin."""
    if anchor.bound.spec.name != model.bound.spec.name:
        raise InputError(
            f"{model.folder}: architecture {model.bound.spec.name!r} differs from the anchor's "
            f"{anchor.bound.spec.name!r}"
        )
    for stack, dims in model.bound.dims.items():
        theirs = anchor.bound.dims[stack]
        if dims != theirs:
            raise InputError(f"{model.folder}: config sizes {dims} differ from the anchor's {theirs}")
    unpaired = []
    for name in model.checkpoint.names():
        other = counterpart(name, model, anchor)
        if other not in anchor.checkpoint:
            unpaired.append(name)
            continue
        mine, theirs = model.checkpoint.entry(name).shape, anchor.checkpoint.entry(other).shape
        if mine != theirs:
            raise InputError(
                f"{model.folder}: tensor {name!r} has shape {list(mine)} but the anchor's {other!r} "
                f"has {list(theirs)}"
            )
    return unpaired


def select_layers(bound: BoundArch, wanted: frozenset[int] | None) -> list[LayerId]:
    layers = bound.layers()
    if wanted is None:
        return layers
    available = {layer.index for layer in layers}
    missing = sorted(wanted - available)
    if missing:
        raise UsageError(f"--layers: layer {missing[0]} does not exist (the model has layers 0-{max(available)})")
    return [layer for layer in layers if layer.index in wanted]


def layer_settings(bound: BoundArch, layer: LayerId, symmetries: frozenset[str], max_rounds: int) -> LayerSettings:
    return LayerSettings(
        symmetries=symmetries - bound.disabled,
        rotary_dim=bound.dims[layer.stack].rotary_dim,
        max_rounds=max_rounds,
    )


@dataclass
class _Stream:
    """Shared state of one streaming pass: timings and the tensors already handled."""

    timings: Timings = field(default_factory=Timings)
    handled: set[str] = field(default_factory=set)

    def timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings.add(stage, time.perf_counter() - start)


def _transform_layers(
    model: OpenedModel,
    writer: CheckpointWriter,
    layers: list[LayerId],
    device: str,
    transform: Callable[[LayerId, LayerWeights], LayerWeights],
    stream: _Stream,
    progress: Progress | None,
) -> None:
    for done, layer in enumerate(layers, start=1):
        weights = stream.timed("read", lambda: read_layer(model.checkpoint, model.bound, layer, device))
        new = transform(layer, weights)
        stream.timed("write", lambda: write_layer(writer, model.bound, layer, new))
        stream.handled.update(layer_tensor_names(model.bound, layer, model.checkpoint))
        if progress:
            progress(done, len(layers))


def _sq_distance(a: torch.Tensor, b: torch.Tensor, rows_per_chunk: int = 4096) -> float:
    """Squared distance without materialising a float64 copy of a large tensor."""
    if a.dim() == 0 or not a.is_floating_point():
        return float((a.double() - b.double()).pow(2).sum())
    total = 0.0
    for start in range(0, a.shape[0], rows_per_chunk):
        total += float((a[start:start + rows_per_chunk].float() - b[start:start + rows_per_chunk].float()).double().pow(2).sum())
    return total


def match(
    anchor_path: Path,
    model_path: Path,
    out: Path,
    options: MatchOptions,
    report_path: Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Align MODEL to ANCHOR and write it to OUT; returns the report."""
    started = time.perf_counter()
    check_output_location(out, [anchor_path, model_path], overwrite)
    device = resolve_device(options.device)
    anchor = open_model(anchor_path, options.arch, options.arch_spec)
    model = open_model(model_path, options.arch, options.arch_spec)
    unpaired = check_compatible(anchor, model)
    layers = select_layers(model.bound, options.layers)
    stream = _Stream()
    matched = Distance()
    rows: list[dict[str, Any]] = []

    def transform(layer: LayerId, weights: LayerWeights) -> LayerWeights:
        anchor_weights = stream.timed("read", lambda: read_layer(anchor.checkpoint, anchor.bound, layer, device))
        settings = layer_settings(model.bound, layer, options.symmetries, options.max_rounds)
        new, results = stream.timed("solve", lambda: match_layer(weights, anchor_weights, settings))
        modules = {}
        for result in results:
            matched.add(result.before**2, result.after**2, 0)
            modules[result.module] = {
                "before": result.before, "after": result.after, "reduction": result.reduction,
                "applied": result.applied, "rounds": result.rounds, "reverted": result.reverted,
            }
        rows.append({"layer": str(layer), "modules": modules})
        return new

    with StagedFolder(out, overwrite) as staged:
        writer = CheckpointWriter(staged.path, plan_like(model.checkpoint), model.checkpoint)
        try:
            _transform_layers(model, writer, layers, device, transform, stream, progress)
            matched.tensors = len(stream.handled)
            whole = Distance(matched.before, matched.after, matched.tensors)
            for name in model.checkpoint.names():
                if name in stream.handled or name in unpaired:
                    continue
                sq = stream.timed("read", lambda: _sq_distance(
                    model.checkpoint.get(name), anchor.checkpoint.get(counterpart(name, model, anchor))))
                whole.add(sq, sq)
            stream.timed("copy", writer.finish)
        finally:
            writer.abort()
        skipped = copy_side_files(model.checkpoint, staged.path)
        report = {
            "tool": "rotfuse", "version": __version__, "schema": 1, "command": "match",
            "created_by": sys.argv,
            "anchor": {"path": str(anchor_path), "fingerprint": anchor.checkpoint.fingerprint()},
            "model": {"path": str(model_path), "fingerprint": model.checkpoint.fingerprint()},
            "output": {"path": str(out)},
            "arch": model.bound.spec.name,
            "symmetries": sorted(options.symmetries),
            "device": device,
            "settings": {"max_rounds": options.max_rounds,
                         "layers": [str(layer) for layer in layers]},
            "restrictions": model.bound.notes,
            "layers": rows,
            "totals": {"matched": matched.as_dict(), "model": whole.as_dict()},
            "unpaired_tensors": unpaired,
            "not_copied": skipped,
            "timings": {},
        }
        report["output"]["fingerprint"] = Checkpoint.open(staged.path).fingerprint()
        stream.timings.add("total", time.perf_counter() - started)
        report["timings"] = stream.timings.as_dict()
        if report_path is None:
            write_json(staged.path / REPORT_NAME, report)
        staged.commit()
    if report_path is not None:
        write_json(report_path, report)
    return report


def scramble(
    model_path: Path,
    out: Path,
    options: MatchOptions,
    seed: int,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write a copy of MODEL moved by a random member of the symmetry group (same function)."""
    check_output_location(out, [model_path], overwrite)
    device = resolve_device(options.device)
    model = open_model(model_path, options.arch, options.arch_spec)
    layers = select_layers(model.bound, options.layers)
    generator = torch.Generator().manual_seed(seed)
    stream = _Stream()

    def transform(layer: LayerId, weights: LayerWeights) -> LayerWeights:
        settings = layer_settings(model.bound, layer, options.symmetries, options.max_rounds)
        return scramble_layer(weights, settings, generator)

    with StagedFolder(out, overwrite) as staged:
        writer = CheckpointWriter(staged.path, plan_like(model.checkpoint), model.checkpoint)
        try:
            _transform_layers(model, writer, layers, device, transform, stream, progress)
            writer.finish()
        finally:
            writer.abort()
        copy_side_files(model.checkpoint, staged.path)
        staged.commit()
    return {
        "tool": "rotfuse", "version": __version__, "command": "scramble", "model": str(model_path),
        "output": str(out), "arch": model.bound.spec.name, "seed": seed,
        "symmetries": sorted(options.symmetries - model.bound.disabled),
        "layers": [str(layer) for layer in layers], "restrictions": model.bound.notes,
    }
