"""`rotfuse stats` as several processes (gloo on the CPU): each rank runs its range of the data,
rank 0 adds the sums (float64, rank order) and writes. The statistics are one process's up to
the float32 summation order, repeated launches give the same bytes, and one rank's bad data
fails every rank with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import run_cli
from helpers.launch import srun_like, torchrun
from helpers.merge_data import save_inputs, token_inputs
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file

from rotfuse.merge.stats.folder import MANIFEST_FILE, STATS_FILE

pytestmark = pytest.mark.slow

# Largest |ws N - ws 1| / max|ws 1| over a tensor. Two sources: float32 partial sums added in
# another order, and each rank's own BLAS threading (torchrun starts ranks with one thread), which
# changes the last bits of every forward and backward pass. Measured on these models: Grams ~1e-7,
# Fishers ~2e-6 (README, "Running on a cluster"). Tensors whose true value is zero (a Fisher of
# BERT's key biases, which softmax ignores: ~1e-20 of rounding noise) are compared on the
# folder's scale instead.
RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT classifier and 13 unlabelled examples (5 batches of 3: uneven shares)."""
    root = tmp_path_factory.mktemp("stats")
    model = save_tiny("bert", root / "model", seed=1)
    data = save_inputs(root / "data.safetensors", token_inputs(13, 9, vocab=61, seed=2))
    return {"model": model, "data": data}


def _args(setup: dict[str, Path], kind: str) -> list[object]:
    return ["stats", setup["model"], "--data", setup["data"], "--kind", kind, "--batch-size", "3", "--device", "cpu"]


def _manifest(folder: Path) -> dict:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    for varying in ("seconds", "created_by"):
        manifest.pop(varying)
    return manifest


def relative_error(one: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    """The largest relative difference over the tensors, each on its own scale (or, for a tensor
    that is zero up to rounding, on the largest tensor's)."""
    assert set(one) == set(other)
    scale = max(float(t.double().abs().max()) for t in one.values())
    return max(
        float((other[n].double() - one[n].double()).abs().max()) / max(float(one[n].double().abs().max()), 1e-6 * scale)
        for n in one
    )


@pytest.mark.parametrize("kind", ["regmean", "fisher"])
def test_world_sizes_give_the_single_process_statistics(tmp_path, setup, kind):
    run_cli(*_args(setup, kind), "-o", tmp_path / "ws1", check=True)
    found = {1: load_file(str(tmp_path / "ws1" / STATS_FILE))}
    for world in (2, 3):
        out = tmp_path / f"ws{world}"
        result = torchrun(world, *_args(setup, kind), "-o", out)
        assert result.returncode == 0, result.stderr
        assert _manifest(out) == _manifest(tmp_path / "ws1")  # names, rows, shared Grams, labels
        found[world] = load_file(str(out / STATS_FILE))
        error = relative_error(found[1], found[world])
        print(f"{kind} ws{world} vs ws1: relative error {error:.2e}")
        assert error < RELATIVE_TOLERANCE, (world, error)
    print(f"{kind} ws3 vs ws2 (one thread per rank both): relative error {relative_error(found[2], found[3]):.2e}")
    again = tmp_path / "ws3-again"
    assert torchrun(3, *_args(setup, kind), "-o", again).returncode == 0
    assert (again / STATS_FILE).read_bytes() == (tmp_path / "ws3" / STATS_FILE).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rotfuse")]


def test_one_ranks_bad_rows_fail_the_whole_job(tmp_path, setup):
    inputs = token_inputs(13, 9, vocab=61, seed=2)
    # position ids pass the data checks (token ids are checked on every rank before any model
    # runs); one in the last batch, rank 1's of 2, is beyond BERT's position table
    inputs["position_ids"] = torch.arange(9).repeat(13, 1)
    inputs["position_ids"][12, 1] = 10_000
    bad = save_inputs(tmp_path / "bad.safetensors", inputs)
    out = tmp_path / "out"
    args = ["stats", setup["model"], "--data", bad, "--kind", "regmean", "--batch-size", "3", "-o", out]
    results = srun_like(2, *args)
    assert [r.returncode for r in results] == [2, 2], [r.stderr for r in results]
    lines = results[0].stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rotfuse: error: rank 1: "), results[0].stderr
    assert str(bad) in lines[0] and "do not fit" in lines[0]
    assert results[1].stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]  # nothing written, nothing staged


def test_a_rank_without_batches_adds_nothing(tmp_path, setup):
    """6 examples in 2 batches on 3 ranks: rank 1 runs no batch, observes no shared input and
    sends zeros; the result is still one process's."""
    args = [*_args(setup, "regmean"), "--max-samples", "6"]
    run_cli(*args, "-o", tmp_path / "ws1", check=True)
    result = torchrun(3, *args, "-o", tmp_path / "ws3")
    assert result.returncode == 0, result.stderr
    assert _manifest(tmp_path / "ws3") == _manifest(tmp_path / "ws1")
    one, three = (load_file(str(tmp_path / n / STATS_FILE)) for n in ("ws1", "ws3"))
    assert relative_error(one, three) < RELATIVE_TOLERANCE


def test_each_rank_reads_only_its_rows(tmp_path, setup):
    """A token id beyond the vocabulary in the last example: only rank 1 of 2, whose rows hold it,
    reads (and checks) it -- rank 0 never loads the rows of another rank."""
    inputs = token_inputs(13, 9, vocab=61, seed=2)
    inputs["input_ids"][12, 1] = 10_000
    bad = save_inputs(tmp_path / "bad.safetensors", inputs)
    args = ["stats", setup["model"], "--data", bad, "--kind", "regmean", "--batch-size", "3", "-o", tmp_path / "out"]
    results = srun_like(2, *args)
    assert [r.returncode for r in results] == [2, 2], [r.stderr for r in results]
    line = results[0].stderr.strip()
    assert line.startswith("rotfuse: error: rank 1: ") and "token ids" in line, line
