"""Bad values never pass silently into a result (issue "Reliability II", item 4): one rule for
NaN/Inf across every command, strict JSON, labels the head can score, job-file values checked
like flags, float8 tensors handled or refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import assert_one_line, run_cli
from helpers.files import leftovers
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    return save_tiny("bert", root / "a", seed=1), save_tiny("bert", root / "b", seed=0)


def _with(folder: Path, to: Path, name: str, change) -> Path:
    shutil.copytree(folder, to)
    tensors = load_file(str(to / "model.safetensors"))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(to / "model.safetensors"), metadata={"format": "pt"})
    return to


def _nan(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[0] = float("nan")
    return tensor


def _strict(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} in JSON output")

    return json.loads(text, parse_constant=refuse)


def test_scramble_refuses_nan_outside_the_transformed_layers(pair, tmp_path):
    _, b = pair
    name = "bert.embeddings.word_embeddings.weight"
    bad = _with(b, tmp_path / "bad", name, _nan)
    result = run_cli("scramble", bad, "-o", tmp_path / "out")
    assert_one_line(result.returncode, result.stderr, name, "NaN or Inf")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_fisher_floor_inf_is_refused(pair, tmp_path):
    a, b = pair
    np.savez(tmp_path / "inputs.npz", input_ids=np.random.default_rng(0).integers(0, 61, (4, 6)))
    for name, model in (("a", a), ("b", b)):
        result = run_cli(
            "stats",
            model,
            "--data",
            tmp_path / "inputs.npz",
            "--kind",
            "fisher",
            "-o",
            tmp_path / f"{name}_f",
            "--device",
            "cpu",
            "-q",
        )
        assert result.returncode == 0, result.stderr
    result = run_cli(
        "merge",
        "-m",
        "fisher",
        a,
        b,
        "--stats",
        tmp_path / "a_f",
        tmp_path / "b_f",
        "--fisher-floor",
        "inf",
        "-o",
        tmp_path / "out",
    )
    assert_one_line(result.returncode, result.stderr, "--fisher-floor")
    assert not (tmp_path / "out").exists()


def test_verify_refuses_nan_weights_and_writes_strict_json(pair, tmp_path):
    _, b = pair
    name = "classifier.weight"
    bad = _with(b, tmp_path / "bad", name, lambda t: torch.full_like(t, float("nan")))
    result = run_cli("verify", b, bad, "--device", "cpu")
    assert_one_line(result.returncode, result.stderr, name, "NaN or Inf")
    result = run_cli("verify", b, bad, "--device", "cpu", "--allow-nonfinite", "--json", "-q")
    assert result.returncode == 3, result.stderr
    verdict = _strict(result.stdout)
    assert verdict["agree"] is False and verdict["max_abs_diff"] is None


def test_negative_label_is_refused_not_class_0(pair, tmp_path):
    a, _ = pair
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "inputs.npz", input_ids=rng.integers(0, 61, (4, 6)), labels=np.array([0, 1, -5, 2]))
    result = run_cli(
        "stats",
        a,
        "--data",
        tmp_path / "inputs.npz",
        "--kind",
        "fisher",
        "--labels",
        "data",
        "-o",
        tmp_path / "out",
        "--device",
        "cpu",
    )
    assert_one_line(result.returncode, result.stderr, "inputs.npz", "labels", "-5")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("fsync: 'no'", "fsync"),
        ("max_rounds: -3", "max_rounds"),
        ("alpha: .nan", "alpha"),
        ("overwrite: 1", "overwrite"),
    ],
)
def test_job_file_values_are_checked_like_flags(pair, tmp_path, line, fragment):
    a, b = pair
    job = tmp_path / "job.yaml"
    job.write_text(f"models: [{a}, {b}]\nout: {tmp_path / 'out'}\n{line}\n")
    result = run_cli("merge", "--config", job)
    assert_one_line(result.returncode, result.stderr, str(job), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_checkpoints_are_matched_and_never_merged_silently(pair, tmp_path, dtype):
    a, b = pair
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    f8 = _with(b, tmp_path / "f8", name, lambda t: t.to(dtype))
    result = run_cli("match", a, f8, "-o", tmp_path / "aligned", "-q")  # checked through float32, written in float8
    assert result.returncode == 0, result.stderr
    assert load_file(str(tmp_path / "aligned" / "model.safetensors"))[name].dtype == dtype
    result = run_cli("merge", f8, a, "-o", tmp_path / "merged")
    assert_one_line(result.returncode, result.stderr, name, "float8")
    assert not (tmp_path / "merged").exists()
    nan = _with(f8, tmp_path / "f8nan", name, _nan)
    result = run_cli("match", a, nan, "-o", tmp_path / "again")
    assert_one_line(result.returncode, result.stderr, name, "NaN or Inf")
