"""`rotfuse merge` as a user runs it: the documented command lines, job files, errors.

The documented command lines run as separate processes (the `cli` fixture); the many small
checks run the same typer app in-process (`run`), which spares a torch import per call.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers.files import tensors
from helpers.merge_data import save_inputs, token_inputs
from helpers.tiny_models import save_tiny

from rotfuse.cli.jobfile import load_config
from rotfuse.cli.merge import MERGE_SETTINGS
from rotfuse.cli.stats import STATS_SETTINGS
from rotfuse.merge.methods import REGISTRY
from rotfuse.merge.stats.collect import StatsOptions, compute_stats

EXAMPLES = Path(__file__).resolve().parents[2] / "configs" / "examples"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a/, b/ (tiny BERTs) and their RegMean statistics a_stats/, b_stats/."""
    root = tmp_path_factory.mktemp("cli")
    for name, seed in (("a", 1), ("b", 2)):
        save_tiny("bert", root / name, seed=seed)
        data = save_inputs(root / f"{name}.safetensors", token_inputs(40, 8, vocab=61, seed=seed))
        compute_stats(root / name, data, root / f"{name}_stats", StatsOptions(kind="regmean", device="cpu"))
    return root


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rotfuse: error:"), result.stderr
    return lines[0]


def test_documented_regmean_command_line(work: Path, cli, run) -> None:
    # `--stats a_stats/ b_stats/`: b_stats/ reaches the parser as a positional argument
    result = cli(
        "merge",
        "--method",
        "regmean",
        work / "a",
        work / "b",
        "--stats",
        work / "a_stats",
        work / "b_stats",
        "-o",
        work / "merged",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # nothing but JSON on stdout
    assert report["method"] == "regmean" and [m["path"] for m in report["models"]] == [str(work / "a"), str(work / "b")]
    assert [m["stats"]["path"] for m in report["models"]] == [str(work / "a_stats"), str(work / "b_stats")]
    assert report["tensors"]["count"]["regmean"] == 2 * 6 + 2  # q,k,v,o,in,out per layer; pooler; classifier
    assert (work / "merged" / "rotfuse_merge.json").exists() and (work / "merged" / "config.json").exists()

    # the same job as a YAML file gives the same checkpoint
    job = work / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "method": "regmean",
                "models": [str(work / "a"), str(work / "b")],
                "stats": [str(work / "a_stats"), str(work / "b_stats")],
                "out": str(work / "from_job"),
                "alpha": 0.9,
            }
        ),
        encoding="utf-8",
    )
    assert run("merge", "--config", job, "-q").returncode == 0
    first, second = tensors(work / "merged"), tensors(work / "from_job")
    assert all(torch.equal(first[name], second[name]) for name in first)

    # flags win over the file
    result = run("merge", "--config", job, "--alpha", "0.5", "--weights", "1,3", "-o", work / "override", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == "regmean" and report["settings"]["alpha"] == 0.5
    assert [m["weight"] for m in report["models"]] == [0.25, 0.75] and report["output"]["path"] == str(
        work / "override"
    )


def test_simple_command_line_quiet_and_dry_run(work: Path, cli, run) -> None:
    result = cli(
        "merge",
        "--method",
        "simple",
        work / "a",
        work / "b",
        work / "a",
        "--weights",
        "0.5,0.3,0.2",
        "-o",
        work / "three",
        "-q",
    )
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""
    a, b, out = tensors(work / "a"), tensors(work / "b"), tensors(work / "three")
    name = "bert.encoder.layer.1.output.dense.weight"
    torch.testing.assert_close(out[name], 0.7 * a[name] + 0.3 * b[name])

    result = run("merge", work / "a", work / "b", "-o", work / "dry", "--dry-run", "--json")
    assert result.returncode == 0 and not (work / "dry").exists()
    assert json.loads(result.stdout)["dry_run"] is True

    line = _one_error_line(run("merge", work / "a", work / "b", "-o", work / "three"))
    assert "already exists" in line and "--overwrite" in line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["{a}", "-o", "{tmp}/x"], "at least two"),
        (["{a}", "{b}", "--weights", "1,x", "-o", "{tmp}/x"], "--weights"),
        (["{a}", "{b}", "--head-from", "{tmp}", "-o", "{tmp}/x"], "--head-from"),
        (["-m", "fisher", "{a}", "{b}", "--stats", "{a_stats}", "{b_stats}", "-o", "{tmp}/x"], "needs fisher"),
        (
            ["{a}", "{b}", "--match", "-m", "regmean", "--stats", "{a_stats},{b_stats}", "-o", "{tmp}/x"],
            "aligned checkpoints",
        ),
        (["{a}", "{tmp}/missing", "-o", "{tmp}/x"], "missing"),
        (["{a}", "{b}", "--exclude", "([", "-o", "{tmp}/x"], "not a regular expression"),
        (["--config", "{tmp}/bad.yaml"], "unknown setting 'modles'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(work: Path, tmp_path: Path, run, args: list[str], says: str) -> None:
    (tmp_path / "bad.yaml").write_text("modles: [a/, b/]\nout: x/\n", encoding="utf-8")
    paths = {
        "a": work / "a",
        "b": work / "b",
        "a_stats": work / "a_stats",
        "b_stats": work / "b_stats",
        "tmp": tmp_path,
    }
    line = _one_error_line(run("merge", *(arg.format(**paths) for arg in args)))
    assert says in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "example", sorted(p for p in EXAMPLES.glob("*.yaml") if not p.name.startswith("match")), ids=lambda p: p.name
)  # match jobs: tests/cli/test_batch_jobs.py
def test_example_job_files_are_valid(example: Path) -> None:
    known = STATS_SETTINGS if example.name.startswith("stats") else MERGE_SETTINGS
    settings = load_config(example, example.stem, known)
    if known is MERGE_SETTINGS:
        assert settings["method"] in REGISTRY and len(settings["models"]) >= 2 and settings["out"]
        assert len(settings.get("stats", settings["models"])) == len(settings["models"])
    else:
        assert {"model", "data", "kind", "out"} <= set(settings)
