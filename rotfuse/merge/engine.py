"""The streaming loop behind `rotfuse merge`.

Open every checkpoint (headers only), check that they share one architecture and one tensor
layout, decide a rule per tensor, then walk the first model's tensors: read that tensor from every
model (plus its statistics), merge it, write it at its place in the output, drop it. Memory is one
parameter per model (with `--match`, one layer per model), never the model. The output has the
first model's layout and dtypes (`--dtype` recasts floating tensors), its config and tokenizer
files, and a JSON report; it is staged and renamed into place only when complete.

Rules, one per tensor of the first model:
- `head`: matches `--exclude`; copied from model `--head-from` (task heads whose label spaces
  differ between the models);
- `copy`: not floating point (integer buffers); copied from the first model;
- `fisher` / `regmean`: the method, where every model's statistics cover the tensor;
- `simple`: everything else (for regmean: biases, norms, embeddings; for fisher: tensors that
  have no Fisher, e.g. buffers).

This module never imports transformers: `merge --method simple` works without it.
"""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import Future, ThreadPoolExecutor
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from rotfuse import __version__
from rotfuse.archs.spec import BoundArch
from rotfuse.errors import InputError, OutputError, UsageError
from rotfuse.io.checkpoint import CONFIG_FILE, Checkpoint
from rotfuse.io.safetensors_file import FLOAT_DTYPES
from rotfuse.io.staging import StagedFolder, Target, check_outputs
from rotfuse.io.writer import CheckpointWriter, ShardPlan, copy_side_files, output_file_names, plan_like, side_files
from rotfuse.merge import method as lookup_method
from rotfuse.merge.fisher import fisher_average
from rotfuse.merge.regmean import GramSystem, prepare
from rotfuse.merge.simple import normalise_weights, weighted_average
from rotfuse.merge.statsfile import LinearInput, StatsFolder
from rotfuse.report import Distance, Timings, write_json
from rotfuse.symmetries import RESIDUAL, symmetry_set
from rotfuse.tensors import all_finite

REPORT_NAME = "rotfuse_merge.json"
# config.json keys that describe a task head's label space: taken from the --head-from model
LABEL_KEYS = ("id2label", "label2id", "num_labels", "_num_labels", "problem_type")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class MergeOptions:
    method: str = "simple"
    weights: tuple[float, ...] | None = None  # per model; normalised; None: uniform
    stats: tuple[Path, ...] = ()  # one statistics folder per model (fisher, regmean)
    dtype: str | None = None  # safetensors dtype for floating tensors; None: the first model's
    exclude: tuple[str, ...] = ()  # regexes (re.search) of tensors kept out of the merge
    head_from: int = 0  # model index the excluded tensors are copied from
    alpha: float = 0.9  # RegMean off-diagonal shrinkage
    fisher_floor: float = 1e-6
    fisher_normalize: bool = False  # divide each model's Fisher by its global norm
    match: bool = False  # align every model to the first before merging (in memory)
    symmetries: frozenset[str] = field(default_factory=lambda: symmetry_set("default"))
    max_rounds: int = 20
    arch: str | None = None
    arch_spec: Path | None = None
    device: str = "auto"
    allow_nonfinite: bool = False
    fsync: bool = True  # flush the output to disk before it is moved into place (io/staging.py)


@dataclass
class _Model:
    path: Path
    checkpoint: Checkpoint
    bound: BoundArch | None = None  # only with --match
    stats: StatsFolder | None = None
    fisher_scale: float = 1.0  # 1 / ||F|| with --fisher-normalize

    @cached_property
    def fingerprint(self) -> str:
        return self.checkpoint.fingerprint()

    @property
    def statistics(self) -> StatsFolder:
        assert self.stats is not None, "the method takes no statistics"
        return self.stats

    def linear_input(self, name: str) -> LinearInput:
        entry = self.statistics.linear_input(name)
        assert entry is not None, f"no Gram for {name}"
        return entry


