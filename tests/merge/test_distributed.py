"""`rotfuse merge` as several processes (gloo on the CPU): the same bytes and report as one
process for every kind of method, and one rank's bad tensor fails the whole job cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.launch import folder_bytes, srun_like, torchrun
from helpers.merge_data import save_inputs, token_inputs
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file

from rotfuse.core.distributed import Group
from rotfuse.merge.engine import REPORT_NAME, MergeOptions, _my_names, _order, prepare_merge
from rotfuse.merge.stats.collect import StatsOptions, compute_stats

pytestmark = pytest.mark.slow


def report_without_timings(folder: Path) -> dict:
    report = json.loads((folder / REPORT_NAME).read_text())
    report.pop("timings")
    return report


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny BERT classifiers in several shards, their RegMean statistics, and a base."""
    root = tmp_path_factory.mktemp("models")
    found: dict[str, Path] = {"base": save_tiny("bert", root / "base", seed=0, max_shard_size="20KB")}
    for name, seed in (("a", 1), ("b", 2)):
        found[name] = save_tiny("bert", root / name, seed=seed, max_shard_size="20KB")
        data = save_inputs(root / f"{name}.safetensors", token_inputs(16, 9, vocab=61, seed=seed))
        compute_stats(found[name], data, root / f"{name}_grams", StatsOptions(kind="regmean", device="cpu"))
        found[f"{name}_grams"] = root / f"{name}_grams"
    return found


def _method_args(method: str, models: dict[str, Path]) -> list[object]:
    extra: dict[str, list[object]] = {
        "simple": ["--weights", "0.3,0.7"],
        "regmean": ["--stats", models["a_grams"], models["b_grams"]],
        "ties": ["--base", models["base"], "--density", "0.4"],
    }
    return ["merge", "--method", method, models["a"], models["b"], *extra[method], "--no-fsync"]


@pytest.mark.parametrize(("method", "worlds"), [("simple", (2, 3)), ("regmean", (2,)), ("ties", (2,))])
def test_world_sizes_give_the_single_process_bytes(tmp_path, models, method, worlds):
    args = _method_args(method, models)
    run_cli(*args, "-o", tmp_path / "one", check=True)
    expected = folder_bytes(tmp_path / "one", REPORT_NAME)
    assert len([n for n in expected if n.endswith(".safetensors")]) > 2  # several shards, and the index
    for world in worlds:
        out = tmp_path / f"ws{world}"
        result = torchrun(world, *args, "-o", out)
        assert result.returncode == 0, result.stderr
        assert folder_bytes(out, REPORT_NAME) == expected, world
        assert report_without_timings(out) | {"output": None} == report_without_timings(tmp_path / "one") | {
            "output": None
        }
        assert (
            report_without_timings(out)["output"]["fingerprint"]
            == (report_without_timings(tmp_path / "one")["output"]["fingerprint"])
        )
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rotfuse")]


def test_ranges_keep_a_gram_on_one_rank_and_cover_every_tensor(models):
    plan = prepare_merge(
        [models["a"], models["b"]],
        models["a"].parent / "unused",
        MergeOptions(method="regmean", stats=(models["a_grams"], models["b_grams"]), device="cpu"),
    )
    order = _order(plan)
    for world in (2, 3):
        shares = [_my_names(plan, order, Group(rank, world)) for rank in range(world)]
        assert [n for share in shares for n in share] == order  # consecutive ranges, in order
        assert all(shares)
        owner = {name: rank for rank, share in enumerate(shares) for name in share}
        grams: dict[str, list[int]] = {}
        for name in order:
            if plan.rules[name] == "regmean":
                grams.setdefault(plan.method.group(name), []).append(owner[name])
        assert any(len(ranks) > 1 for ranks in grams.values())  # q k v read one Gram
        assert all(len(set(ranks)) == 1 for ranks in grams.values())


def test_one_ranks_bad_tensor_fails_the_whole_job(tmp_path, models):
    plan = prepare_merge([models["a"], models["b"]], tmp_path / "unused", MergeOptions(device="cpu"))
    theirs = [n for n in _my_names(plan, _order(plan), Group(1, 2)) if plan.rules[n] == "simple"]
    victim = theirs[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in models["b"].iterdir():
        data = item.read_bytes()
        if item.suffix == ".safetensors" and victim in load_file(str(item)):
            tensors = load_file(str(item))
            tensors[victim] = tensors[victim].fill_(float("nan"))
            save_file(tensors, str(broken / item.name), metadata={"format": "pt"})
        else:
            (broken / item.name).write_bytes(data)
    results = srun_like(2, "merge", models["a"], broken, "-o", tmp_path / "out")
    assert [r.returncode for r in results] == [2, 2], [r.stderr for r in results]
    lines = results[0].stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rotfuse: error: rank 1: "), results[0].stderr
    assert "NaN" in lines[0] and repr(victim) in lines[0]
    assert results[1].stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # nothing written, nothing staged
