"""`rotfuse match` and `rotfuse scramble`: open and check the checkpoints, then stream.

For each layer: read the model's (and the anchor's) tensors of that layer, transform them, write
them at their place in the output; then write every other tensor -- moved with the residual
stream when a stream map is in play, else copied byte for byte. A few layers of each checkpoint
are in memory at a time (streaming.py). The output is staged and renamed into place only when
complete (io/staging.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rotfuse import __version__
from rotfuse.archs.layer_io import check_layer_pair, layer_tensor_names, read_layer
from rotfuse.archs.residual import GainSource
from rotfuse.archs.spec import BoundArch, LayerId, bind, select_spec
from rotfuse.errors import InputError, UsageError
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.io.staging import StagedFolder, Target, check_outputs
from rotfuse.io.writer import CheckpointWriter, ShardPlan, copy_side_files, output_file_names, plan_like, side_files
from rotfuse.matching import LayerSettings, match_layer, scramble_layer
from rotfuse.report import Distance, write_json
from rotfuse.residual_match import StreamSide
from rotfuse.selection import LayerRanges
from rotfuse.streaming import Progress, Stream, transform_layers
from rotfuse.symmetries import RESIDUAL, symmetry_set
from rotfuse.symmetry.residual import StreamMap, random_stream_map
from rotfuse.symmetry.weights import LayerWeights
from rotfuse.tensors import sq_distance

REPORT_NAME = "rotfuse_report.json"
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class MatchOptions:
    symmetries: frozenset[str] = field(default_factory=lambda: symmetry_set("default"))
    layers: LayerRanges | frozenset[int] | None = None  # None: every layer
    device: str = "auto"
    max_rounds: int = 20
    arch: str | None = None
    arch_spec: Path | None = None
    allow_nonfinite: bool = False
    workers: int = DEFAULT_WORKERS  # layers read and solved concurrently
    # residual stream (symmetry "residual")
    data: Path | None = None  # activation matching on these inputs; weight matching without
    residual_rounds: int = 8  # weight matching: most alternations of stream map and per-layer maps
    data_samples: int = 256
    data_batch_size: int = 16
    allow_untie: bool = False  # RMSNorm with tied embeddings: fold anyway, untying the head
    allow_stream_output: bool = False  # a headless model's outputs are the stream itself
    fsync: bool = True  # flush the output to disk before it is moved into place (io/staging.py)


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


def folded_view(path: Path) -> StreamSide:
    """A checkpoint as the residual search compares it: every foldable norm folded into its
    readers, the stream not moved -- values that do not depend on how the model splits a scale
    between a norm and the weights after it."""
    from rotfuse.archs.residual import residual_plans

    model = open_model(path)
    return StreamSide.unmoved(model.checkpoint, residual_plans(model.bound, model.checkpoint))


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
        raise UsageError(f"--device {name}: there is no such CUDA device (this machine has "
                         f"{torch.cuda.device_count()}: cuda:0 to cuda:{torch.cuda.device_count() - 1})")
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
    for stack, dims in model.bound.dims.items():
        theirs = anchor.bound.dims[stack]
        for key, value in vars(dims).items():
            if value != getattr(theirs, key):
                where = f"{stack} " if stack else ""
                raise InputError(f"{model.folder / 'config.json'}: {where}{key} is {value} but the anchor's is "
                                 f"{getattr(theirs, key)}")
    for layer in model.bound.layers():
        check_layer_pair(model.checkpoint, model.bound, anchor.checkpoint, anchor.bound, layer)
    return unpaired


def in_layers(model: OpenedModel, layers: list[LayerId]) -> set[str]:
    """Every tensor name the layers' symmetries read and write."""
    return {n for layer in layers for n in layer_tensor_names(model.bound, layer, model.checkpoint)}


