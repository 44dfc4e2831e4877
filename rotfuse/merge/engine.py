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
- the method's name: where the method covers the tensor (`MergeMethod.covers`; for the
  statistics methods, where every model's statistics hold it);
- `simple`: everything else (for regmean: biases, norms, embeddings; for fisher: tensors that
  have no Fisher, e.g. buffers).

The method itself comes from the registry (rotfuse/merge/methods/): the engine knows no method by
name. A method that needs a base (`--base`) gets the base's tensor next to the models' ones.

This module never imports transformers: `merge --method simple` works without it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from rotfuse import __version__
from rotfuse.archs.bind import BoundArch, LayerId
from rotfuse.core import distributed
from rotfuse.core.distributed import Group, split_in_order
from rotfuse.core.errors import InputError, OutputError, UsageError
from rotfuse.core.progress import Progress
from rotfuse.core.report import SCHEMA_VERSION, Distance, Timings
from rotfuse.core.tensors import all_finite, weighted_average
from rotfuse.io.checkpoint import CONFIG_FILE, Checkpoint
from rotfuse.io.compat import PairRule, compare_tensors
from rotfuse.io.safetensors_file import FLOAT_DTYPES
from rotfuse.io.staging import StagedFolder, Target, check_outputs, write_json
from rotfuse.io.writer import (
    CheckpointWriter,
    ShardPlan,
    copy_side_files,
    open_writer,
    output_file_names,
    plan_like,
    side_files,
)
from rotfuse.merge.methods import method_class
from rotfuse.merge.methods.base import MergeMethod
from rotfuse.merge.stats.folder import StatsFolder
from rotfuse.symmetry.names import FFN_PERM, RESIDUAL, symmetry_set

REPORT_NAME = "rotfuse_merge.json"
# config.json keys that describe a task head's label space: taken from the --head-from model
LABEL_KEYS = ("id2label", "label2id", "num_labels", "_num_labels", "problem_type")


@dataclass(frozen=True)
class MergeOptions:
    method: str = "simple"
    weights: tuple[float, ...] | None = None  # per model; the method normalises them; None: uniform
    stats: tuple[Path, ...] = ()  # one statistics folder per model (fisher, regmean)
    settings: dict[str, Any] = field(default_factory=dict)  # the method's settings given (flag name -> value)
    base: Path | None = None  # the base model, for methods that take one (task vectors)
    dtype: str | None = None  # safetensors dtype for floating tensors; None: the first model's
    exclude: tuple[str, ...] = ()  # regexes (re.search) of tensors kept out of the merge
    head_from: int = 0  # model index the excluded tensors are copied from
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

    @cached_property
    def fingerprint(self) -> str:
        return self.checkpoint.fingerprint()


@dataclass
class MergePlan:
    """Everything checked before the first byte is written."""

    models: list[_Model]
    out: Path
    options: MergeOptions
    method: MergeMethod
    rules: dict[str, str]  # first model's tensor name -> rule
    ignored: list[str]  # tensors only some other model has (not in the output)
    device: str
    base: _Model | None = None

    @property
    def first(self) -> _Model:
        return self.models[0]

    @property
    def weights(self) -> list[float]:
        return self.method.weights

    @property
    def sources(self) -> list[_Model]:
        """Every checkpoint a tensor is read from: the models, then the base."""
        return [*self.models, *([self.base] if self.base else [])]


# ---------------------------------------------------------------------- checking


