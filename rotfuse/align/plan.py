"""Everything `match` checks before it writes a byte: flags, output location, both checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotfuse import __version__
from rotfuse.align.options import REPORT_NAME, MatchOptions, check_learn_choices
from rotfuse.align.pair import (
    OpenedModel,
    check_compatible,
    in_layers,
    open_model,
    select_layers,
)
from rotfuse.align.residual.setup import ResidualSetup, prepare_residual
from rotfuse.archs.bind import LayerId
from rotfuse.core.device import resolve_device
from rotfuse.core.errors import UsageError
from rotfuse.io.staging import Target, check_outputs
from rotfuse.io.writer import output_file_names, side_files
from rotfuse.symmetry.names import RESIDUAL


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
            "tool": "rotfuse",
            "version": __version__,
            "command": "match",
            "dry_run": True,
            "anchor": str(self.anchor.folder),
            "model": str(self.model.folder),
            "output": str(self.out),
            "arch": self.model.bound.spec.name,
            "device": self.device,
            "symmetries": sorted(self.model.bound.applicable(self.options.symmetries)),
            "restrictions": self.model.bound.notes,
            "layers": [str(layer) for layer in self.layers],
            "tensors": {
                "transformed": len(touched),
                "copied": len(self.model.checkpoint.names()) - len(touched),
                "unpaired": self.unpaired,
            },
            "bytes_to_write": sum(self.model.checkpoint.entry(n).nbytes for n in self.model.checkpoint.names()),
        }
        if self.residual is not None:
            described["residual"] = self.residual.describe(self.options)
        return described


def match_inputs(anchor_path: Path, model_paths: list[Path], options: MatchOptions) -> list[Path | None]:
    """Every path `match` reads: no output may touch one (io/staging.check_outputs)."""
    return [anchor_path, *model_paths, options.data, options.eval_data, options.arch_spec]


def prepare_match(
    anchor_path: Path,
    model_path: Path,
    out: Path,
    options: MatchOptions,
    overwrite: bool = False,
    check_output: bool = True,
    report: Path | None = None,
) -> MatchPlan:
    """Validate flags, output locations and both checkpoints (headers, config, shapes, side files)
    before anything is written."""
    device = resolve_device(options.device)
    if options.learn and options.data is None:
        raise UsageError("--learn trains on data: pass the training inputs with --data")
    if options.eval_data is not None and not options.learn:
        raise UsageError("--eval-data is the held-out set of --learn: add --learn")
    check_learn_choices(options.lambda_schedule, options.learn_decay, options.learn_keep, options.eval_data is not None)
    if options.data is not None and RESIDUAL not in options.symmetries and not options.learn:
        raise UsageError("--data drives the residual-stream map: add residual to --symmetries")
    anchor = open_model(anchor_path, options.arch, options.arch_spec, options.allow_nonfinite)
    model = open_model(model_path, options.arch, options.arch_spec, options.allow_nonfinite)
    if check_output:
        check_outputs(
            [
                Target(out, "-o", report=None if report else REPORT_NAME, holds=output_file_names(model.checkpoint)),
                Target(report, "--report", folder=False, what="report") if report else None,
            ],
            match_inputs(anchor_path, [model_path], options),
            overwrite,
        )
    side_files(model.checkpoint)
    unpaired = check_compatible(anchor, model)
    if options.data is not None or options.learn:  # the models will run: nothing of theirs may execute
        from rotfuse.eval.runtime import refuse_remote_code

        for folder in (anchor_path, model_path):
            refuse_remote_code(folder)
    layers = select_layers(model.bound, options.layers)
    residual = prepare_residual(anchor, model, options)
    return MatchPlan(anchor, model, Path(out), layers, unpaired, device, options, residual)
