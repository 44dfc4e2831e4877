"""Several processes on one job: launch detection, the process group, agreement on failure.

A command is distributed when it runs under `torchrun` (RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT) or as the tasks of one SLURM `srun` step (SLURM_PROCID / SLURM_STEP_NUM_TASKS, with
MASTER_ADDR exported by the job script) with more than one process. The default group is gloo
(objects and status flags travel on the CPU); when every rank has a GPU, tensor reductions use an
extra nccl group.

Every rank runs the same sequence of steps. `Group.agree` runs one step and then gathers every
rank's status: if any rank failed, every rank raises `JobFailed` with the first failure's message
and exit code, so the job fails as one (rank 0 prints the one line; nothing is committed). A rank
that fails outside a step calls `abandon`, whose gather pairs with the other ranks' next step.
Collectives time out (ROTFUSE_DIST_TIMEOUT seconds, default 1800) rather than hang.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from rotfuse.core.errors import RotfuseError, UsageError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0


class JobFailed(RotfuseError):
    """Another rank (or this one, in a step) failed: the whole job fails with its code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def launch_env() -> dict[str, str] | None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT of a multi-process launch, else None.
    Reads the environment only (no torch): the CLI asks it before its imports."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1") or 1) > 1:
        return {
            "RANK": env.get("RANK", "0"),
            "WORLD_SIZE": env["WORLD_SIZE"],
            "LOCAL_RANK": env.get("LOCAL_RANK", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR", ""),
            "MASTER_PORT": env.get("MASTER_PORT", "29500"),
        }
    if int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR", ""),
            "MASTER_PORT": env.get("MASTER_PORT", "29500"),
        }
    return None


def launched_rank() -> int:
    """This process's rank in a multi-process launch (0 when not launched so)."""
    found = launch_env()
    return int(found["RANK"]) if found else 0