def select_layers(bound: BoundArch, wanted: LayerRanges | frozenset[int] | None) -> list[LayerId]:
    """The layers `--layers` names, checked against the model's count before any is used (ranges
    are never expanded: `--layers 0-99999999999` is refused at once)."""
    layers = bound.layers()
    if wanted is None:
        return layers
    available = {layer.index for layer in layers}
    if isinstance(wanted, LayerRanges):
        missing = wanted.first_missing(available)
    else:
        missing = min(wanted - available, default=None)
    if missing is not None:
        raise UsageError(f"--layers: layer {missing} does not exist (the model has layers 0-{max(available)})")
    return [layer for layer in layers if layer.index in wanted]


def layer_settings(bound: BoundArch, layer: LayerId, symmetries: frozenset[str], max_rounds: int,
                   allow_nonfinite: bool = True) -> LayerSettings:
    return LayerSettings(
        symmetries=symmetries - bound.disabled,
        rotary_dim=bound.dims[layer.stack].rotary_dim,
        max_rounds=max_rounds,
        may_be_nonfinite=allow_nonfinite,
    )


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
    residual: ResidualSetup | None = None

    def describe(self) -> dict[str, Any]:
        touched = in_layers(self.model, self.layers)
        described = {
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
        if self.residual is not None:
            described["residual"] = self.residual.describe(self.options)
        return described


@dataclass
class ResidualSetup:
    """Both checkpoints as the residual-stream search sees them (gains folded where allowed)."""

    model: StreamSide
    anchor: StreamSide
    notes: list[str] = field(default_factory=list)

    def orthogonal(self, stack: str) -> bool:
        return self.model.plans[stack].orthogonal

    def solve(self, stack: str, scores: torch.Tensor) -> StreamMap:
        """The best map of the kind the stack admits."""
        from rotfuse.residual_match import solve_stream_map

        plan = self.model.plans[stack]
        return solve_stream_map(scores, plan.orthogonal, plan.keeps_ones)

    def describe(self, options: MatchOptions) -> dict[str, Any]:
        plans = self.model.plans
        kinds = {stack or "stream": ("permutation" if not p.orthogonal else
                                     "orthogonal, keeping the ones" if p.keeps_ones else "orthogonal")
                 for stack, p in plans.items()}
        return {
            "method": "activations" if options.data else "weights",
            "maps": kinds,
            "gains_folded": any(p.orthogonal for p in plans.values()),
            "distances": ("norm gains folded into their readers, on both sides" if any(p.folds for p in plans.values())
                          else "as stored"),
            "output_gains": "the anchor's" if any(p.folds for p in plans.values()) else "unchanged",
            "untied": [name for p in plans.values() for name in p.added],
            "notes": self.notes,
        }


def gains_from(model: OpenedModel, source: OpenedModel, sides: StreamSide) -> tuple[GainSource, list[str]]:
    """What expresses a moved copy of MODEL in SOURCE's norm gains (the anchor's, or the model's
    own for a scrambled copy), read once up front, and notes. A gain with a zero entry cannot be
    unfolded into: that norm stays folded (gain 1), and a note says so."""
    gains: dict[str, torch.Tensor | None] = {}
    notes = []
    for fold in (fold for plan in sides.plans.values() for fold in plan.folds):
        other = counterpart(fold.gain, model, source)
        value = source.checkpoint.get(other).double()
        usable = bool((value != 0).all()) and bool(torch.isfinite(value).all())
        gains[fold.gain] = value if usable else None
        if not usable:
            notes.append(f"{source.folder}: {other!r} has zero entries, so the output keeps that norm folded "
                         "(gain 1) instead of taking its gains")
    return gains.get, notes


def prepare_residual(anchor: OpenedModel, model: OpenedModel, options: MatchOptions) -> ResidualSetup | None:
    if RESIDUAL not in options.symmetries:
        return None
    from rotfuse.archs.residual import outputs_the_stream, residual_plans

    if outputs_the_stream(model.bound, model.checkpoint.config) and not options.allow_stream_output:
        raise UsageError(
            f"{model.folder}: {', '.join(model.checkpoint.config['architectures'])} has no head, so its outputs "
            "are the residual stream itself and a residual map would change them (x -> x Q; cosine "
            "similarities and norms are kept); pass --allow-stream-output to accept that"
        )
    mine = residual_plans(model.bound, model.checkpoint, options.allow_untie)
    theirs = residual_plans(anchor.bound, anchor.checkpoint, options.allow_untie)
    for stack, plan in mine.items():
        other = theirs.get(stack)
        if other is None or other.orthogonal != plan.orthogonal:
            why = "; ".join((other.notes if plan.orthogonal else plan.notes) if other is not None else [])
            raise InputError(
                f"{model.folder}: its residual stream{' ' + stack if stack else ''} can move by "
                f"{'orthogonal maps' if plan.orthogonal else 'permutations only'} but the anchor's cannot "
                f"({why or 'tied embeddings on one side only?'}); with tied embeddings pass --allow-untie"
            )
    notes = [note for plan in mine.values() for note in plan.notes]
    return ResidualSetup(StreamSide.unmoved(model.checkpoint, mine), StreamSide.unmoved(anchor.checkpoint, theirs), notes)


def match_inputs(anchor_path: Path, model_paths: list[Path], options: MatchOptions) -> list[Path | None]:
    """Every path `match` reads: no output may touch one (io/staging.check_outputs)."""
    return [anchor_path, *model_paths, options.data, options.arch_spec]


def prepare_match(anchor_path: Path, model_path: Path, out: Path, options: MatchOptions,
                  overwrite: bool = False, check_output: bool = True, report: Path | None = None) -> MatchPlan:
    """Validate flags, output locations and both checkpoints (headers, config, shapes, side files)
    before anything is written."""
    device = resolve_device(options.device)
    if options.data is not None and RESIDUAL not in options.symmetries:
        raise UsageError("--data drives the residual-stream map: add residual to --symmetries")
    anchor = open_model(anchor_path, options.arch, options.arch_spec, options.allow_nonfinite)
    model = open_model(model_path, options.arch, options.arch_spec, options.allow_nonfinite)
    if check_output:
        check_outputs([Target(out, "-o", report=None if report else REPORT_NAME,
                              holds=output_file_names(model.checkpoint)),
                       Target(report, "--report", folder=False, what="report") if report else None],
                      match_inputs(anchor_path, [model_path], options), overwrite)
    side_files(model.checkpoint)
    unpaired = check_compatible(anchor, model)
    if options.data is not None:  # the models will run: nothing of theirs may execute
        from rotfuse.runtime import refuse_remote_code

        for folder in (anchor_path, model_path):
            refuse_remote_code(folder)
    layers = select_layers(model.bound, options.layers)
    residual = prepare_residual(anchor, model, options)
    return MatchPlan(anchor, model, Path(out), layers, unpaired, device, options, residual)


# ---------------------------------------------------------------------- the residual stream map


def search_stream_maps(plan: MatchPlan, stream: Stream) -> tuple[dict[str, StreamMap], dict[str, Any]]:
    """The residual map of every stack: from activations with --data, else by weight matching."""
    from rotfuse.residual_match import (
        layer_stream_scores,
        stream_agreement,
        stream_scores,
        to_unmoved_basis,
    )

    setup, options = plan.residual, plan.options
    assert setup is not None
    stacks = list(setup.model.plans)
    if options.data is not None:
        if len(stacks) != 1:
            raise UsageError(f"{plan.model.folder}: --data (activation matching) needs a model with one residual "
                             f"stream; this one has {len(stacks)} (match it by weights: drop --data)")
        from rotfuse.activations import activation_scores

        stack = stacks[0]
        scores = stream.timed("activations", lambda: activation_scores(
            plan.model.folder, plan.anchor.folder, options.data, setup.orthogonal(stack),  # type: ignore[arg-type]
            options.data_samples, options.data_batch_size, plan.device))
        maps = {stack: setup.solve(stack, scores)}
        per_unit = stream_agreement(scores, maps[stack]) / setup.model.plans[stack].hidden_size
        return maps, {"method": "activations", "data": str(options.data),
                      "rounds": [{"round": 1, "mean_matched_score": per_unit}]}

    layer_names = in_layers(plan.model, plan.layers)
    folded = {fold.gain for p in setup.model.plans.values() for fold in p.folds}  # all ones on both sides
    outside = [n for n in plan.model.checkpoint.names()
               if setup.model.on_stream(n) and n not in layer_names and n not in folded]

    def outside_pass(maps: dict[str, StreamMap] | None) -> tuple[dict[str, torch.Tensor], float]:
        """Scores of the tensors outside the matched layers (maps None), or their distance under maps."""
        scores: dict[str, torch.Tensor] = {}
        total = 0.0
        for name in outside:
            entry = setup.model.entry(name)
            src = setup.model.read(name).float()
            ref = setup.anchor.read(counterpart(name, plan.model, plan.anchor)).float()
            if maps is None:  # (every tensor here has a stream axis: folded gains, all ones, are left out)
                part = stream_scores(src, ref, entry.axes)
                scores[entry.stack] = scores[entry.stack] + part if entry.stack in scores else part
            else:
                total += sq_distance(maps[entry.stack].apply(src, entry.axes), ref)
        return scores, total

    outside_scores, _ = stream.timed("solve", lambda: outside_pass(None))

    def evaluate(maps: dict[str, StreamMap]) -> tuple[float, dict[str, torch.Tensor]]:
        """Per-layer matching given the stream maps: the total distance, and C for the next maps."""
        side = setup.model.moved(maps)

        def transform(layer: LayerId, weights: LayerWeights) -> tuple[LayerWeights, tuple[str, torch.Tensor, float]]:
            ref = read_layer(plan.anchor.checkpoint, plan.anchor.bound, layer, plan.device, setup.anchor.view)
            settings = layer_settings(plan.model.bound, layer, options.symmetries, options.max_rounds,
                                      options.allow_nonfinite)
            new, results = match_layer(weights, ref, settings)
            return new, (layer.stack, layer_stream_scores(new, ref), sum(r.after ** 2 for r in results))

        pass_stream = Stream()
        extras = transform_layers(plan.model, None, plan.layers, plan.device, transform, pass_stream, None,
                                  options.workers, view=side.layer_view)
        for stage, seconds in pass_stream.timings.seconds.items():
            stream.timings.add(stage, seconds)
        _, outside_distance = stream.timed("read", lambda: outside_pass(maps))
        scores = {s: outside_scores.get(s, 0) + to_unmoved_basis(
            sum(c for stack, c, _ in extras if stack == s), maps[s]) for s in stacks}
        return outside_distance + sum(after for _, _, after in extras), scores

    def record(number: int, total: float, maps: dict[str, StreamMap], scores: dict[str, torch.Tensor]) -> None:
        agreement = sum(stream_agreement(scores[s], maps[s]) for s in stacks)
        rounds.append({"round": number, "distance": total ** 0.5,
                       "mean_matched_score": agreement / sum(setup.model.plans[s].hidden_size for s in stacks)})

    # round 0: the identity, so adding the residual symmetry never ends farther than leaving it out
    identity = {s: StreamMap.identity(setup.model.plans[s].hidden_size) for s in stacks}
    rounds: list[dict[str, Any]] = []
    total, scores = evaluate(identity)
    record(0, total, identity, scores)
    best: tuple[float, dict[str, StreamMap]] = (total, identity)
    # then GLMC's start: the map from the tensors outside the layers (embeddings, heads), which does
    # not depend on the per-layer maps; alternate until the distance stops falling
    maps = {s: (setup.solve(s, outside_scores[s]) if s in outside_scores else identity[s]) for s in stacks}
    previous: float | None = None
    for number in range(1, options.residual_rounds + 1):
        total, scores = evaluate(maps)
        record(number, total, maps, scores)
        if total < best[0]:
            best = (total, maps)
        if previous is not None and total >= previous * (1 - 1e-7):
            break
        previous = total
        new_maps = {s: setup.solve(s, scores[s]) for s in stacks}
        if all(_same_map(new_maps[s], maps[s]) for s in stacks):
            break
        maps = new_maps
    return best[1], {"method": "weights", "rounds": rounds, "chosen_round": next(
        r["round"] for r in rounds if abs(r["distance"] - best[0] ** 0.5) <= 1e-12 * max(1.0, best[0] ** 0.5))}


def _same_map(a: StreamMap, b: StreamMap) -> bool:
    if a.perm is not None and b.perm is not None:
        return torch.equal(a.perm, b.perm)
    return torch.allclose(a.as_matrix(), b.as_matrix(), atol=1e-9)


# ---------------------------------------------------------------------- writing an aligned copy


def _layout(model: OpenedModel, side: StreamSide) -> list[ShardPlan]:
    """The model's own layout, plus the heads an untie adds (next to the tensor they start from)."""
    plans = plan_like(model.checkpoint)
    for residual in side.plans.values():
        for new, source in residual.added.items():
            entry = model.checkpoint.entry(source)
            target = next(p for p in plans if any(name == source for name, _, _ in p.tensors))
            target.tensors.append((new, entry.dtype, entry.shape))
    return plans


class _Expressing:
    """A CheckpointWriter whose every tensor goes through `side.express` first."""

    def __init__(self, writer: CheckpointWriter, side: StreamSide):
        self._writer, self._side = writer, side

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._writer.write(name, self._side.express(name, tensor))

    def __getattr__(self, attribute: str) -> Any:  # finish, abort, copy: as they are
        return getattr(self._writer, attribute)


def _write_copy(model: OpenedModel, folder: Path, layers: list[LayerId], device: str, workers: int,
                transform: Any, side: StreamSide, stream: Stream, progress: Progress | None,
                anchor: OpenedModel | None = None, anchor_side: StreamSide | None = None,
                unmoved: StreamSide | None = None, stored_ffn: bool = False,
                fsync: bool = True, allow_nonfinite: bool = False) -> tuple[list[Any], Distance, list[str]]:
    """Write MODEL into `folder`: layers through `transform` (read through `side.view`, FFN
    tensors in their stored dtype with `stored_ffn`), every other tensor moved with the stream or
    copied byte for byte. With an anchor, also returns the distance over the tensors outside the
    layers (before: `unmoved`, after: `side`). What is written goes through `side.express` (the
    norm gains the copy is expressed in)."""
    writer: Any = CheckpointWriter(folder, _layout(model, side), model.checkpoint, fsync, allow_nonfinite)
    if side.into is not None:
        writer = _Expressing(writer, side)
    outside = Distance()
    layer_names = in_layers(model, layers)
    rest = [n for n in model.checkpoint.names() if n not in layer_names]
    fixed, moving = [n for n in rest if not side.on_stream(n)], [n for n in rest if side.on_stream(n)]
    against = (anchor, anchor_side, unmoved) if anchor and anchor_side and unmoved else None

    def measure(name: str, raw: torch.Tensor, moved: torch.Tensor | None = None) -> None:
        assert against is not None
        theirs, theirs_side, before_side = against
        other = counterpart(name, model, theirs)
        if other in theirs.checkpoint:
            ref = theirs_side.read(other)
            before = sq_distance(before_side.view(name, raw), ref)
            outside.add(before, before if moved is None else sq_distance(moved, ref))

    def measure_fixed() -> None:
        for name in fixed:
            measure(name, model.checkpoint.get(name))

    try:
        stream.timed("copy", lambda: writer.copy_unwritten(fixed))  # first: their shards are flushed early
        rows = transform_layers(model, writer, layers, device, transform, stream, progress, workers,
                                view=side.layer_view, stored_ffn=stored_ffn,
                                alongside=measure_fixed if against else None)
        for name in moving:
            raw = stream.timed("read", lambda: model.checkpoint.get(name))
            moved = side.view(name, raw)
            stream.timed("write", lambda: writer.write(name, moved))
            if against:
                measure(name, raw, moved)
        for residual in side.plans.values():
            for new, source in residual.added.items():
                writer.write(new, side.read(new, source))
        stream.timed("copy", writer.finish)
    finally:
        writer.abort()
    skipped = copy_side_files(model.checkpoint, folder)
    updates = {k: v for p in side.plans.values() for k, v in p.config_updates.items()}
    if updates:
        config_path = folder / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **updates}, indent=2) + "\n")
    return rows, outside, skipped