def _validate(
    models: Sequence[Path], options: MergeOptions
) -> tuple[type[MergeMethod], Any, list[float], list[re.Pattern[str]]]:
    """The method's class, settings and weights, and the --exclude patterns, or a usage error."""
    method = method_class(options.method)
    if len(models) < method.min_models:
        count = {2: "two", 3: "three"}.get(method.min_models, str(method.min_models))
        raise UsageError(f"merge needs at least {count} checkpoints, got {len(models)} (--method {method.name})")
    if method.max_models is not None and len(models) > method.max_models:
        raise UsageError(f"--method {method.name} merges at most {method.max_models} checkpoints, got {len(models)}")
    if method.needs_base and options.base is None:
        raise UsageError(f"--method {method.name} needs the models' common base: pass --base BASE")
    if not method.needs_base and options.base is not None:
        raise UsageError(f"--method {method.name} takes no base model; drop --base")
    weights = method.normalise(options.weights, len(models))
    settings = method.make_settings(options.settings)
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
            raise UsageError(
                f"--method {method.name} needs one --stats folder per model ({len(models)}), got {len(options.stats)}"
            )
    if options.match and RESIDUAL in options.symmetries:
        raise UsageError(
            "--match aligns layer by layer and cannot move the residual stream, which couples every layer: "
            "run `rotfuse match FIRST MODEL... -s default,residual -o ALIGNED` first, then merge the aligned copies"
        )
    if not 0 <= options.head_from < len(models):
        raise UsageError(f"--head-from {options.head_from}: must be a model index from 0 to {len(models) - 1}")
    patterns = []
    for text in options.exclude:
        try:
            patterns.append(re.compile(text))
        except re.error as exc:
            raise UsageError(f"--exclude {text!r}: not a regular expression ({exc})") from None
    return method, settings, weights, patterns


def _open_models(paths: Sequence[Path], options: MergeOptions) -> list[_Model]:
    if not options.match:
        return [_Model(Path(p), Checkpoint.open(p, allow_nonfinite=options.allow_nonfinite)) for p in paths]
    from rotfuse.align.pair import open_model

    opened = [open_model(Path(p), options.arch, options.arch_spec, options.allow_nonfinite) for p in paths]
    first = opened[0]
    for other in opened[1:]:
        if other.bound.spec.name != first.bound.spec.name or other.bound.dims != first.bound.dims:
            raise InputError(
                f"{other.folder}: architecture {other.bound.spec.name} {other.bound.dims} differs "
                f"from the first model's {first.bound.spec.name} {first.bound.dims}"
            )
    return [_Model(Path(p), o.checkpoint, o.bound) for p, o in zip(paths, opened)]


def _check_layout(models: list[_Model], excluded: Callable[[str], bool], head_from: int) -> list[str]:
    """Every tensor of the first model must exist with the same shape in every model (excluded
    tensors only in the head model). Returns the other models' tensors the output leaves out."""
    first = models[0].checkpoint
    model_type = first.config.get("model_type")
    for model in models[1:]:
        theirs = model.checkpoint.config.get("model_type")
        if theirs != model_type:
            raise InputError(
                f"{model.path}: model_type {theirs!r} differs from the first model's {model_type!r} ({models[0].path})"
            )
    for name in filter(excluded, first.names()):
        head = models[head_from].checkpoint
        if name not in head:
            raise InputError(f"{head.folder}: tensor {name!r} (excluded, to be copied with --head-from) not found")
    rule = PairRule(
        skip=excluded,
        extra_ok=True,
        hint=(
            "; if it is a task head with its own label space, keep it out with --exclude REGEX "
            "(and choose its source with --head-from N)"
        ),
        missing_hint=(" (merge needs checkpoints with the same tensors; --exclude REGEX leaves some out)"),
    )
    ignored = {name for model in models[1:] for name in compare_tensors(first, model.checkpoint, rule).extra}
    return sorted(ignored)


def _open_stats(models: list[_Model], options: MergeOptions, kind: str) -> list[StatsFolder]:
    for model, folder in zip(models, options.stats, strict=True):
        stats = StatsFolder.open(folder)
        if stats.kind != kind:
            raise InputError(
                f"{folder}: holds {stats.kind} statistics; --method {options.method} needs {kind} "
                f"(rotfuse stats --kind {kind})"
            )
        fingerprint = model.fingerprint
        if stats.fingerprint != fingerprint:
            raise InputError(
                f"{folder}: statistics belong to another checkpoint ({stats.source}, fingerprint "
                f"{stats.fingerprint[:12]}), not to {model.path} ({fingerprint[:12]}); statistics change with "
                f"the weights (matching rotates them), so compute them on the checkpoint you merge: "
                f"rotfuse stats {model.path} --kind {kind} ..."
            )
        model.stats = stats
    return [model.stats for model in models if model.stats is not None]


