"""Outputs never destroy inputs (issue "Reliability II", item 1), and runs leave nothing behind
(item 6): every written path is checked against every read path, symlinks resolved, before any
work; staging folders carry their owner, so a later run removes a dead run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import assert_one_line, run_cli
from helpers.files import leftovers, snapshot
from helpers.tiny_models import save_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two tiny BERT classifiers and a data file with labels."""
    root = tmp_path_factory.mktemp("models")
    a, b = save_tiny("bert", root / "a", seed=1), save_tiny("bert", root / "b", seed=0)
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", input_ids=rng.integers(0, 61, (6, 5)), labels=rng.integers(0, 3, 6))
    return a, b, root / "data.npz"


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


def _one(result: subprocess.CompletedProcess, *fragments: str) -> str:
    return assert_one_line(result.returncode, result.stderr, *fragments)


# ---------------------------------------------------------------------- interpolate


@pytest.mark.parametrize("flag, victim", [("--out", "config.json"), ("--plot", "model.safetensors")])
def test_interpolate_never_writes_into_an_input(models, tmp_path, flag, victim):
    a, b, data = models
    a, b = _copy(a, tmp_path / "a"), _copy(b, tmp_path / "b")
    target = (a if flag == "--out" else b) / victim
    before = snapshot(a) | {f"b/{k}": v for k, v in snapshot(b).items()}
    _one(
        run_cli("interpolate", a, b, "--data", data, "--steps", "2", flag, target, "--device", "cpu"),
        str(target),
        "inside the input",
    )
    assert snapshot(a) | {f"b/{k}": v for k, v in snapshot(b).items()} == before


def test_interpolate_replaces_an_existing_file_only_with_overwrite(models, tmp_path):
    a, b, data = models
    existing = tmp_path / "curves.json"
    existing.write_text("keep me")
    _one(
        run_cli("interpolate", a, b, "--data", data, "--steps", "2", "--out", existing, "--device", "cpu"),
        "already exists",
        "--overwrite",
    )
    assert existing.read_text() == "keep me"
    result = run_cli(
        "interpolate", a, b, "--data", data, "--steps", "2", "--out", existing, "--device", "cpu", "--overwrite", "-q"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(existing.read_text())["command"] == "interpolate"


# ---------------------------------------------------------------------- match / merge: --report and --data


def test_report_onto_the_data_file_is_refused(models, tmp_path):
    a, b, data = models
    data = _copy(data.parent, tmp_path / "dd") / "data.npz"
    before = data.read_bytes()
    _one(
        run_cli("match", a, b, "-s", "default,residual", "--data", data, "--report", data, "-o", tmp_path / "out"),
        "would replace the input",
    )
    assert data.read_bytes() == before and not (tmp_path / "out").exists()


def test_output_folder_holding_the_data_file_is_refused(models, tmp_path):
    a, b, data = models
    folder = tmp_path / "dd"
    folder.mkdir()
    (folder / "data.npz").write_bytes(data.read_bytes())
    _one(
        run_cli("match", a, b, "-s", "default,residual", "--data", folder / "data.npz", "-o", folder, "--overwrite"),
        "must not contain the input",
    )
    assert (folder / "data.npz").read_bytes() == data.read_bytes()


@pytest.mark.parametrize("command", ["match", "merge"])
def test_existing_report_is_replaced_only_with_overwrite(models, tmp_path, command):
    a, b, _ = models
    report = tmp_path / "report.json"
    report.write_text("an earlier report")
    _one(run_cli(command, a, b, "-o", tmp_path / "out", "--report", report), "already exists", "--overwrite")
    assert report.read_text() == "an earlier report" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["match", "merge"])
def test_report_at_a_folder_is_refused_before_any_work(models, tmp_path, command):
    a, b, _ = models
    (tmp_path / "reports").mkdir()
    _one(run_cli(command, a, b, "-o", tmp_path / "out", "--report", tmp_path / "reports"), "names a folder")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert list((tmp_path / "reports").iterdir()) == []


# ---------------------------------------------------------------------- symlinks and the working directory


def test_folder_of_symlinks_counts_as_the_folder_it_points_into(models, tmp_path):
    """An HF-cache-style snapshot: every file a link into another folder (the blobs)."""
    a, b, _ = models
    blobs = _copy(b, tmp_path / "blobs")
    link = tmp_path / "link_b"
    link.mkdir()
    for item in blobs.iterdir():
        (link / item.name).symlink_to(item)
    before = snapshot(blobs)
    _one(run_cli("match", a, link, "-o", blobs, "--overwrite"), "must not contain the input", "link_b")
    assert snapshot(blobs) == before