# ---------------------------------------------------------------------- match


def _match_into(plan: MatchPlan, folder: Path, progress: Progress | None) -> dict[str, Any]:
    """Align plan.model to plan.anchor and write it into `folder`; returns the report."""
    started = time.perf_counter()
    anchor, model, device, options = plan.anchor, plan.model, plan.device, plan.options
    stream = Stream()
    residual_report: dict[str, Any] | None = None
    side = unmoved = StreamSide(model.checkpoint, {}, {})  # the checkpoints as stored
    anchor_side = StreamSide(anchor.checkpoint, {}, {})
    if plan.residual is not None:
        maps, search = search_stream_maps(plan, stream)
        # compared with folded norms, written in the anchor's norm gains (so that it averages with it)
        into, notes = gains_from(model, anchor, plan.residual.model)
        side, anchor_side, unmoved = plan.residual.model.moved(maps, into), plan.residual.anchor, plan.residual.model
        residual_report = {**plan.residual.describe(options), **search}
        residual_report["notes"] = [*residual_report["notes"], *notes]
    # without a stream map the FFN is only measured and perhaps permuted: exact in its own dtype
    stored_ffn = plan.residual is None

    def transform(layer: LayerId, weights: LayerWeights) -> tuple[LayerWeights, dict[str, Any]]:
        ref = stream.timed("read", lambda: read_layer(anchor.checkpoint, anchor.bound, layer, device,
                                                      anchor_side.layer_view, stored_ffn))
        settings = layer_settings(model.bound, layer, options.symmetries, options.max_rounds, options.allow_nonfinite)
        new, results = stream.timed("solve", lambda: match_layer(weights, ref, settings))
        modules = {}
        for result in results:
            modules[result.module] = {
                "before": result.before, "after": result.after, "reduction": result.reduction,
                "applied": result.applied, "rounds": result.rounds, "reverted": result.reverted,
                **({"skipped": result.skipped} if result.skipped else {}), **result.extra,
            }
        return new, {"layer": str(layer), "modules": modules}

    folder.mkdir(parents=True, exist_ok=True)
    rows, outside, skipped = _write_copy(
        model, folder, plan.layers, device, options.workers, transform, side, stream, progress,
        anchor, anchor_side, unmoved, stored_ffn, options.fsync, options.allow_nonfinite)
    matched = Distance(tensors=sum(1 for layer in plan.layers
                                   for _ in layer_tensor_names(model.bound, layer, model.checkpoint)))
    for row in rows:
        for module in row["modules"].values():
            matched.add(module["before"] ** 2, module["after"] ** 2, 0)
    whole = Distance(matched.before + outside.before, matched.after + outside.after, matched.tensors + outside.tensors)
    report: dict[str, Any] = {
        "tool": "rotfuse", "version": __version__, "schema": 1, "command": "match",
        "anchor": {"path": str(anchor.folder), "fingerprint": anchor.checkpoint.fingerprint()},
        "model": {"path": str(model.folder), "fingerprint": model.checkpoint.fingerprint()},
        "output": {"path": str(plan.out), "fingerprint": Checkpoint.open(folder, True).fingerprint()},
        "arch": model.bound.spec.name,
        "symmetries": sorted(options.symmetries),
        "device": device,
        "settings": {"max_rounds": options.max_rounds, "layers": [str(layer) for layer in plan.layers]},
        "restrictions": model.bound.notes,
    }
    if residual_report is not None:
        report["residual"] = residual_report
    report.update({
        "layers": rows,
        "totals": {"matched": matched.as_dict(), "model": whole.as_dict()},
        "unpaired_tensors": plan.unpaired,
        "not_copied": skipped,
    })
    stream.timings.add("total", time.perf_counter() - started)
    report["timings"] = stream.timings.as_dict()
    return report


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
    plan = prepare_match(anchor_path, model_path, out, options, overwrite, report=report_path)
    with StagedFolder(out, overwrite, options.fsync) as staged:
        report = _match_into(plan, staged.path, progress)
        _commit_with_report(staged, report, report_path)
    return report


