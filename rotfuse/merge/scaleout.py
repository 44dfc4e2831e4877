"""`rotfuse merge` as one job of several processes (torchrun, srun): see core/distributed.py.

Every rank checks the inputs and merges its range of the tensors (engine.run_merge) into the
files rank 0 staged; rank 0 writes the index, side files and report and commits once every rank
has agreed that its part is written. With `--match` each rank also aligns and merges its share of
the layers (balanced as `rotfuse match` balances them). Output bytes and report (timings apart)
are those of one process."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rotfuse.core.distributed import job, launch_env
from rotfuse.core.progress import Progress
from rotfuse.merge.engine import MergeOptions, prepare_merge, run_merge


def merge(
    models: Sequence[Path],
    out: Path,
    options: MergeOptions,
    report_path: Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    inputs: Sequence[Path] = (),
) -> dict[str, Any]:
    """`engine.merge`, shared among the processes of a torchrun / srun launch when there is one.
    `inputs`: other files the command read (its job file), which no output may replace."""
    if launch_env() is None:
        plan = prepare_merge(models, out, options, overwrite, report_path, inputs)
        return run_merge(plan, overwrite, report_path, progress)
    with job() as group:
        assert group is not None
        plan = group.agree("check inputs", lambda: prepare_merge(models, out, options, overwrite, report_path, inputs))
        return run_merge(plan, overwrite, report_path, progress)