def _rule(name: str, sources: Sequence[_Model], method: MergeMethod, excluded: Callable[[str], bool]) -> str:
    if excluded(name):
        return "head"
    for model in sources:
        model.checkpoint.refuse_float8(name, "merge")  # (--exclude keeps a float8 head out of the merge)
    first = sources[0].checkpoint
    if first.entry(name).dtype not in FLOAT_DTYPES:
        return "copy"
    return method.name if method.covers(name) else "simple"


def prepare_merge(
    models: Sequence[Path],
    out: Path,
    options: MergeOptions,
    overwrite: bool = False,
    report: Path | None = None,
    inputs: Sequence[Path] = (),
) -> MergePlan:
    """Validate flags, output locations, checkpoints and statistics; decide every tensor's rule.
    `inputs`: other files the command read (its job file), which no output may replace."""
    from rotfuse.core.device import resolve_device

    method_cls, settings, weights, patterns = _validate(models, options)
    device = resolve_device(options.device)
    opened = _open_models([*models, *([options.base] if options.base else [])], options)
    base = opened.pop() if options.base else None
    check_outputs(
        [
            Target(Path(out), "-o", report=REPORT_NAME, holds=output_file_names(opened[0].checkpoint)),
            Target(report, "--report", folder=False, what="report") if report is not None else None,
        ],
        [*map(Path, models), *options.stats, options.arch_spec, options.base, *inputs],
        overwrite,
    )
    side_files(opened[0].checkpoint)

    def excluded(name: str) -> bool:
        return any(p.search(name) for p in patterns)

    for pattern in patterns:  # a typo must not silently merge a head
        if not any(pattern.search(name) for name in opened[0].checkpoint.names()):
            raise UsageError(f"--exclude {pattern.pattern!r}: matches no tensor of {opened[0].path}")
    ignored = _check_layout([*opened, *([base] if base else [])], excluded, options.head_from)
    stats = _open_stats(opened, options, method_cls.stats) if method_cls.stats is not None else []
    method = method_cls(settings, weights, stats, device)
    sources = [*opened, *([base] if base else [])]
    rules = {name: _rule(name, sources, method, excluded) for name in opened[0].checkpoint.names()}
    return MergePlan(opened, Path(out), options, method, rules, ignored, device, base)


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
    """Applies each tensor's rule: the method where it covers the tensor, else the weighted average."""

    plan: MergePlan
    sources: _Sources

    def merge(self, name: str) -> torch.Tensor:
        merged = self._merge(name)
        if not all_finite(merged) and not self.plan.options.allow_nonfinite:
            self.sources.blame_nonfinite(name)  # NaN/Inf in an input reach the average: name it
            rule = self.plan.rules[name]
            raise InputError(
                f"tensor {name!r}: the {rule} merge gives NaN or Inf values from finite inputs"
                + (" (is --fisher-floor too large?)" if rule == "fisher" else "")
                + "; nothing was written"
            )
        return merged

    def _merge(self, name: str) -> torch.Tensor:
        plan = self.plan
        tensors = self.sources.all(name)
        base = tensors.pop() if plan.base is not None else None
        if plan.rules[name] == plan.method.name:
            return plan.method.merge(name, tensors, base)
        return weighted_average(tensors, plan.weights)


def _order(plan: MergePlan) -> list[str]:
    """The first model's tensors, those of one method group next to each other (RegMean: the
    weights that read one Gram, q k v, so that its factorisation is computed once)."""
    groups: dict[str, list[str]] = {}
    for name in plan.first.checkpoint.names():
        key = plan.method.group(name) if plan.rules[name] == plan.method.name else name
        groups.setdefault(key, []).append(name)
    return [name for group in groups.values() for name in group]


