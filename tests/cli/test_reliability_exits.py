"""Exit paths tell the truth (issue "Reliability II", item 5): a signal once the output is in
place says so; a Ctrl-C during start-up is one line; flag errors are one line and exit 2; an
impossible --device or --layers is refused at once; a full disk during `stats` is exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import assert_one_line, run_cli
from helpers.files import leftovers
from helpers.tiny_models import save_tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    return save_tiny("bert", root / "a", seed=1), save_tiny("bert", root / "b", seed=0)


@pytest.mark.parametrize("sig, code, verb", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
@pytest.mark.parametrize("report", [False, True])
def test_signal_just_after_the_output_is_in_place_says_it_is_complete(pair, tmp_path, sig, code, verb, report):
    """The signal lands right after the rename (before --report is written): OUT is complete, and
    the command must not claim that no output was written."""
    a, b = pair
    out = tmp_path / "out"
    args = ["match", str(a), str(b), "-o", str(out), "--device", "cpu"]
    if report:
        args += ["--report", str(tmp_path / "r.json")]
    code_text = (
        "import os, sys\n"
        "from rotfuse.io import staging\n"
        "original = staging.StagedFolder.commit\n"
        "def commit(self):\n"
        "    original(self)\n"
        f"    os.kill(os.getpid(), {int(sig)})\n"
        "staging.StagedFolder.commit = commit\n"
        f"sys.argv = ['rotfuse', *{args!r}]\n"
        "from rotfuse.__main__ import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code_text], capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr
    assert "no output was written" not in result.stderr and "Traceback" not in result.stderr
    assert verb in result.stderr and "complete" in result.stderr and str(out) in result.stderr
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert (tmp_path / "r.json").exists() == report  # what was left after the rename still ran
    assert leftovers(tmp_path) == []


def test_ctrl_c_during_start_up_is_one_line_not_a_traceback():
    for delay in (0.1, 0.2, 0.3, 0.4, 0.6):
        process = subprocess.Popen(
            [sys.executable, "-m", "rotfuse", "archs", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        assert "Traceback" not in stderr, (delay, stderr)
        assert process.returncode in (0, 130, -signal.SIGINT), (delay, process.returncode, stderr)
        if process.returncode == 130:
            assert stderr.strip().splitlines() == ["rotfuse: interrupted; no output was written"], stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--workers", "0"], "--workers"),
        (["--learn-perm-rate", "-1"], "--learn-perm-rate"),
        (["--no-such-flag"], "--no-such-flag"),
        (None, "--out"),
    ],
)
def test_flag_errors_are_one_line_and_exit_2(pair, tmp_path, args, fragment):
    a, b = pair
    full = ["match", a, b] + (["-o", tmp_path / "out", *args] if args is not None else [])
    result = run_cli(*full)
    assert_one_line(result.returncode, result.stderr, fragment)
    assert not any(ch in result.stderr for ch in "╭│╰")  # no framed box


def test_a_cuda_device_that_does_not_exist_is_a_usage_error(pair, tmp_path):
    a, b = pair
    result = run_cli("match", a, b, "-o", tmp_path / "out", "--device", "cuda:9")
    assert_one_line(result.returncode, result.stderr, "cuda:9")


def test_a_huge_layer_range_is_refused_at_once(pair, tmp_path):
    a, b = pair
    started = time.monotonic()
    result = run_cli("match", a, b, "-o", tmp_path / "out", "--layers", "0-99999999999", timeout=60)
    assert_one_line(result.returncode, result.stderr, "layer 2 does not exist")
    assert time.monotonic() - started < 30


def test_full_disk_during_stats_is_exit_2_naming_the_file(pair, tmp_path):
    import resource

    a, _ = pair
    np.savez(tmp_path / "inputs.npz", input_ids=np.random.default_rng(0).integers(0, 61, (4, 6)))

    def small_disk() -> None:  # writes past 4 KiB fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 1024, 4 * 1024))

    out = tmp_path / "stats"
    result = run_cli(
        "stats",
        a,
        "--data",
        tmp_path / "inputs.npz",
        "--kind",
        "regmean",
        "-o",
        out,
        "--device",
        "cpu",
        preexec_fn=small_disk,
    )
    line = assert_one_line(result.returncode, result.stderr, "stats.safetensors")
    assert ".rotfuse-tmp" not in line
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_rank_of_a_multi_process_job_leaves_without_the_interpreters_teardown(world):
    """torch's C++ threads can abort a rank in the interpreter's teardown (SIGABRT instead of the
    job's exit code), after a failure or a success: every rank of a multi-process launch exits
    straight after its command, its output flushed; a single process tears down as usual."""
    script = (
        "import atexit, sys; atexit.register(lambda: print('TEARDOWN', flush=True)); "
        "sys.argv = ['rotfuse', 'archs', '--json']; from rotfuse.__main__ import main; main()"
    )
    env = {**os.environ, "WORLD_SIZE": world, "RANK": "0"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"llama"' in result.stdout  # the command's output came out whole
    assert ("TEARDOWN" in result.stdout) == (world == "1")