@dataclass
class MergePlan:
    """Everything checked before the first byte is written."""

    models: list[_Model]
    out: Path
    options: MergeOptions
    weights: list[float]
    rules: dict[str, str]  # first model's tensor name -> rule
    ignored: list[str]  # tensors only some other model has (not in the output)
    device: str

    @property
    def first(self) -> _Model:
        return self.models[0]


# ---------------------------------------------------------------------- checking


def _validate(models: Sequence[Path], options: MergeOptions) -> tuple[list[float], list[re.Pattern[str]]]:
    method = lookup_method(options.method)
    if len(models) < 2:
        raise UsageError(f"merge needs at least two checkpoints, got {len(models)}")
    weights = normalise_weights(options.weights, len(models))
    if method.stats is None and options.stats:
        raise UsageError(f"--method {method.name} uses no statistics; drop --stats")
    if method.stats is not None:
        if options.match:
            raise UsageError(
                f"--match cannot be combined with --method {method.name}: its statistics must be computed on "
                "the aligned checkpoints, which --match never writes. Run `rotfuse match FIRST MODEL -o ALIGNED` "
                f"for each model, `rotfuse stats ALIGNED --kind {method.stats}` on each, then merge the aligned "
                "checkpoints"
            )
        if len(options.stats) != len(models):
            raise UsageError(f"--method {method.name} needs one --stats folder per model "
                             f"({len(models)}), got {len(options.stats)}")
    if options.match and RESIDUAL in options.symmetries:
        raise UsageError(
            "--match aligns layer by layer and cannot move the residual stream, which couples every layer: "
            "run `rotfuse match FIRST MODEL... -s default,residual -o ALIGNED` first, then merge the aligned copies"
        )
    if not 0.0 <= options.alpha <= 1.0:
        raise UsageError(f"--alpha {options.alpha}: must be between 0 and 1")
    if not 0.0 <= options.fisher_floor < math.inf:
        raise UsageError(f"--fisher-floor {options.fisher_floor}: must be a finite number >= 0")
    if not 0 <= options.head_from < len(models):
        raise UsageError(f"--head-from {options.head_from}: must be a model index from 0 to {len(models) - 1}")
    patterns = []
    for text in options.exclude:
        try:
            patterns.append(re.compile(text))
        except re.error as exc:
            raise UsageError(f"--exclude {text!r}: not a regular expression ({exc})") from None
    return weights, patterns


def _open_models(paths: Sequence[Path], options: MergeOptions) -> list[_Model]:
    if not options.match:
        return [_Model(Path(p), Checkpoint.open(p, allow_nonfinite=options.allow_nonfinite)) for p in paths]
    from rotfuse.pipeline import open_model

    opened = [open_model(Path(p), options.arch, options.arch_spec, options.allow_nonfinite) for p in paths]
    first = opened[0]
    for other in opened[1:]:
        if other.bound.spec.name != first.bound.spec.name or other.bound.dims != first.bound.dims:
            raise InputError(f"{other.folder}: architecture {other.bound.spec.name} {other.bound.dims} differs "
                             f"from the first model's {first.bound.spec.name} {first.bound.dims}")
    return [_Model(Path(p), o.checkpoint, o.bound) for p, o in zip(paths, opened)]


def _check_layout(models: list[_Model], excluded: Callable[[str], bool], head_from: int) -> list[str]:
    """Every tensor of the first model must exist with the same shape in every model (excluded
    tensors only in the head model). Returns the other models' tensors the output leaves out."""
    first = models[0].checkpoint
    model_type = first.config.get("model_type")
    for model in models[1:]:
        theirs = model.checkpoint.config.get("model_type")
        if theirs != model_type:
            raise InputError(f"{model.path}: model_type {theirs!r} differs from the first model's {model_type!r} "
                             f"({models[0].path})")
    for name in first.names():
        if excluded(name):
            head = models[head_from].checkpoint
            if name not in head:
                raise InputError(f"{head.folder}: tensor {name!r} (excluded, to be copied with --head-from) "
                                 "not found")
            continue
        shape = first.entry(name).shape
        for model in models[1:]:
            if name not in model.checkpoint:
                raise InputError(f"{model.path}: tensor {name!r} of {models[0].path} not found "
                                 "(merge needs checkpoints with the same tensors; --exclude REGEX leaves some out)")
            theirs = model.checkpoint.entry(name).shape
            if theirs != shape:
                raise InputError(
                    f"{model.path}: tensor {name!r} has shape {list(theirs)} but {list(shape)} in {models[0].path}; "
                    "if it is a task head with its own label space, keep it out with --exclude REGEX "
                    "(and choose its source with --head-from N)"
                )
    own = set(first.names())
    return sorted({name for model in models[1:] for name in model.checkpoint.names() if name not in own})


