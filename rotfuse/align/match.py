"""`rotfuse match`: align MODEL to ANCHOR and write the aligned copy with its report.

For each layer: read the model's (and the anchor's) tensors of that layer, solve and apply the
per-layer maps, write them at their place in the output; every other tensor is moved with the
residual stream when a stream map is in play, else copied byte for byte. A few layers of each
checkpoint are in memory at a time (pool.py). The output is staged and renamed into place only
when complete (io/staging.py); with several models, each one as soon as it is done (match_many),
and --skip-existing keeps those a report proves finished with the same inputs and settings."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotfuse import __version__
from rotfuse.align.copy import write_copy
from rotfuse.align.layer import match_layer
from rotfuse.align.options import REPORT_NAME, MatchOptions
from rotfuse.align.pair import layer_settings
from rotfuse.align.plan import MatchPlan, match_inputs, prepare_match
from rotfuse.align.pool import Stream
from rotfuse.align.residual.scores import StreamSide
from rotfuse.align.residual.search import search_stream_maps
from rotfuse.align.residual.setup import gains_from
from rotfuse.archs.bind import LayerId
from rotfuse.archs.layer_io import layer_tensor_names, read_layer
from rotfuse.core import signals
from rotfuse.core.errors import RotfuseError, UsageError
from rotfuse.core.progress import Progress
from rotfuse.core.report import SCHEMA_VERSION, Distance, dumps_strict
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.io.staging import StagedFolder, Target, check_outputs, write_json
from rotfuse.io.writer import output_file_names
from rotfuse.symmetry.names import FFN_PERM
from rotfuse.symmetry.weights import LayerWeights


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
        ref = stream.timed(
            "read",
            lambda: read_layer(anchor.checkpoint, anchor.bound, layer, device, anchor_side.layer_view, stored_ffn),
        )
        settings = layer_settings(model.bound, layer, options.symmetries, options.max_rounds, options.allow_nonfinite)
        new, results = stream.timed("solve", lambda: match_layer(weights, ref, settings))
        modules = {}
        for result in results:
            modules[result.module] = {
                "before": result.before,
                "after": result.after,
                "reduction": result.reduction,
                "applied": result.applied,
                "rounds": result.rounds,
                "reverted": result.reverted,
                **({"skipped": result.skipped} if result.skipped else {}),
                **result.extra,
            }
        return new, {"layer": str(layer), "modules": modules}

    folder.mkdir(parents=True, exist_ok=True)
    rows, outside, skipped = write_copy(
        model,
        folder,
        plan.layers,
        device,
        options.workers,
        transform,
        side,
        stream,
        progress,
        anchor,
        anchor_side,
        unmoved,
        stored_ffn,
        options.fsync,
        options.allow_nonfinite,
        FFN_PERM in options.symmetries,
    )
    matched = Distance(
        tensors=sum(1 for layer in plan.layers for _ in layer_tensor_names(model.bound, layer, model.checkpoint))
    )
    for row in rows:
        for module in row["modules"].values():
            matched.add(module["before"] ** 2, module["after"] ** 2, 0)
    whole = Distance(matched.before + outside.before, matched.after + outside.after, matched.tensors + outside.tensors)
    report: dict[str, Any] = {
        "tool": "rotfuse",
        "version": __version__,
        "schema": SCHEMA_VERSION,
        "command": "match",
        "anchor": {"path": str(anchor.folder), "fingerprint": anchor.checkpoint.fingerprint()},
        "model": {"path": str(model.folder), "fingerprint": model.checkpoint.fingerprint()},
        "output": {"path": str(plan.out), "fingerprint": Checkpoint.open(folder, True).fingerprint()},
        "arch": model.bound.spec.name,
        "symmetries": sorted(model.bound.applicable(options.symmetries)),
        "device": device,
        "settings": {"max_rounds": options.max_rounds, "layers": [str(layer) for layer in plan.layers]},
        "settings_fingerprint": settings_fingerprint(options),
        "restrictions": model.bound.notes,
    }
    if residual_report is not None:
        report["residual"] = residual_report
    report.update(
        {
            "layers": rows,
            "totals": {"matched": matched.as_dict(), "model": whole.as_dict()},
            "unpaired_tensors": plan.unpaired,
            "not_copied": skipped,
        }
    )
    stream.timings.add("total", time.perf_counter() - started)
    report["timings"] = stream.timings.as_dict()
    return report


def settings_fingerprint(options: MatchOptions) -> str:
    """A hash of every setting that changes what `match` writes (not where or how fast): a
    finished output is reused by --skip-existing only if it was made with the same ones."""

    def content(path: Path | None) -> str | None:
        return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()

    settings = {
        "symmetries": sorted(options.symmetries),
        "layers": str(options.layers),
        "max_rounds": options.max_rounds,
        "arch": options.arch,
        "arch_spec": content(options.arch_spec),
        "allow_nonfinite": options.allow_nonfinite,
        "data": content(options.data),
        "residual_rounds": options.residual_rounds,
        "data_samples": options.data_samples,
        "data_batch_size": options.data_batch_size,
        "allow_untie": options.allow_untie,
        "allow_stream_output": options.allow_stream_output,
    }
    return hashlib.sha256(dumps_strict(settings).encode()).hexdigest()


def finished_report(plan: MatchPlan, folder: Path, report_path: Path | None = None) -> dict[str, Any] | None:
    """The report of an output `match` already finished for this plan -- same anchor, model and
    settings fingerprints, and the output still the one the report describes -- else None (no
    output, no report, a stale or an altered one: it is redone)."""
    from rotfuse.io.untrusted import read_json

    where = report_path or Path(folder) / REPORT_NAME
    if not Path(folder).is_dir() or not where.is_file():
        return None
    try:
        report = read_json(where, "report")
        same = (
            isinstance(report, dict)
            and report.get("anchor", {}).get("fingerprint") == plan.anchor.checkpoint.fingerprint()
            and report.get("model", {}).get("fingerprint") == plan.model.checkpoint.fingerprint()
            and report.get("settings_fingerprint") == settings_fingerprint(plan.options)
            and report.get("output", {}).get("fingerprint") == Checkpoint.open(folder, True).fingerprint()
        )
    except (RotfuseError, OSError, AttributeError):
        return None
    return report if same else None


def match(
    anchor_path: Path,
    model_path: Path,
    out: Path,
    options: MatchOptions,
    report_path: Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    skip_existing: bool = False,
) -> dict[str, Any]:
    """Align MODEL to ANCHOR and write it to OUT; returns the report. With `options.learn`, the
    matched copy is then refined by learned matching (align/learned/); `log` gets its progress lines.
    `skip_existing`: an OUT this very job finished before is kept (the report says "skipped"), any
    other one replaced."""
    plan = prepare_match(anchor_path, model_path, out, options, overwrite or skip_existing, report=report_path)
    if skip_existing and (done := finished_report(plan, out, report_path)) is not None:
        return {**done, "skipped": True}
    with StagedFolder(out, overwrite or skip_existing, options.fsync) as staged:
        if options.learn:
            report = _learn_into(plan, staged.path, progress, log)
        else:
            report = _match_into(plan, staged.path, progress)
        _commit_with_report(staged, report, report_path)
    return report


def _learn_into(
    plan: MatchPlan, folder: Path, progress: Progress | None, log: Callable[[str], None] | None
) -> dict[str, Any]:
    """Match into a scratch folder, then refine that copy by learned matching into `folder`."""
    from rotfuse.align.learned.loop import LearnSettings, learn_into
    from rotfuse.io.staging import temporary_folder

    options = plan.options
    assert options.data is not None
    settings = LearnSettings(
        options.data,
        options.eval_data,
        options.learn_steps,
        options.learn_rate,
        options.lambda_schedule,
        options.seed,
        options.data_batch_size,
        device=plan.device,
        keep=options.learn_keep,
        decay=options.learn_decay,
        log_every=options.learn_log_every,
        perm_rate=options.learn_perm_rate,
    )
    with temporary_folder("matched", folder.parent) as tmp:
        matched = Path(tmp) / "matched"
        report = _match_into(plan, matched, progress)
        symmetries = options.symmetries - plan.model.bound.disabled
        report["learned"] = learn_into(plan.anchor, matched, folder, plan.layers, symmetries, settings, log, progress)
    report["output"]["fingerprint"] = Checkpoint.open(folder, True).fingerprint()
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


@dataclass(frozen=True)
class Batch:
    """How `match` runs several models: which share of them this task does (`shard` = (i, n):
    every n-th model from the i-th, 0-based, of the full list), whether finished outputs are
    kept (`skip_existing`) or replaced (`overwrite`), and what to call after each model."""

    overwrite: bool = False
    skip_existing: bool = False
    shard: tuple[int, int] | None = None
    on_model: Callable[[int, int, str], None] | None = None  # (k, M, name) as model k of M starts

    def report_name(self) -> str:
        """The combined report in OUT: one per shard, so that array tasks never write one file."""
        if self.shard is None:
            return REPORT_NAME
        return REPORT_NAME.replace(".json", f".shard-{self.shard[0]}-of-{self.shard[1]}.json")


def match_many(
    anchor_path: Path,
    model_paths: list[Path],
    out: Path,
    options: MatchOptions,
    report_path: Path | None = None,
    batch: Batch = Batch(),
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Align several models to one anchor: OUT/<model name>/ each, with its own report, and a
    combined report. Every model's headers, config and shapes are checked before any work; each
    model is moved into place as soon as it is done, so a killed or failed job keeps the models
    finished before it (rerun with skip_existing to do only the rest)."""
    if options.learn:
        raise UsageError("--learn refines one model at a time: pass a single MODEL")
    names = output_names(model_paths)  # from the full list: every shard names a model alike
    chosen = list(range(len(model_paths)))
    if batch.shard is not None:
        chosen = chosen[batch.shard[0] :: batch.shard[1]]
    plans = [
        prepare_match(anchor_path, model_paths[i], Path(out) / names[i], options, check_output=False) for i in chosen
    ]
    container = batch.overwrite or batch.skip_existing or batch.shard is not None  # OUT may exist already
    check_outputs(
        [
            Target(out, "-o", report=None if report_path else batch.report_name(), holds=tuple(names)),
            Target(report_path, "--report", folder=False, what="report") if report_path else None,
        ],
        match_inputs(anchor_path, model_paths, options),
        container,
    )
    for plan in plans:
        check_outputs(
            [Target(plan.out, "-o", report=REPORT_NAME, holds=output_file_names(plan.model.checkpoint))],
            match_inputs(anchor_path, model_paths, options),
            batch.overwrite or batch.skip_existing,
        )
    Path(out).mkdir(parents=True, exist_ok=True)
    reports = []
    for number, plan in enumerate(plans):
        if batch.on_model is not None:
            batch.on_model(number + 1, len(plans), plan.out.name)
        if batch.skip_existing and (done := finished_report(plan, plan.out)) is not None:
            reports.append({**done, "skipped": True})
            continue
        with StagedFolder(plan.out, batch.overwrite or batch.skip_existing, options.fsync) as staged:
            reports.append(_match_into(plan, staged.path, progress))
            _commit_with_report(staged, reports[-1], None)
        signals.output_finished(plan.out)
    report = {
        "tool": "rotfuse",
        "version": __version__,
        "schema": SCHEMA_VERSION,
        "command": "match",
        "anchor": {"path": str(anchor_path)},
        "outputs": {p.out.name: str(p.out) for p in plans},
        "shard": list(batch.shard) if batch.shard else None,
        "models": reports,
    }
    write_json(report_path or Path(out) / batch.report_name(), report, output=True)
    return report
