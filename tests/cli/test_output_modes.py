"""Outputs follow the umask (issue 20 item 3): folders 0777 & ~umask, files 0666 & ~umask, as a
plain `cp` or `save_pretrained` gives them -- not mkdtemp's 0700 / mkstemp's 0600."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cli import run_here
from helpers.merge_data import save_inputs, token_inputs
from helpers.tiny_models import save_tiny


@pytest.fixture(params=[0o022, 0o002])
def umask(request) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    pair = save_tiny("bert", root / "a", seed=1), save_tiny("bert", root / "b", seed=0)
    for folder in pair:  # side files are copied as cp copies them: their mode less the umask
        (folder / "config.json").chmod(0o666)
    return pair


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_plain(root: Path, mask: int) -> None:
    """Every folder and file under `root` (root included) has the plain mode for `mask`."""
    assert _mode(root) == 0o777 & ~mask, (root, oct(_mode(root)))
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            assert _mode(Path(folder) / name) == 0o777 & ~mask, name
        for name in files:
            assert _mode(Path(folder) / name) == 0o666 & ~mask, (name, oct(_mode(Path(folder) / name)))


def test_match_outputs_follow_the_umask(pair, tmp_path, umask):
    a, b = pair
    code, err = run_here("match", a, b, "-o", tmp_path / "one", "--device", "cpu", "-q")
    assert code == 0, err
    _assert_plain(tmp_path / "one", umask)
    code, err = run_here("match", a, b, b, "-o", tmp_path / "many", "--report", tmp_path / "r.json", "-q")
    assert code == 0, err
    _assert_plain(tmp_path / "many", umask)
    assert _mode(tmp_path / "r.json") == 0o666 & ~umask


def test_merge_stats_and_interpolate_outputs_follow_the_umask(pair, tmp_path, umask):
    a, b = pair
    data = save_inputs(tmp_path / "in.safetensors", token_inputs(6, 8, 61, seed=0, labels=2))
    code, err = run_here("merge", a, b, "-o", tmp_path / "merged", "-q")
    assert code == 0, err
    _assert_plain(tmp_path / "merged", umask)
    code, err = run_here(
        "stats", a, "--data", data, "--kind", "regmean", "-o", tmp_path / "stats", "-q", "--device", "cpu"
    )
    assert code == 0, err
    _assert_plain(tmp_path / "stats", umask)
    code, err = run_here(
        "interpolate", a, b, "--data", data, "--steps", "2", "-o", tmp_path / "curve.json", "-q", "--device", "cpu"
    )
    assert code == 0, err
    assert _mode(tmp_path / "curve.json") == 0o666 & ~umask
