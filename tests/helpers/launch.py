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


def srun_like(nproc: int, *args: object) -> list[subprocess.CompletedProcess]:
    """The ranks started directly with SLURM's variables (as `srun` does), each its own exit code."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {
            **os.environ,
            "SLURM_PROCID": str(rank),
            "SLURM_STEP_NUM_TASKS": str(nproc),
            "SLURM_LOCALID": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        env.pop("WORLD_SIZE", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "rotfuse", *map(str, args)],
                env=env,
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
