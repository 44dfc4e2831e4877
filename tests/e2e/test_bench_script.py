"""scripts/bench.py runs end to end at its tiny size: every stage, ratios to the floor, and the
memory rows that guard the streaming design (no timing assertions: only that it measures)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


def run_bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_peak_rss_is_the_commands_own_not_the_benchmarks(tmp_path: Path) -> None:
    """A child's ru_maxrss starts at its spawner's peak on Linux: measured straight from the bench
    process (torch loaded, checkpoints generated) every stage would inherit that floor, and the
    memory-flat rows would compare two copies of the benchmark's own peak."""
    bench = load_bench()
    ballast = bytearray(600 * 1024 * 1024)  # touched pages: this process's peak is now >= 600 MiB
    ballast[::4096] = b"x" * len(ballast[::4096])
    seconds, rss, out = bench.run([sys.executable, "-S", "-c", "print(sum(range(10)))"])
    assert out.strip() == "45" and seconds > 0
    assert 0 < rss < 200, f"{rss:.0f} MiB for an empty interpreter"
    del ballast


def test_bench_tiny_reports_every_stage(tmp_path: Path) -> None:
    result = run_bench("--sizes", "tiny", "--repeat", "1", "--json", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = {row["stage"]: row for row in json.loads(result.stdout)["rows"]}
    expected = {
        "startup --help",
        "startup archs",
        "io-floor",
        "match-attn",
        "match-all",
        "match-close",
        "match-unrelated",
        "merge-simple",
        "match-2x-deep",
        "merge-2x-deep",
        "io-floor-fsync",
        "match-attn-fsync",
        "merge-simple-fsync",
    }
    assert expected <= set(rows)
    assert rows["io-floor"]["ratio_to_floor"] == 1.0
    assert rows["io-floor-fsync"]["ratio_to_floor"] == 1.0  # the flushed stages have their own floor
    for flushed in ("match-attn-fsync", "merge-simple-fsync"):
        floor = rows["io-floor-fsync"]["seconds"]
        assert abs(rows[flushed]["ratio_to_floor"] - rows[flushed]["seconds"] / floor) < 0.01, flushed
    for stage in expected - {"startup --help", "startup archs"}:
        assert rows[stage]["seconds"] > 0 and rows[stage]["peak_rss_mib"] > 0, stage
    assert rows["match-all"]["detail"]["timings"]["solve"] >= 0
    # twice the depth, (about) the same peak memory: a loader that kept layers alive would fail this
    assert rows["match-2x-deep"]["peak_rss_mib"] <= 1.2 * rows["match-all"]["peak_rss_mib"]
    assert rows["merge-2x-deep"]["peak_rss_mib"] <= 1.2 * rows["merge-simple"]["peak_rss_mib"]
    assert not any(tmp_path.glob("*-out")), "the benchmark leaves no output behind"


def test_bench_runs_only_the_stages_asked_for(tmp_path: Path) -> None:
    result = run_bench(
        "--sizes", "tiny", "--repeat", "1", "--json", "--workdir", str(tmp_path), "--stages", "io-floor,match-attn"
    )
    assert result.returncode == 0, result.stderr
    rows = {row["stage"]: row for row in json.loads(result.stdout)["rows"]}
    assert set(rows) == {"io-floor", "match-attn"}
    assert rows["match-attn"]["ratio_to_floor"] > 0
    assert not any(tmp_path.glob("tiny-deep-*")), "no twice-as-deep pair without a stage that needs it"
    assert "x_floor_by_round" not in rows["match-attn"]["detail"]  # one round: no spread to give
    unknown = run_bench("--stages", "io-floor,match-everything", timeout=60)
    assert unknown.returncode == 2 and "match-everything" in unknown.stderr


def test_ffn_solve_benchmark_names_the_path_of_every_case() -> None:
    script = SCRIPT.parent / "bench_ffn_solve.py"
    result = subprocess.run(
        [sys.executable, str(script), "--neurons", "256", "--width", "384", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    cases = {row[0].strip(): row[1].strip() for row in rows[1:]}
    assert cases["fine-tune (+5 %)"] == "prefix bounds"
    assert cases["unrelated"] == "float32 GEMM + Hungarian"
    assert "far relative (+50 %)" in cases
    assert all(float(row[3]) > 0 for row in rows[1:])


def test_round_by_round_ratios_pair_each_run_with_the_floors_of_its_round() -> None:
    bench = load_bench()
    # round 3's floor ran in a slow spell (2.5 s) that slowed its match too: 5/2.5, not 5/2
    spread = bench.round_ratios([4.0, 6.0, 5.0, 4.4], [2.0, 2.0, 2.5, 2.0])
    assert spread == {"median": 2.1, "low": 2.0, "high": 3.0, "rounds": 4}
    assert bench.round_ratios([5.0, 7.0, 6.0], [2.0, 2.0, 2.0])["median"] == 3.0  # odd count: the middle one
    assert bench.round_ratios([5.0], [2.0]) is None  # one round
    assert bench.round_ratios([30.0], [2.0, 2.1]) is None  # a long stage runs once: no pairs


def test_bench_gives_the_round_by_round_spread_when_stages_repeat(tmp_path: Path) -> None:
    result = run_bench(
        "--sizes", "tiny", "--repeat", "2", "--workdir", str(tmp_path), "--stages", "io-floor,match-attn"
    )
    assert result.returncode == 0, result.stderr
    line = next(row for row in result.stdout.splitlines() if "| match-attn |" in row)
    assert "x floor round by round: median" in line and "2 rounds" in line
    floor = next(row for row in result.stdout.splitlines() if "| io-floor |" in row)
    assert "round by round" not in floor