def _open_stats(models: list[_Model], options: MergeOptions, kind: str) -> None:
    for model, folder in zip(models, options.stats, strict=True):
        stats = StatsFolder.open(folder)
        if stats.kind != kind:
            raise InputError(f"{folder}: holds {stats.kind} statistics; --method {options.method} needs {kind} "
                             f"(rotfuse stats --kind {kind})")
        fingerprint = model.fingerprint
        if stats.fingerprint != fingerprint:
            raise InputError(
                f"{folder}: statistics belong to another checkpoint ({stats.source}, fingerprint "
                f"{stats.fingerprint[:12]}), not to {model.path} ({fingerprint[:12]}); statistics change with "
                f"the weights (matching rotates them), so compute them on the checkpoint you merge: "
                f"rotfuse stats {model.path} --kind {kind} ..."
            )
        model.stats = stats
        if kind == "fisher" and options.fisher_normalize:
            squares = stats.squared_norm()
            if squares <= 0:
                raise InputError(f"{folder}: the Fisher is zero everywhere; --fisher-normalize cannot scale it")
            model.fisher_scale = 1.0 / squares ** 0.5


def _rule(name: str, models: list[_Model], method: str, excluded: Callable[[str], bool]) -> str:
    first = models[0].checkpoint
    if excluded(name):
        return "head"
    for model in models:
        model.checkpoint.refuse_float8(name, "merge")  # (--exclude keeps a float8 head out of the merge)
    if first.entry(name).dtype not in FLOAT_DTYPES:
        return "copy"
    if method == "simple":
        return "simple"
    covered = [_covers(model.statistics, name, method) for model in models]
    if all(covered):
        return method
    if any(covered):
        missing, holder = models[covered.index(False)].statistics, models[covered.index(True)].statistics
        raise InputError(f"{missing.folder}: no {method} statistics for tensor {name!r}, "
                         f"but {holder.folder} has them; were they computed on different architectures?")
    return "simple"


def _covers(stats: StatsFolder, name: str, method: str) -> bool:
    if method == "fisher":
        return stats.has(name)
    return stats.linear_input(name) is not None


def prepare_merge(models: Sequence[Path], out: Path, options: MergeOptions, overwrite: bool = False,
                  report: Path | None = None, inputs: Sequence[Path] = ()) -> MergePlan:
    """Validate flags, output locations, checkpoints and statistics; decide every tensor's rule.
    `inputs`: other files the command read (its job file), which no output may replace."""
    from rotfuse.pipeline import resolve_device

    weights, patterns = _validate(models, options)
    device = resolve_device(options.device)
    opened = _open_models(models, options)
    check_outputs([Target(Path(out), "-o", report=REPORT_NAME, holds=output_file_names(opened[0].checkpoint)),
                   Target(report, "--report", folder=False, what="report") if report is not None else None],
                  [*map(Path, models), *options.stats, options.arch_spec, *inputs], overwrite)
    side_files(opened[0].checkpoint)

    def excluded(name: str) -> bool:
        return any(p.search(name) for p in patterns)

    for pattern in patterns:  # a typo must not silently merge a head
        if not any(pattern.search(name) for name in opened[0].checkpoint.names()):
            raise UsageError(f"--exclude {pattern.pattern!r}: matches no tensor of {opened[0].path}")
    ignored = _check_layout(opened, excluded, options.head_from)
    kind = lookup_method(options.method).stats
    if kind is not None:
        _open_stats(opened, options, kind)
    rules = {name: _rule(name, opened, options.method, excluded) for name in opened[0].checkpoint.names()}
    return MergePlan(opened, Path(out), options, weights, rules, ignored, device)


