"""The streaming loop behind `rotfuse match` and `rotfuse scramble`.

For each layer: read the model's (and the anchor's) tensors of that layer, transform them, write
them at their place in the output; then copy every untouched tensor byte for byte. At most one
layer of each checkpoint is in memory at a time. The output is staged and renamed into place only
when complete (io/staging.py).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from rotfuse import __version__
from rotfuse.archs.layer_io import check_layer_pair, layer_tensor_names, read_layer, write_layer
from rotfuse.archs.spec import BoundArch, LayerId, bind, select_spec
from rotfuse.symmetries import ALL_SYMMETRIES
from rotfuse.errors import InputError, UsageError
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.io.staging import StagedFolder, check_output_location
from rotfuse.io.writer import CheckpointWriter, copy_side_files, plan_like
from rotfuse.matching import LayerSettings, match_layer, scramble_layer
from rotfuse.report import Distance, Timings, write_json
from rotfuse.symmetry.weights import LayerWeights

REPORT_NAME = "rotfuse_report.json"
Progress = Callable[[int, int], None]
T = TypeVar("T")
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class MatchOptions:
    symmetries: frozenset[str] = ALL_SYMMETRIES
    layers: frozenset[int] | None = None  # None: every layer
    device: str = "auto"
    max_rounds: int = 20
    arch: str | None = None
    arch_spec: Path | None = None
    allow_nonfinite: bool = False
    workers: int = DEFAULT_WORKERS  # layers read and solved concurrently


@dataclass
class OpenedModel:
    """A checkpoint and its architecture spec bound to it."""

    checkpoint: Checkpoint
    bound: BoundArch

    @property
    def folder(self) -> Path:
        return self.checkpoint.folder


def open_model(path: Path, arch: str | None = None, arch_spec: Path | None = None,
               allow_nonfinite: bool = False) -> OpenedModel:
    checkpoint = Checkpoint.open(path, allow_nonfinite=allow_nonfinite)
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
    for layer in model.bound.layers():
        check_layer_pair(model.checkpoint, model.bound, anchor.checkpoint, anchor.bound, layer)
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
    """Shared state of one streaming pass: timings (summed over worker threads) and the tensors
    already handled."""

    timings: Timings = field(default_factory=Timings)
    handled: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            with self.lock:
                self.timings.add(stage, time.perf_counter() - start)


def _transform_layers(
    model: OpenedModel,
    writer: CheckpointWriter,
    layers: list[LayerId],
    device: str,
    transform: Callable[[LayerId, LayerWeights], tuple[LayerWeights, T]],
    stream: _Stream,
    progress: Progress | None,
    workers: int,
) -> list[T]:
    """Read and transform layers in a small thread pool, write them in order on this thread.

    Reading (safetensors), torch math and scipy's assignment solver all release the GIL, so with
    `workers` threads one layer's I/O overlaps another's solve and independent layers' FFN
    assignments run concurrently. At most `workers + 1` layers are in flight: memory stays a few
    layers whatever the depth. Returns each layer's extra result, in layer order.
    """

    def job(layer: LayerId) -> tuple[LayerWeights, T]:
        weights = stream.timed("read", lambda: read_layer(model.checkpoint, model.bound, layer, device))
        return transform(layer, weights)

    extras: list[T] = []
    pending: deque[tuple[LayerId, Future]] = deque()

    def finish_oldest() -> None:
        layer, future = pending.popleft()
        new, extra = future.result()
        stream.timed("write", lambda: write_layer(writer, model.bound, layer, new))
        stream.handled.update(layer_tensor_names(model.bound, layer, model.checkpoint))
        extras.append(extra)
        if progress:
            progress(len(extras), len(layers))

    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="rotfuse-layer")
    try:
        for layer in layers:
            pending.append((layer, pool.submit(job, layer)))
            if len(pending) > workers:
                finish_oldest()
        while pending:
            finish_oldest()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return extras


def _sq_distance(a: torch.Tensor, b: torch.Tensor, rows_per_chunk: int = 4096) -> float:
    """Squared distance without materialising a float64 copy of a large tensor."""
    if a.dim() == 0 or not a.is_floating_point():
        return float((a.double() - b.double()).pow(2).sum())
    total = 0.0
    for start in range(0, a.shape[0], rows_per_chunk):
        total += float((a[start:start + rows_per_chunk].float() - b[start:start + rows_per_chunk].float()).double().pow(2).sum())
    return total


@dataclass
class MatchPlan:
    """Everything `match` checks before it writes a byte; `--dry-run` prints it."""

    anchor: OpenedModel
    model: OpenedModel
    out: Path
    layers: list[LayerId]
    unpaired: list[str]
    device: str
    options: MatchOptions

    def describe(self) -> dict[str, Any]:
        touched = {n for layer in self.layers for n in layer_tensor_names(self.model.bound, layer, self.model.checkpoint)}
        return {
            "tool": "rotfuse", "version": __version__, "command": "match", "dry_run": True,
            "anchor": str(self.anchor.folder), "model": str(self.model.folder), "output": str(self.out),
            "arch": self.model.bound.spec.name, "device": self.device,
            "symmetries": sorted(self.options.symmetries - self.model.bound.disabled),
            "restrictions": self.model.bound.notes,
            "layers": [str(layer) for layer in self.layers],
            "tensors": {"transformed": len(touched), "copied": len(self.model.checkpoint.names()) - len(touched),
                        "unpaired": self.unpaired},
            "bytes_to_write": sum(self.model.checkpoint.entry(n).nbytes for n in self.model.checkpoint.names()),
        }


def prepare_match(anchor_path: Path, model_path: Path, out: Path, options: MatchOptions,
                  overwrite: bool = False) -> MatchPlan:
    """Validate flags, output location and both checkpoints (headers, config, shapes)."""
    check_output_location(out, [anchor_path, model_path], overwrite)
    device = resolve_device(options.device)
    anchor = open_model(anchor_path, options.arch, options.arch_spec, options.allow_nonfinite)
    model = open_model(model_path, options.arch, options.arch_spec, options.allow_nonfinite)
    unpaired = check_compatible(anchor, model)
    layers = select_layers(model.bound, options.layers)
    return MatchPlan(anchor, model, Path(out), layers, unpaired, device, options)


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
    plan = prepare_match(anchor_path, model_path, out, options, overwrite)
    anchor, model, device = plan.anchor, plan.model, plan.device
    stream = _Stream()

    def transform(layer: LayerId, weights: LayerWeights) -> tuple[LayerWeights, dict[str, Any]]:
        anchor_weights = stream.timed("read", lambda: read_layer(anchor.checkpoint, anchor.bound, layer, device))
        settings = layer_settings(model.bound, layer, options.symmetries, options.max_rounds)
        new, results = stream.timed("solve", lambda: match_layer(weights, anchor_weights, settings))
        modules = {}
        for result in results:
            modules[result.module] = {
                "before": result.before, "after": result.after, "reduction": result.reduction,
                "applied": result.applied, "rounds": result.rounds, "reverted": result.reverted,
            }
            if result.skipped:
                modules[result.module]["skipped"] = result.skipped
            modules[result.module].update(result.extra)
        return new, {"layer": str(layer), "modules": modules}

    with StagedFolder(out, overwrite) as staged:
        writer = CheckpointWriter(staged.path, plan_like(model.checkpoint), model.checkpoint)
        try:
            rows = _transform_layers(model, writer, plan.layers, device, transform, stream, progress, options.workers)
            matched = Distance(tensors=len(stream.handled))
            for row in rows:
                for module in row["modules"].values():
                    matched.add(module["before"] ** 2, module["after"] ** 2, 0)
            whole = Distance(matched.before, matched.after, matched.tensors)
            for name in model.checkpoint.names():
                if name in stream.handled or name in plan.unpaired:
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
            "anchor": {"path": str(anchor_path), "fingerprint": anchor.checkpoint.fingerprint()},
            "model": {"path": str(model_path), "fingerprint": model.checkpoint.fingerprint()},
            "output": {"path": str(out), "fingerprint": Checkpoint.open(staged.path, True).fingerprint()},
            "arch": model.bound.spec.name,
            "symmetries": sorted(options.symmetries),
            "device": device,
            "settings": {"max_rounds": options.max_rounds, "layers": [str(layer) for layer in plan.layers]},
            "restrictions": model.bound.notes,
            "layers": rows,
            "totals": {"matched": matched.as_dict(), "model": whole.as_dict()},
            "unpaired_tensors": plan.unpaired,
            "not_copied": skipped,
        }
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
    model = open_model(model_path, options.arch, options.arch_spec, options.allow_nonfinite)
    layers = select_layers(model.bound, options.layers)
    stream = _Stream()

    def transform(layer: LayerId, weights: LayerWeights) -> tuple[LayerWeights, None]:
        settings = layer_settings(model.bound, layer, options.symmetries, options.max_rounds)
        # one generator per layer: the same seed gives the same output whatever the thread timing
        digest = hashlib.sha256(f"{seed}:{layer}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return scramble_layer(weights, settings, generator), None

    with StagedFolder(out, overwrite) as staged:
        writer = CheckpointWriter(staged.path, plan_like(model.checkpoint), model.checkpoint)
        try:
            _transform_layers(model, writer, layers, device, transform, stream, progress, options.workers)
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
