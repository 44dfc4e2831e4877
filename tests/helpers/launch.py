"""Launching the CLI as several processes (gloo on the CPU), as torchrun and srun do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, *args: object) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc-per-node N -m rotfuse ARGS`, as a user launches it."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        "-m",
        "rotfuse",
        *map(str, args),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)


def srun_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """This environment as `srun` gives task `rank` of `nproc`, all on one node (unbound: every
    task may run on every CPU), with the job script's MASTER_ADDR and MASTER_PORT."""
    env = {
        **os.environ,
        "SLURM_PROCID": str(rank),
        "SLURM_STEP_NUM_TASKS": str(nproc),
        "SLURM_STEP_TASKS_PER_NODE": str(nproc),
        "SLURM_NODEID": "0",
        "SLURM_LOCALID": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    env.pop("WORLD_SIZE", None)
    return env


def srun_like(nproc: int, *args: object, command: list[str] | None = None) -> list[subprocess.CompletedProcess]:
    """The ranks started directly with SLURM's variables (as `srun` does), each its own exit code:
    `rotfuse ARGS`, or `command` as it is."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        procs.append(
            subprocess.Popen(
                command or [sys.executable, "-m", "rotfuse", *map(str, args)],
                env=srun_env(rank, nproc, port),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def folder_bytes(folder: Path, report: str = "rotfuse_report.json") -> dict[str, bytes]:
    """Every file's bytes but the report's (its timings differ from run to run)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != report}