# ---------------------------------------------------------------------- merging


class _Sources:
    """Model i's tensor: from its checkpoint, or (with --match) from its aligned layer in memory.

    `prefetch(name)` starts reading a tensor of every model on a background thread, so that the
    next tensor's I/O overlaps this one's arithmetic and write (memory: two tensors per model).
    """

    def __init__(self, models: list[_Model]):
        self.models = models
        self.aligned: list[dict[str, torch.Tensor]] = [{} for _ in models]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rotfuse-prefetch")
        self._ahead: tuple[str, Future] | None = None

    def get(self, index: int, name: str, check: bool = True) -> torch.Tensor:
        tensor = self.aligned[index].get(name)
        return tensor if tensor is not None else self.models[index].checkpoint.get(name, check=check)

    def all(self, name: str) -> list[torch.Tensor]:
        if self._ahead is not None and self._ahead[0] == name:
            future = self._ahead[1]
            self._ahead = None
            return future.result()
        return self._read(name)

    def prefetch(self, name: str) -> None:
        self._ahead = (name, self._pool.submit(self._read, name))

    def close(self) -> None:
        self._ahead = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, name: str) -> list[torch.Tensor]:
        """Unchecked for NaN/Inf: `_Merger.merge` checks the merged tensor, which they all flow into."""
        return [self.get(i, name, check=False) for i in range(len(self.models))]

    def blame_nonfinite(self, name: str) -> None:
        """The merged tensor is not finite: name the input that made it so."""
        for index, model in enumerate(self.models):
            model.checkpoint.refuse_nonfinite(name, self.get(index, name, check=False))