def cpu_share() -> int:
    """The CPUs this process should keep busy: those it may run on (its affinity mask -- a SLURM or
    cgroup cpuset, taskset -- not the machine's count), divided among the processes of this launch
    on this node when they all run on the same CPUs. torchrun binds no rank, so its local ranks
    share their mask; srun binds each task to its own CPUs by default, and its tasks share only
    when each may run on every CPU of the node (--cpu-bind=none)."""
    cpus = usable_cpus()
    env = os.environ
    if launch_env() is None:
        sharing = 1
    elif "LOCAL_WORLD_SIZE" in env:  # torchrun (`job` exports WORLD_SIZE for srun's tasks too, never this)
        sharing = _count(env.get("LOCAL_WORLD_SIZE"))
    elif cpus >= (os.cpu_count() or cpus):  # srun, its tasks unbound
        sharing = slurm_tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""), _count(env.get("SLURM_NODEID"), 0))
    else:  # srun, each task bound to its own CPUs
        sharing = 1
    return max(1, cpus // sharing)


def rank_threads(default: int, share: int) -> int:
    """torch's intra-op threads for a rank of a launch: its CPU `share` (`cpu_share`) at most, not
    `default` (torch's own count, every CPU of its mask, which each rank sharing a node would take),
    unless OMP_NUM_THREADS sets the count (torchrun sets it to 1 where a node runs several ranks).
    Unbound srun tasks set neither: four of them on a 128-CPU node would run 128 threads each."""
    if os.environ.get("OMP_NUM_THREADS"):
        return default
    return max(1, min(default, share))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def slurm_tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Node `node`'s task count in SLURM's compressed list ("4(x2),3": 4 on nodes 0 and 1, 3 on
    node 2); 1 where the list is missing, malformed or too short."""
    index = 0
    for item in filter(None, tasks_per_node.split(",")):
        count, _, repeat = item.partition("(x")
        try:
            tasks, times = int(count), int(repeat.rstrip(")") or 1)
        except ValueError:
            return 1
        if node < index + times:
            return max(1, tasks)
        index += times
    return 1


def _count(value: str | None, default: int = 1) -> int:
    """A count from the environment; `default` where it is unset or not a number."""
    try:
        return int(value) if value else default
    except ValueError:
        return default


@dataclass
class Group:
    """The ranks of one job. `tensors` is the group tensor reductions use (nccl when every rank
    has a GPU, else the default gloo group) and `device` where their buffers live."""

    rank: int
    world: int
    tensors: Any = None
    device: str = "cpu"
    steps: list[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order (pickled over the default group)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_on_main(self, tensor: Any) -> Any:
        """Every rank's `tensor` summed on rank 0 in float64, in rank order (so repeated runs give
        the same bits, which a ring all-reduce does not promise); None on the other ranks. Every
        rank must call it with the same shape. Memory on rank 0: `world` float64 copies."""
        import torch
        import torch.distributed as dist

        local = tensor.detach().to(self.device, torch.float64).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)] if self.is_main else None
        dist.gather(local, parts, dst=0, group=self.tensors)
        if parts is None:
            return None
        total = parts[0]
        for part in parts[1:]:
            total += part
        return total.cpu()

    def agree(self, step: str, fn: Callable[[], T]) -> T:
        """Run `fn` here; if it failed on any rank, raise the first failure on every rank."""
        try:
            result, status = fn(), (step, 0, "")
        except BaseException as exc:  # every failure must reach the other ranks
            if isinstance(exc, JobFailed) or getattr(exc, "_rotfuse_settled", False):
                raise  # settled in a step nested in this one
            exc._rotfuse_settled = True  # type: ignore[attr-defined]
            self._settle(step, _status(step, exc), exc)
            raise
        self._settle(step, status, None)
        return result

    def abandon(self, exc: BaseException) -> None:
        """This rank failed outside a step: tell the others (their next step fails), once."""
        if not isinstance(exc, JobFailed) and not getattr(exc, "_rotfuse_settled", False):
            with suppress(JobFailed):
                self._settle("abandon", _status("abandon", exc), exc)

    def _settle(self, step: str, status: tuple[str, int, str], own: BaseException | None) -> None:
        statuses = self.gather(status)
        failed = [(rank, code, message) for rank, (_, code, message) in enumerate(statuses) if code]
        if not failed:
            if len({s for s, _, _ in statuses}) > 1:
                raise RuntimeError(f"ranks out of step: {[s for s, _, _ in statuses]}")
            return
        rank, code, message = failed[0]
        if own is not None and rank == self.rank:
            return  # the caller re-raises its own exception
        raise JobFailed(message if rank == 0 else f"rank {rank}: {message}", code)


def _status(step: str, exc: BaseException) -> tuple[str, int, str]:
    if isinstance(exc, KeyboardInterrupt):
        return step, 130, "interrupted"
    code = getattr(exc, "exit_code", None)
    if isinstance(exc, RotfuseError) or isinstance(code, int):
        return step, int(code or 1), " ".join(str(exc).split("\n"))
    return step, 1, f"internal error: {type(exc).__name__}: {exc}"


_current: Group | None = None


def current() -> Group | None:
    """The group of the running command, or None in a single process."""
    return _current


@contextmanager
def job() -> Iterator[Group | None]:
    """The process group for one command when launched with several processes, else None."""
    global _current
    found = launch_env()
    if found is None or _current is not None:
        yield _current
        return
    if not found["MASTER_ADDR"]:
        raise UsageError(
            "launched as several processes but MASTER_ADDR is not set (export it in the job script: "
            "the first host of the job, e.g. $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1))"
        )
    os.environ.update(found)
    import torch
    import torch.distributed as dist

    timeout = timedelta(seconds=float(os.environ.get("ROTFUSE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    dist.init_process_group(
        "gloo", init_method="env://", timeout=timeout, rank=int(found["RANK"]), world_size=int(found["WORLD_SIZE"])
    )
    group = Group(dist.get_rank(), dist.get_world_size())
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        torch.cuda.set_device(int(found["LOCAL_RANK"]) % torch.cuda.device_count())
    if all(group.gather(has_gpu)):  # nccl only when every rank can use it (untested here: no GPU)
        group.tensors, group.device = dist.new_group(backend="nccl", timeout=timeout), "cuda"
    _current = group
    threads = torch.get_num_threads()
    torch.set_num_threads(rank_threads(threads, cpu_share()))
    try:
        yield group
    except BaseException as exc:
        group.abandon(exc)
        raise
    finally:
        _current = None
        dist.destroy_process_group()
        torch.set_num_threads(threads)


def assign(costs: Sequence[float], world: int, start: Sequence[float] | None = None) -> list[int]:
    """The rank of each item: greedy by cost (the dearest first, to the least loaded rank; ties to
    the lower rank), so ranks finish together rather than hold the same count. `start` is each
    rank's load before (rank 0 also handles the tensors outside the layers)."""
    loads = list(start or [0.0] * world)
    owner = [0] * len(costs)
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owner[item] = rank
        loads[rank] += costs[item]
    return owner


def split_in_order(costs: Sequence[float], world: int) -> list[int]:
    """The rank of each item when the items, kept in order, are cut into `world` consecutive
    ranges of about equal cost: an item goes to the rank whose share holds its midpoint (so each
    rank reads and writes one stretch of the files)."""
    total = float(sum(costs))
    owner, before = [], 0.0
    for cost in costs:
        owner.append(min(world - 1, int(world * (before + cost / 2) / total)) if total > 0 else 0)
        before += cost
    return owner
