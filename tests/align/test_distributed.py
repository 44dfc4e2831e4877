"""`rotfuse match` as several processes (gloo on the CPU): the same bytes as one process, and one
rank's bad input fails the whole job cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.launch import folder_bytes, srun_like, torchrun
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow


def report_without_timings(folder: Path) -> dict:
    report = json.loads((folder / "rotfuse_report.json").read_text())
    report.pop("timings")
    report["output"].pop("path")
    return report


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny 4-layer llamas, the model in several shards."""
    root = tmp_path_factory.mktemp("pair")
    anchor = save_tiny("llama", root / "anchor", seed=0, num_hidden_layers=4)
    model = save_tiny("llama", root / "model", seed=1, num_hidden_layers=4, max_shard_size="8KB")
    return anchor, model


@pytest.mark.parametrize("symmetries", ["default", "default,residual"])
def test_world_sizes_give_the_single_process_bytes(tmp_path, pair, symmetries):
    anchor, model = pair
    run_cli("match", anchor, model, "-o", tmp_path / "one", "-s", symmetries, "--no-fsync", check=True)
    expected = folder_bytes(tmp_path / "one")
    assert len(expected) > 3  # shards, index, config
    for world in (1, 2, 3):
        out = tmp_path / f"ws{world}"
        result = torchrun(world, "match", anchor, model, "-o", out, "-s", symmetries, "--no-fsync")
        assert result.returncode == 0, result.stderr
        assert folder_bytes(out) == expected, world
        assert report_without_timings(out) == report_without_timings(tmp_path / "one")
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rotfuse")]


def _isolate_rank1_layers(model: Path, dest: Path) -> tuple[Path, str]:
    """A copy of `model` whose layers of rank 1 (of 2) are alone in one shard, with one of their
    tensors' bytes overwritten (NaN): only rank 1 reads that shard's data."""
    from rotfuse.align.pair import in_layers, open_model, select_layers
    from rotfuse.align.share import my_layers
    from rotfuse.core.distributed import Group
    from rotfuse.io.checkpoint import Checkpoint

    opened = open_model(model)
    layers = select_layers(opened.bound, None)
    rest = [n for n in opened.checkpoint.names() if n not in in_layers(opened, layers)]
    outside = sum(opened.checkpoint.entry(n).nbytes for n in rest)
    theirs = in_layers(opened, my_layers(Group(1, 2), opened, layers, True, outside))
    assert theirs and len(theirs) < len(opened.checkpoint.names())
    tensors = {n: Checkpoint.open(model).get(n) for n in opened.checkpoint.names()}
    dest.mkdir()
    for item in model.iterdir():
        if not item.name.endswith((".safetensors", ".json")) or item.name == "config.json":
            (dest / item.name).write_bytes(item.read_bytes())
    save_file(
        {n: t for n, t in tensors.items() if n not in theirs},
        str(dest / "model-00001-of-00002.safetensors"),
        metadata={"format": "pt"},
    )
    save_file(
        {n: t for n, t in tensors.items() if n in theirs},
        str(dest / "model-00002-of-00002.safetensors"),
        metadata={"format": "pt"},
    )
    weight_map = {n: f"model-0000{2 if n in theirs else 1}-of-00002.safetensors" for n in tensors}
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    victim = sorted(theirs)[0]
    shard = dest / "model-00002-of-00002.safetensors"
    assert victim in load_file(str(shard))
    header = int.from_bytes(shard.read_bytes()[:8], "little")
    begin, end = json.loads(shard.read_bytes()[8 : 8 + header])[victim]["data_offsets"]
    data = bytearray(shard.read_bytes())
    data[8 + header + begin : 8 + header + end] = b"\xff" * (end - begin)
    shard.write_bytes(bytes(data))
    return dest, victim


def test_one_ranks_bad_shard_fails_the_whole_job(tmp_path, pair):
    anchor, model = pair
    broken, victim = _isolate_rank1_layers(model, tmp_path / "broken")
    results = srun_like(2, "match", anchor, broken, "-o", tmp_path / "out")
    assert [r.returncode for r in results] == [2, 2], [r.stderr for r in results]
    lines = results[0].stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rotfuse: error: rank 1: "), results[0].stderr
    assert "NaN" in lines[0] and repr(victim) in lines[0]
    assert results[1].stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # nothing written, nothing staged
    launched = torchrun(2, "match", anchor, broken, "-o", tmp_path / "out")
    assert launched.returncode != 0 and "rotfuse: error: rank 1: " in launched.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