class _Capture:
    """Stands in for a CheckpointWriter to collect `write_layer`'s named tensors in memory."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor


def _aligned_layers(
    plan: MergePlan, sources: _Sources, layers: Sequence[LayerId], rows: list[list[list[tuple[float, float]]]]
) -> Iterator[list[str]]:
    """With --match: align one layer of every model to the first model's, publish the aligned
    tensors in `sources`, yield the layer's tensor names; then forget them. `rows` gets, per
    layer and per other model, each matched tensor's squared distance to the first model's
    before and after (`_distances` adds them up in layer order)."""
    from rotfuse.align.layer import match_layer
    from rotfuse.align.pair import layer_settings
    from rotfuse.archs.layer_io import layer_tensor_names, read_layer, write_layer

    anchor = plan.first
    for layer in layers:
        assert anchor.bound is not None  # layers only with --match
        anchor_weights = read_layer(anchor.checkpoint, anchor.bound, layer, plan.device)
        per_model = []
        for index, model in enumerate(plan.sources[1:], start=1):
            assert model.bound is not None
            settings = layer_settings(
                model.bound, layer, plan.options.symmetries, plan.options.max_rounds, plan.options.allow_nonfinite
            )
            weights = read_layer(model.checkpoint, model.bound, layer, plan.device)
            aligned, results = match_layer(weights, anchor_weights, settings)
            per_model.append([(result.before**2, result.after**2) for result in results])
            capture = _Capture()
            write_layer(capture, model.bound, layer, aligned)  # type: ignore[arg-type]
            sources.aligned[index] = capture.tensors
        rows.append(per_model)
        yield layer_tensor_names(anchor.bound, layer, anchor.checkpoint)
        sources.aligned = [{} for _ in plan.sources]


def _distances(plan: MergePlan, rows: Sequence[list[list[tuple[float, float]]]]) -> list[Distance]:
    """Each other model's distance to the first one over the matched tensors, summed in layer
    order (so a distributed job reports one process's floats)."""
    distances = [Distance() for _ in plan.sources[1:]]
    for per_model in rows:
        for distance, pairs in zip(distances, per_model):
            for before, after in pairs:
                distance.add(before, after, 0)
    return distances


def _match_layers(plan: MergePlan, group: Group | None) -> tuple[list[LayerId], list[LayerId], set[str]]:
    """With --match: every layer, this rank's layers (balanced by estimated cost, as `rotfuse
    match` shares them) and the names of every tensor inside a layer."""
    from rotfuse.align.pair import OpenedModel
    from rotfuse.align.share import my_layers
    from rotfuse.archs.layer_io import layer_tensor_names

    anchor = plan.first
    assert anchor.bound is not None
    layers = list(anchor.bound.layers())
    inside = {name for layer in layers for name in layer_tensor_names(anchor.bound, layer, anchor.checkpoint)}
    if group is None:
        return layers, layers, inside
    model = OpenedModel(anchor.checkpoint, anchor.bound)
    return layers, my_layers(group, model, layers, FFN_PERM in plan.options.symmetries), inside


def _plans(plan: MergePlan) -> list[ShardPlan]:
    """The first model's layout; excluded heads take the --head-from model's shapes."""
    plans = plan_like(plan.first.checkpoint, plan.options.dtype)
    head = plan.models[plan.options.head_from].checkpoint
    for shard in plans:
        shard.tensors = [
            (name, dtype, head.entry(name).shape if plan.rules[name] == "head" else shape)
            for name, dtype, shape in shard.tensors
        ]
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


def _my_names(plan: MergePlan, order: list[str], group: Group | None) -> list[str]:
    """This rank's tensors, in merge order: the method groups (RegMean: the q k v of one Gram)
    cut into consecutive ranges of about equal bytes read and written, one range per rank."""
    if group is None:
        return order
    groups: dict[str, list[str]] = {}
    for name in order:
        key = plan.method.group(name) if plan.rules[name] == plan.method.name else name
        groups.setdefault(key, []).append(name)

    def cost(name: str) -> float:
        reads = 1 if plan.rules[name] in ("copy", "head") else len(plan.sources)
        return float((reads + 1) * plan.first.checkpoint.entry(name).nbytes)

    members = list(groups.values())
    owner = split_in_order([sum(map(cost, names)) for names in members], group.world)
    return [name for names, rank in zip(members, owner) if rank == group.rank for name in names]


def run_merge(
    plan: MergePlan, overwrite: bool = False, report_path: Path | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Write the merged checkpoint described by `plan`; returns the report (written as
    OUT/rotfuse_merge.json, and also to `report_path` when given).

    In a distributed job (core/distributed.py; merge/scaleout.py) every rank merges its range of
    the tensors into the files rank 0 staged (`open_writer`); rank 0 writes the index, the side
    files and the report, and commits once every rank has agreed its part is written."""
    started = time.perf_counter()
    group = distributed.current()
    main = group is None or group.is_main
    timings = Timings()
    sources = _Sources(plan.sources)
    merger = _Merger(plan, sources)
    distances: list[Distance] = []
    rows: list[list[list[tuple[float, float]]]] = []  # --match: per layer of this rank, per other model
    layers, mine, inside = _match_layers(plan, group) if plan.options.match else ([], [], set())
    head_from = plan.options.head_from
    done = 0

    def handle(name: str, writer: CheckpointWriter, total: int) -> None:
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

    def write_all(folder: Path) -> None:
        writer = open_writer(
            folder, _plans(plan), plan.first.checkpoint, plan.options.fsync, plan.options.allow_nonfinite, group
        )
        try:
            for names in _aligned_layers(plan, sources, mine, rows):  # --match: this rank's layers
                for name in names:
                    handle(name, writer, len(plan.rules))
            pending = _my_names(plan, [name for name in _order(plan) if name not in inside], group)
            writer.leave_to_others(set(writer.pending) - set(pending))
            for number, name in enumerate(pending):
                following = pending[number + 1] if number + 1 < len(pending) else None
                if following is not None and plan.rules[following] not in ("copy", "head"):
                    sources.prefetch(following)
                handle(name, writer, len(inside) + len(pending))
            writer.finish(index=main)
        finally:
            sources.close()
            writer.abort()

    def write_report(staged: StagedFolder) -> dict[str, Any]:
        skipped = _write_side_files(plan, staged.path)
        report = _report(plan, distances, skipped)
        report["output"]["fingerprint"] = Checkpoint.open(staged.path, allow_nonfinite=True).fingerprint()
        report["timings"] = {**timings.as_dict(), "total": round(time.perf_counter() - started, 4)}
        write_json(staged.path / REPORT_NAME, report)  # the merged folder always says how it was made
        staged.commit()
        return report

    if group is None:
        with StagedFolder(plan.out, overwrite, plan.options.fsync) as staged:
            write_all(staged.path)
            if plan.options.match:
                distances[:] = _distances(plan, rows)
            report = write_report(staged)
    else:
        from rotfuse.align.share import merge_timings

        made = group.agree(
            "stage output", lambda: StagedFolder(plan.out, overwrite, plan.options.fsync) if main else None
        )
        with made if made is not None else nullcontext():
            folder = Path(group.broadcast(str(made.path) if made is not None else None))
            group.agree("merge tensors", lambda: write_all(folder))
            merge_timings(group, timings)
            if plan.options.match:
                from rotfuse.align.share import in_layer_order

                distances[:] = _distances(plan, in_layer_order(group, layers, mine, rows))
            report = group.broadcast(group.agree("commit", lambda: write_report(made) if made is not None else None))
    if report_path is not None and main:
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
    base: dict[str, Any] | None = None
    if plan.base is not None:
        base = {"path": str(plan.base.path), "fingerprint": plan.base.fingerprint}
        if distances:
            base["alignment"] = {k: v for k, v in distances[-1].as_dict().items() if k != "tensors"}
    settings: dict[str, Any] = {
        "dtype": options.dtype,
        "exclude": list(options.exclude),
        "head_from": options.head_from,
        "match": options.match,
    }
    settings |= plan.method.describe()
    if options.match:
        settings |= {"symmetries": sorted(options.symmetries), "max_rounds": options.max_rounds}
    return {
        "tool": "rotfuse",
        "version": __version__,
        "schema": SCHEMA_VERSION,
        "command": "merge",
        "method": options.method,
        "models": models,
        **({"base": base} if base is not None else {}),
        "output": {"path": str(plan.out)},
        "device": plan.device,
        "settings": settings,
        "tensors": {"count": counts, "rules": plan.rules},
        "ignored_tensors": plan.ignored,
        "not_copied": skipped,
    }


def merge(
    models: Sequence[Path],
    out: Path,
    options: MergeOptions,
    report_path: Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Merge MODELS into OUT; returns the report (see `run_merge`)."""
    plan = prepare_merge(models, out, options, overwrite, report_path)
    return run_merge(plan, overwrite, report_path, progress)
