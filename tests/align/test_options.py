"""The default number of layer threads follows the CPUs this process may use, shared among the
ranks of a launch that run on the same CPUs (rotfuse.core.distributed.cpu_share)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers.launch import srun_like

from rotfuse.align.options import MAX_DEFAULT_WORKERS, MatchOptions, default_workers
from rotfuse.core import distributed
from rotfuse.core.distributed import cpu_share, slurm_tasks_on_node

LAUNCH_VARIABLES = (
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "RANK",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_PROCID",
    "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_NODEID",
)


@pytest.fixture
def machine(monkeypatch):
    """A machine of `total` CPUs on which this process may run on `allowed`; no launch variables."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def make(total: int, allowed: int) -> None:
        monkeypatch.setattr(os, "cpu_count", lambda: total)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(allowed)), raising=False)

    return make


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux's affinity API")
def test_a_process_pinned_to_one_cpu_defaults_to_one_worker():
    """A real affinity mask (as taskset, a cgroup cpuset or SLURM set it): os.cpu_count() would say
    the machine's count."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from rotfuse.align.options import MatchOptions; print(MatchOptions().workers)"
    )
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(found.stdout) == 1


def test_one_process_takes_its_affinity_mask_up_to_the_cap(machine):
    machine(total=64, allowed=3)
    assert cpu_share() == 3 and default_workers() == 3 and MatchOptions().workers == 3
    machine(total=64, allowed=64)
    assert cpu_share() == 64 and default_workers() == MAX_DEFAULT_WORKERS


def test_torchrun_ranks_share_their_node(machine, monkeypatch):
    """torchrun binds no rank: its local ranks run on the same CPUs, which they split."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    machine(total=8, allowed=8)
    assert cpu_share() == 2 and default_workers() == 2
    machine(total=64, allowed=8)  # a cpuset around the whole torchrun (an allocation's CPUs)
    assert cpu_share() == 2
    machine(total=2, allowed=2)  # more ranks than CPUs: one thread each, never zero
    assert cpu_share() == 1 and default_workers() == 1


def test_srun_tasks_split_the_node_only_when_unbound(machine, monkeypatch):
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "6")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "4,2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    machine(total=8, allowed=8)  # --cpu-bind=none: both tasks of node 1 may run on every CPU
    assert cpu_share() == 4
    monkeypatch.setenv("WORLD_SIZE", "6")  # as the job exports it: still srun's tasks, not torchrun's ranks
    assert cpu_share() == 4
    machine(total=8, allowed=2)  # bound: the task's own CPUs are its share already
    assert cpu_share() == 2


@pytest.mark.parametrize(
    ("tasks_per_node", "node", "tasks"),
    [
        ("4(x2),3", 0, 4),
        ("4(x2),3", 1, 4),
        ("4(x2),3", 2, 3),
        ("4(x2),3", 3, 1),  # past the list
        ("2", 0, 2),
        ("", 0, 1),
        ("four", 0, 1),  # malformed
    ],
)
def test_slurm_tasks_per_node_is_read_per_node(tasks_per_node, node, tasks):
    assert slurm_tasks_on_node(tasks_per_node, node) == tasks


def test_without_an_affinity_api_the_machine_count_is_used(machine, monkeypatch):
    machine(total=6, allowed=6)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert distributed.usable_cpus() == 6


THREADS_IN_A_JOB = """
import os
{omp}
import torch
from rotfuse.core.distributed import job
alone = torch.get_num_threads()
with job():
    inside = torch.get_num_threads()
print(alone, inside, torch.get_num_threads())
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux's affinity API")
def test_unbound_srun_tasks_split_torch_threads_unless_omp_sets_them():
    """Two srun tasks on this node, unbound: in the job each gives torch its half of the CPUs (torch
    alone takes them all) and after it the count it had; an explicit OMP_NUM_THREADS is kept."""
    cpus = len(os.sched_getaffinity(0))
    unset, every_cpu = "os.environ.pop('OMP_NUM_THREADS', None)", f"os.environ['OMP_NUM_THREADS'] = '{cpus}'"
    for omp, expected in [(unset, max(1, cpus // 2)), (every_cpu, cpus)]:
        ranks = srun_like(2, command=[sys.executable, "-c", THREADS_IN_A_JOB.format(omp=omp)])
        for rank in ranks:
            assert rank.returncode == 0, rank.stderr
            alone, inside, after = map(int, rank.stdout.split())
            assert (inside, after) == (expected, alone)
