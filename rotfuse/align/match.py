"""`rotfuse match`: align MODEL to ANCHOR and write the aligned copy with its report.

For each layer: read the model's (and the anchor's) tensors of that layer, solve and apply the
per-layer maps, write them at their place in the output; every other tensor is moved with the
residual stream when a stream map is in play, else copied byte for byte. A few layers of each
checkpoint are in memory at a time (pool.py). The output is staged and renamed into place only
when complete (io/staging.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
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
from rotfuse.core.errors import UsageError
from rotfuse.core.progress import Progress
from rotfuse.core.report import SCHEMA_VERSION, Distance
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.io.staging import StagedFolder, Target, check_outputs, write_json
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
    rows, outside, skipped = write_copy(
        model, folder, plan.layers, device, options.workers, transform, side, stream, progress,
        anchor, anchor_side, unmoved, stored_ffn, options.fsync, options.allow_nonfinite,
        FFN_PERM in options.symmetries)
    matched = Distance(tensors=sum(1 for layer in plan.layers
                                   for _ in layer_tensor_names(model.bound, layer, model.checkpoint)))
    for row in rows:
        for module in row["modules"].values():
            matched.add(module["before"] ** 2, module["after"] ** 2, 0)
    whole = Distance(matched.before + outside.before, matched.after + outside.after, matched.tensors + outside.tensors)
    report: dict[str, Any] = {
        "tool": "rotfuse", "version": __version__, "schema": SCHEMA_VERSION, "command": "match",
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
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Align MODEL to ANCHOR and write it to OUT; returns the report. With `options.learn`, the
    matched copy is then refined by learned matching (align/learned/); `log` gets its progress lines."""
    plan = prepare_match(anchor_path, model_path, out, options, overwrite, report=report_path)
    with StagedFolder(out, overwrite, options.fsync) as staged:
        if options.learn:
            report = _learn_into(plan, staged.path, progress, log)
        else:
            report = _match_into(plan, staged.path, progress)
        _commit_with_report(staged, report, report_path)
    return report


def _learn_into(plan: MatchPlan, folder: Path, progress: Progress | None,
                log: Callable[[str], None] | None) -> dict[str, Any]:
    """Match into a scratch folder, then refine that copy by learned matching into `folder`."""
    from rotfuse.align.learned.loop import LearnSettings, learn_into
    from rotfuse.io.staging import temporary_folder

    options = plan.options
    assert options.data is not None
    settings = LearnSettings(options.data, options.eval_data, options.learn_steps, options.learn_rate,
                             options.lambda_schedule, options.seed, options.data_batch_size, device=plan.device)
    with temporary_folder("matched", folder.parent) as tmp:
        matched = Path(tmp) / "matched"
        report = _match_into(plan, matched, progress)
        symmetries = options.symmetries - plan.model.bound.disabled
        report["learned"] = learn_into(plan.anchor, matched, folder, plan.layers, symmetries, settings, log)
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
    if options.learn:
        raise UsageError("--learn refines one model at a time: pass a single MODEL")
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
        report = {"tool": "rotfuse", "version": __version__, "schema": SCHEMA_VERSION, "command": "match",
                  "anchor": reports[0]["anchor"], "outputs": dict(zip(names, (str(Path(out) / n) for n in names))),
                  "models": reports}
        _commit_with_report(staged, report, report_path)
    return report