def _commit_with_report(staged: StagedFolder, report: dict[str, Any], report_path: Path | None) -> None:
    """The report goes into the output (default) or to --report, after the output is in place."""
    if report_path is None:
        write_json(staged.path / REPORT_NAME, report)
    staged.commit()
    if report_path is not None:
        write_json(report_path, report, output=True)


def output_names(models: list[Path]) -> list[str]:
    """One sub-folder name per model: its folder name, numbered when two share one."""
    names: list[str] = []
    for path in models:
        base = Path(path).resolve().name or "model"
        name, number = base, 2
        while name in names:
            name, number = f"{base}-{number}", number + 1
        names.append(name)
    return names


def match_many(
    anchor_path: Path,
    model_paths: list[Path],
    out: Path,
    options: MatchOptions,
    report_path: Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Align several models to one anchor: OUT/<model name>/ each, one report. All are checked
    before anything is written, and OUT appears complete or not at all."""
    plans = [prepare_match(anchor_path, path, out, options, check_output=False) for path in model_paths]
    names = output_names(model_paths)
    check_outputs([Target(out, "-o", report=None if report_path else REPORT_NAME, holds=tuple(names)),
                   Target(report_path, "--report", folder=False, what="report") if report_path else None],
                  match_inputs(anchor_path, model_paths, options), overwrite)
    with StagedFolder(out, overwrite, options.fsync) as staged:
        reports = []
        for plan, name in zip(plans, names):
            plan.out = Path(out) / name
            reports.append(_match_into(plan, staged.path / name, progress))
        report = {"tool": "rotfuse", "version": __version__, "schema": 1, "command": "match",
                  "anchor": reports[0]["anchor"], "outputs": dict(zip(names, (str(Path(out) / n) for n in names))),
                  "models": reports}
        _commit_with_report(staged, report, report_path)
    return report


# ---------------------------------------------------------------------- scramble


def scramble(
    model_path: Path,
    out: Path,
    options: MatchOptions,
    seed: int,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write a copy of MODEL moved by a random member of the symmetry group (same function)."""
    device = resolve_device(options.device)
    model = open_model(model_path, options.arch, options.arch_spec, options.allow_nonfinite)
    check_outputs([Target(out, "-o")], [model_path, options.arch_spec], overwrite)
    side_files(model.checkpoint)
    layers = select_layers(model.bound, options.layers)
    residual = prepare_residual(model, model, options)

    def generator(label: str) -> torch.Generator:
        # one generator per layer: the same seed gives the same output whatever the thread timing
        digest = hashlib.sha256(f"{seed}:{label}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    side = StreamSide(model.checkpoint, {}, {})
    if residual is not None:
        side = residual.model.moved({  # a copy in the model's own gains, as a differently trained model has
            stack: random_stream_map(p.hidden_size, p.orthogonal, generator(f"residual:{stack}"), p.keeps_ones)
            for stack, p in residual.model.plans.items()}, gains_from(model, model, residual.model)[0])

    def transform(layer: LayerId, weights: LayerWeights) -> tuple[LayerWeights, None]:
        settings = layer_settings(model.bound, layer, options.symmetries, options.max_rounds, options.allow_nonfinite)
        return scramble_layer(weights, settings, generator(str(layer))), None

    with StagedFolder(out, overwrite, options.fsync) as staged:
        _write_copy(model, staged.path, layers, device, options.workers, transform, side, Stream(), progress,
                    fsync=options.fsync, allow_nonfinite=options.allow_nonfinite)
        staged.commit()
    return {
        "tool": "rotfuse", "version": __version__, "command": "scramble", "model": str(model_path),
        "output": str(out), "arch": model.bound.spec.name, "seed": seed,
        "symmetries": sorted(options.symmetries - model.bound.disabled),
        "layers": [str(layer) for layer in layers], "restrictions": model.bound.notes,
        **({"residual": residual.describe(options)} if residual is not None else {}),
    }
