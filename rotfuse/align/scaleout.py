"""`rotfuse match` as one job of several processes (torchrun, srun): see core/distributed.py.

Every rank checks the inputs and transforms its share of the layers into the same staged files
(align/copy.py); rank 0 creates the staging folder, writes the report and commits once every rank
has agreed that its part is written. Output bytes and report (timings apart) are those of one
process."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from rotfuse.align import match as single
from rotfuse.align.options import MatchOptions
from rotfuse.core.distributed import job, launch_env
from rotfuse.core.errors import UsageError
from rotfuse.core.progress import Progress
from rotfuse.io.staging import StagedFolder


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
    """`match.match`, shared among the processes of a torchrun / srun launch when there is one."""
    if launch_env() is None:
        return single.match(anchor_path, model_path, out, options, report_path, overwrite, progress, log, skip_existing)
    if options.learn:
        raise UsageError("--learn runs in one process: launch it without torchrun / srun tasks")
    if skip_existing:
        raise UsageError("--skip-existing runs in one process: launch it without torchrun / srun tasks")
    return match_on_group(anchor_path, model_path, out, options, report_path, overwrite, progress)


def match_many(
    anchor_path: Path,
    model_paths: list[Path],
    out: Path,
    options: MatchOptions,
    report_path: Path | None = None,
    batch: single.Batch | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """`match.match_many`; not shared among processes (one model per launch: array jobs use --shard)."""
    if launch_env() is not None:
        raise UsageError(
            "several MODELs in one multi-process launch are not supported: launch once per model, "
            "or run one process per task with --shard I/N"
        )
    return single.match_many(anchor_path, model_paths, out, options, report_path, batch or single.Batch(), progress)


def match_on_group(
    anchor_path: Path,
    model_path: Path,
    out: Path,
    options: MatchOptions,
    report_path: Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """`match.match` with the work shared among the ranks of this launch."""
    from rotfuse.align.plan import prepare_match

    with job() as group:
        assert group is not None
        plan = group.agree(
            "check inputs", lambda: prepare_match(anchor_path, model_path, out, options, overwrite, report=report_path)
        )
        staged = group.agree(
            "stage output", lambda: StagedFolder(out, overwrite, options.fsync) if group.is_main else None
        )
        with staged if staged is not None else nullcontext():
            folder = Path(group.broadcast(str(staged.path) if staged is not None else None))
            # a step of its own: every rank has read the output (fingerprint) before the rename
            report = group.agree("report", lambda: single._match_into(plan, folder, progress))
            group.agree(
                "commit",
                lambda: single._commit_with_report(staged, report, report_path) if staged is not None else None,
            )
        return report