@dataclass
class _Merger:
    """Applies each tensor's rule; keeps the factorised Gram system of the input being merged."""

    plan: MergePlan
    sources: _Sources
    _system_key: tuple[str, ...] | None = None
    _system: GramSystem | None = None

    def merge(self, name: str) -> torch.Tensor:
        merged = self._merge(name)
        if not all_finite(merged) and not self.plan.options.allow_nonfinite:
            self.sources.blame_nonfinite(name)  # NaN/Inf in an input reach the average: name it
            rule = self.plan.rules[name]
            raise InputError(f"tensor {name!r}: the {rule} merge gives NaN or Inf values from finite inputs"
                             + (" (is --fisher-floor too large?)" if rule == "fisher" else "") + "; nothing was written")
        return merged

    def _merge(self, name: str) -> torch.Tensor:
        rule, weights, models = self.plan.rules[name], self.plan.weights, self.plan.models
        tensors = self.sources.all(name)
        if rule == "fisher":
            fishers = [m.statistics.get(name) * m.fisher_scale for m in models]
            for model, fisher in zip(models, fishers):
                if fisher.shape != tensors[0].shape:
                    raise InputError(f"{model.statistics.folder}: Fisher {name!r} has shape {list(fisher.shape)}, "
                                     f"the tensor {list(tensors[0].shape)}")
            return fisher_average(tensors, fishers, weights, self.plan.options.fisher_floor)
        if rule == "regmean":
            return self._regmean(name, tensors)
        return weighted_average(tensors, weights)

    def _regmean(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        inputs = [m.linear_input(name) for m in self.plan.models]
        layout = inputs[0].layout
        if any(i.layout != layout for i in inputs) or tensors[0].dim() != 2:
            raise InputError(f"RegMean: the statistics disagree on how {name!r} is stored (layouts "
                             f"{sorted({i.layout for i in inputs})}) or it is not a matrix")
        key = tuple(i.gram for i in inputs)
        if key != self._system_key:
            self._system = None  # free the previous input's Grams before reading the next
            dim = tensors[0].shape[1 if layout == "out_in" else 0]
            grams = []
            for model, gram_name in zip(self.plan.models, key):
                gram = model.statistics.get(gram_name)
                if tuple(gram.shape) != (dim, dim):
                    raise InputError(f"{model.statistics.folder}: Gram {gram_name!r} is {list(gram.shape)}, but "
                                     f"{name!r} ({layout}) reads {dim} inputs")
                grams.append(gram)
            self._system = prepare(grams, self.plan.weights, self.plan.options.alpha, name, self.plan.device)
            self._system_key = key
        assert self._system is not None
        return self._system.solve(tensors, layout)


def _order(plan: MergePlan) -> list[str]:
    """The first model's tensors, with weights that read one Gram (q, k, v) next to each other so
    that its factorisation is computed once."""
    groups: dict[str, list[str]] = {}
    for name in plan.first.checkpoint.names():
        key = name
        if plan.rules[name] == "regmean":
            key = plan.first.linear_input(name).gram
        groups.setdefault(key, []).append(name)
    return [name for group in groups.values() for name in group]


class _Capture:
    """Stands in for a CheckpointWriter to collect `write_layer`'s named tensors in memory."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor


def _aligned_layers(plan: MergePlan, sources: _Sources, distances: list[Distance]) -> Iterator[list[str]]:
    """With --match: align one layer of every model to the first model's, publish the aligned
    tensors in `sources`, yield the layer's tensor names; then forget them. `distances` gets each
    other model's distance to the first one over the matched tensors, before and after."""
    from rotfuse.archs.layer_io import layer_tensor_names, read_layer, write_layer
    from rotfuse.matching import match_layer
    from rotfuse.pipeline import layer_settings

    anchor = plan.first
    assert anchor.bound is not None
    distances[:] = [Distance() for _ in plan.models[1:]]
    for layer in anchor.bound.layers():
        anchor_weights = read_layer(anchor.checkpoint, anchor.bound, layer, plan.device)
        for index, model in enumerate(plan.models[1:], start=1):
            assert model.bound is not None
            settings = layer_settings(model.bound, layer, plan.options.symmetries, plan.options.max_rounds,
                                      plan.options.allow_nonfinite)
            weights = read_layer(model.checkpoint, model.bound, layer, plan.device)
            aligned, results = match_layer(weights, anchor_weights, settings)
            for result in results:
                distances[index - 1].add(result.before ** 2, result.after ** 2, 0)
            capture = _Capture()
            write_layer(capture, model.bound, layer, aligned)  # type: ignore[arg-type]
            sources.aligned[index] = capture.tensors
        yield layer_tensor_names(anchor.bound, layer, anchor.checkpoint)
        sources.aligned = [{} for _ in plan.models]


def _plans(plan: MergePlan) -> list[ShardPlan]:
    """The first model's layout; excluded heads take the --head-from model's shapes."""
    plans = plan_like(plan.first.checkpoint, plan.options.dtype)
    head = plan.models[plan.options.head_from].checkpoint
    for shard in plans:
        shard.tensors = [(name, dtype, head.entry(name).shape if plan.rules[name] == "head" else shape)
                         for name, dtype, shape in shard.tensors]
    return plans


def _write_side_files(plan: MergePlan, folder: Path) -> list[str]:
    """The first model's config and tokenizer files; the head model's label space in config.json."""
    skipped = copy_side_files(plan.first.checkpoint, folder)
    for stale in folder.glob("rotfuse_*.json"):  # reports of how an input was made, not the merge
        stale.unlink()
    head_from = plan.options.head_from
    if head_from and "head" in plan.rules.values():
        config = dict(plan.first.checkpoint.config)
        head_config = plan.models[head_from].checkpoint.config
        for key in LABEL_KEYS:
            config.pop(key, None)
            if key in head_config:
                config[key] = head_config[key]
        try:
            (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"{folder / CONFIG_FILE}: cannot write ({exc.strerror or exc})") from exc
    return skipped


def run_merge(plan: MergePlan, overwrite: bool = False, report_path: Path | None = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """Write the merged checkpoint described by `plan`; returns the report (written as
    OUT/rotfuse_merge.json, and also to `report_path` when given)."""
    started = time.perf_counter()
    timings = Timings()
    sources = _Sources(plan.models)
    merger = _Merger(plan, sources)
    distances: list[Distance] = []
    head_from = plan.options.head_from
    total = len(plan.rules)
    done = 0

    def handle(name: str, writer: CheckpointWriter) -> None:
        nonlocal done
        rule = plan.rules[name]
        begin = time.perf_counter()
        if rule == "copy" or (rule == "head" and head_from == 0):
            writer.copy(name)  # the first model is never transformed, not even by --match
        elif rule == "head":
            writer.write(name, sources.get(head_from, name))
        else:
            writer.write(name, merger.merge(name))
        timings.add(rule, time.perf_counter() - begin)
        done += 1
        if progress:
            progress(done, total)

    with StagedFolder(plan.out, overwrite, plan.options.fsync) as staged:
        writer = CheckpointWriter(staged.path, _plans(plan), plan.first.checkpoint, plan.options.fsync,
                                  plan.options.allow_nonfinite)
        try:
            handled: set[str] = set()
            if plan.options.match:
                for names in _aligned_layers(plan, sources, distances):
                    for name in names:
                        handle(name, writer)
                    handled.update(names)
            pending = [name for name in _order(plan) if name not in handled]
            for number, name in enumerate(pending):
                following = pending[number + 1] if number + 1 < len(pending) else None
                if following is not None and plan.rules[following] not in ("copy", "head"):
                    sources.prefetch(following)
                handle(name, writer)
            writer.finish()
        finally:
            sources.close()
            writer.abort()
        skipped = _write_side_files(plan, staged.path)
        report = _report(plan, distances, skipped)
        report["output"]["fingerprint"] = Checkpoint.open(staged.path, allow_nonfinite=True).fingerprint()
        report["timings"] = {**timings.as_dict(), "total": round(time.perf_counter() - started, 4)}
        write_json(staged.path / REPORT_NAME, report)  # the merged folder always says how it was made
        staged.commit()
    if report_path is not None:
        write_json(report_path, report, output=True)
    return report


def _report(plan: MergePlan, distances: list[Distance], skipped: list[str]) -> dict[str, Any]:
    options = plan.options
    counts: dict[str, int] = {}
    for rule in plan.rules.values():
        counts[rule] = counts.get(rule, 0) + 1
    models = []
    for index, (model, weight) in enumerate(zip(plan.models, plan.weights)):
        entry: dict[str, Any] = {"path": str(model.path), "fingerprint": model.fingerprint, "weight": weight}
        if model.stats is not None:
            entry["stats"] = {"path": str(model.stats.folder), "kind": model.stats.kind}
        if index and distances:
            entry["alignment"] = {k: v for k, v in distances[index - 1].as_dict().items() if k != "tensors"}
        models.append(entry)
    settings: dict[str, Any] = {"dtype": options.dtype, "exclude": list(options.exclude), "head_from": options.head_from,
                                "match": options.match}
    if options.method == "regmean":
        settings["alpha"] = options.alpha
    if options.method == "fisher":
        settings |= {"fisher_floor": options.fisher_floor, "fisher_normalize": options.fisher_normalize}
    if options.match:
        settings |= {"symmetries": sorted(options.symmetries), "max_rounds": options.max_rounds}
    return {
        "tool": "rotfuse", "version": __version__, "schema": 1, "command": "merge",
        "method": options.method,
        "models": models,
        "output": {"path": str(plan.out)},
        "device": plan.device,
        "settings": settings,
        "tensors": {"count": counts, "rules": plan.rules},
        "ignored_tensors": plan.ignored,
        "not_copied": skipped,
    }


def merge(models: Sequence[Path], out: Path, options: MergeOptions, report_path: Path | None = None,
          overwrite: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Merge MODELS into OUT; returns the report (see `run_merge`)."""
    plan = prepare_merge(models, out, options, overwrite, report_path)
    return run_merge(plan, overwrite, report_path, progress)