def test_output_containing_the_working_directory_is_refused(models, tmp_path):
    a, b, _ = models
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    _one(run_cli("match", a, b, "-o", ".", "--overwrite", cwd=work), "working directory")
    _one(run_cli("match", a, b, "-o", "..", "--overwrite", cwd=work), "working directory")
    assert (work / "notes.txt").read_text() == "mine"


def test_report_never_replaces_a_shard_of_the_output(models, tmp_path):
    """A shard file named like the report: writing the report would destroy it."""
    _, _, _ = models
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1, max_shard_size="30KB")
    model = save_tiny("bert", tmp_path / "model", seed=0, max_shard_size="30KB")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (model / shard).rename(model / "rotfuse_report.json")
    index["weight_map"] = {k: ("rotfuse_report.json" if v == shard else v) for k, v in index["weight_map"].items()}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    _one(run_cli("match", anchor, model, "-o", tmp_path / "out"), "rotfuse_report.json", "--report")
    assert not (tmp_path / "out").exists()
    result = run_cli("match", anchor, model, "-o", tmp_path / "out", "--report", tmp_path / "r.json", "-q")
    assert result.returncode == 0, result.stderr
    result = run_cli("verify", model, tmp_path / "out", "--device", "cpu", "-q")
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------- leftovers (item 6)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_staging_of_a_dead_run_is_removed_and_a_live_one_kept(models, tmp_path):
    from rotfuse.io.staging import owner_tag

    a, b, _ = models
    host = owner_tag().split("-")[1]
    dead = tmp_path / f".rotfuse-tmp-{_dead_pid()}-{host}-out-abcd1234"
    live = tmp_path / f".rotfuse-tmp-{os.getpid()}-{host}-out-efgh5678"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half written")
    result = run_cli("match", a, b, "-o", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    assert not dead.exists() and live.exists()


def test_stale_interpolate_folder_in_the_temp_folder_is_removed(models, tmp_path):
    from rotfuse.io.staging import owner_tag

    a, b, data = models
    temp = tmp_path / "tmp"
    temp.mkdir()
    stale = temp / f"rotfuse-interpolate-{_dead_pid()}-{owner_tag().split('-')[1]}-a-xyz"
    (stale / "lambda-1").mkdir(parents=True)
    result = run_cli(
        "interpolate",
        a,
        b,
        "--data",
        data,
        "--steps",
        "2",
        "--device",
        "cpu",
        "-q",
        env={**os.environ, "TMPDIR": str(temp)},
    )
    assert result.returncode == 0, result.stderr
    assert list(temp.iterdir()) == []


def test_failed_run_removes_the_parent_folders_it_created(models, tmp_path):
    a, b, _ = models
    bad = _copy(b, tmp_path / "bad")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bad / "model.safetensors"))
    tensors["bert.pooler.dense.weight"][0, 0] = float("nan")  # outside the layers: found mid-run
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    _one(run_cli("match", a, bad, "-o", tmp_path / "new" / "deeper" / "out"), "NaN or Inf")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("kind", ["dangling", "fifo"])
def test_unreadable_side_file_is_named_before_any_work(models, tmp_path, kind):
    a, b, _ = models
    model = _copy(b, tmp_path / "model")
    odd = model / "tokenizer.json"
    if kind == "dangling":
        odd.symlink_to(tmp_path / "nowhere.json")
    else:
        os.mkfifo(odd)
    line = _one(run_cli("match", a, model, "-o", tmp_path / "out", timeout=60), str(odd))
    assert ".rotfuse-tmp" not in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_disk_full_names_the_output_not_its_staging_folder(models, tmp_path):
    import resource

    a, b, _ = models

    def small_disk() -> None:  # writes past 16 KiB fail (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    out = tmp_path / "out"
    line = _one(run_cli("match", a, b, "-o", out, "--device", "cpu", preexec_fn=small_disk), "File too large")
    assert ".rotfuse-tmp" not in line and str(out) in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_long_legal_output_name_works(models, tmp_path):
    a, b, _ = models
    out = tmp_path / ("x" * 240)
    result = run_cli("match", a, b, "-o", out, "-q")
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").exists()
