"""`rotfuse match` as one job of several processes (torchrun, srun): see core/distributed.py.

Every rank checks the inputs and transforms its share of the layers into the same staged files
(align/copy.py); rank 0 creates the staging folder, writes the report and commits once every rank
has agreed that its part is written. Output bytes and report (timings apart) are those of one
process."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from rotfuse.align.options import MatchOptions
from rotfuse.core.distributed import job
from rotfuse.core.progress import Progress
from rotfuse.io.staging import StagedFolder


def match_on_group(anchor_path: Path, model_path: Path, out: Path, options: MatchOptions,
                   report_path: Path | None = None, overwrite: bool = False,
                   progress: Progress | None = None) -> dict[str, Any]:
    """`match.match` with the work shared among the ranks of this launch."""
    from rotfuse.align.match import _commit_with_report, _match_into
    from rotfuse.align.plan import prepare_match

    with job() as group:
        assert group is not None
        plan = group.agree("check inputs", lambda: prepare_match(anchor_path, model_path, out, options, overwrite,
                                                                 report=report_path))
        staged = group.agree("stage output", lambda: StagedFolder(out, overwrite, options.fsync)
                             if group.is_main else None)
        with staged if staged is not None else nullcontext():
            folder = Path(group.broadcast(str(staged.path) if staged is not None else None))
            report = group.agree("report", lambda: _match_into(plan, folder, progress))  # all read it before the rename
            group.agree("commit", lambda: _commit_with_report(staged, report, report_path)
                        if staged is not None else None)
        return report
