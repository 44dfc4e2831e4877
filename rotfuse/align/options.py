"""The settings of one `rotfuse match` or `rotfuse scramble` run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rotfuse.core.distributed import cpu_share
from rotfuse.core.selection import LayerRanges
from rotfuse.symmetry.names import symmetry_set

REPORT_NAME = "rotfuse_report.json"  # the report inside a match output
MAX_DEFAULT_WORKERS = 4  # layers in flight are memory: more threads than this only on request


def default_workers() -> int:
    """Layer threads when --workers is not given: one per CPU of this process's share
    (`cpu_share`: its affinity mask, split among the ranks of a launch that share it), at most
    MAX_DEFAULT_WORKERS."""
    return min(MAX_DEFAULT_WORKERS, cpu_share())


# learned matching's choices: l per step, the learning rate's course, which step's maps are written
LAMBDA_RANGES = {"fixed": (0.5, 0.5), "uniform": (0.3, 0.7), "full": (0.0, 1.0)}
LEARN_DECAYS = ("constant", "cosine")
LEARN_KEEPS = ("last", "best")  # best: the logged step with the lowest held-out loss


def check_learn_choices(schedule: str, decay: str, keep: str, held_out: bool) -> None:
    """Refuse an unknown --lambda-schedule / --learn-decay / --learn-keep, and keep=best without
    held-out data, naming the flag."""
    from rotfuse.core.errors import UsageError

    for flag, value, choices in (
        ("--lambda-schedule", schedule, tuple(LAMBDA_RANGES)),
        ("--learn-decay", decay, LEARN_DECAYS),
        ("--learn-keep", keep, LEARN_KEEPS),
    ):
        if value not in choices:
            raise UsageError(f"{flag} {value!r}: use {', '.join(choices[:-1])} or {choices[-1]}")
    if keep == "best" and not held_out:
        raise UsageError("--learn-keep best chooses the step by held-out loss: give --eval-data")


@dataclass(frozen=True)
class MatchOptions:
    symmetries: frozenset[str] = field(default_factory=lambda: symmetry_set("default"))
    layers: LayerRanges | frozenset[int] | None = None  # None: every layer
    device: str = "auto"
    max_rounds: int = 20
    arch: str | None = None
    arch_spec: Path | None = None
    allow_nonfinite: bool = False
    workers: int = field(default_factory=default_workers)  # layers read and solved concurrently
    # residual stream (symmetry "residual")
    data: Path | None = None  # activation matching on these inputs; weight matching without
    residual_rounds: int = 8  # weight matching: most alternations of stream map and per-layer maps
    data_samples: int = 256
    data_batch_size: int = 16
    allow_untie: bool = False  # RMSNorm with tied embeddings: fold anyway, untying the head
    allow_stream_output: bool = False  # a headless model's outputs are the stream itself
    fsync: bool = True  # flush the output to disk before it is moved into place (io/staging.py)
    # learned matching (align/learned/): refine the matched copy for the loss of its average with the anchor
    learn: bool = False  # train on `data`
    eval_data: Path | None = None  # held-out inputs: loss reported per logged step, never optimised
    learn_steps: int = 300
    learn_rate: float = 1e-2
    lambda_schedule: str = "uniform"  # fixed (l = 0.5), uniform (l in [0.3, 0.7] each step) or full ([0, 1])
    seed: int = 0
    learn_keep: str = "last"  # or "best": the logged step with the lowest --eval-data loss
    learn_decay: str = "constant"  # or "cosine": the learning rate falls to 0 along a half cosine
    learn_log_every: int = 25  # steps between the logged (and --learn-keep best's candidate) steps
    learn_perm_rate: float | None = None  # the relaxed FFN/head permutation matrices' rate (None: learn_rate)
