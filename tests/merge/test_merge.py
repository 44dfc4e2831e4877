"""`rotfuse merge` end to end through the library: real tiny checkpoints in, checkpoints out.

Expected values come from the input files and from independent computations here (lstsq on
inputs captured with hooks, the Fisher formula on the statistics files).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.files import tensors
from helpers.merge_data import hooked_rows, save_inputs, token_inputs
from helpers.tiny_models import save_tiny

from rotfuse.align.match import match as match_checkpoints
from rotfuse.align.options import MatchOptions
from rotfuse.core.errors import InputError, UsageError
from rotfuse.eval.runtime import load_model
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.merge.engine import MergeOptions, merge
from rotfuse.merge.methods.simple import weighted_average
from rotfuse.merge.stats.collect import StatsOptions, compute_stats
from rotfuse.merge.stats.folder import StatsFolder


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny BERT classifiers with their own data and RegMean statistics on it."""
    root = tmp_path_factory.mktemp("pair")
    found: dict[str, Path] = {}
    for name, seed in (("a", 1), ("b", 2)):
        found[name] = save_tiny("bert", root / name, seed=seed)
        data = save_inputs(root / f"{name}.safetensors", token_inputs(48, 9, vocab=61, seed=seed))
        found[f"{name}_data"] = data
        compute_stats(found[name], data, root / f"{name}_grams", StatsOptions(kind="regmean", device="cpu"))
        found[f"{name}_grams"] = root / f"{name}_grams"
    return found


# ---------------------------------------------------------------------- simple


def test_simple_merge_of_a_model_with_itself_returns_it(tmp_path: Path) -> None:
    model = save_tiny("bert", tmp_path / "half", seed=3, dtype=torch.float16, max_shard_size="20KB")
    report = merge([model, model, model], tmp_path / "out", MergeOptions(weights=(0.5, 0.3, 0.2)))
    original, merged = Checkpoint.open(model), Checkpoint.open(tmp_path / "out")
    assert len(original.shards) > 1 and merged.weight_files == original.weight_files
    assert merged.names() == original.names()
    for name in original.names():
        assert merged.entry(name).dtype == original.entry(name).dtype
        assert torch.equal(merged.get(name), original.get(name)), name
    assert merged.config == original.config
    assert report["tensors"]["count"] == {"simple": len(original.names())}
    on_disk = json.loads((tmp_path / "out" / "rotfuse_merge.json").read_text())
    assert on_disk["method"] == "simple" and [m["weight"] for m in on_disk["models"]] == [0.5, 0.3, 0.2]


def test_simple_merge_respects_weights_and_dtype_override(pair: dict[str, Path], tmp_path: Path) -> None:
    merge([pair["a"], pair["b"]], tmp_path / "out", MergeOptions(weights=(1.0, 3.0), dtype="F16"))
    a, b, out = tensors(pair["a"]), tensors(pair["b"]), Checkpoint.open(tmp_path / "out")
    for name, value in a.items():
        if value.is_floating_point():
            assert out.entry(name).dtype == "F16"
            expected = (0.25 * value.double() + 0.75 * b[name].double()).half()
            assert torch.equal(out.get(name), expected), name
        else:
            assert torch.equal(out.get(name), value)  # integer buffers are copied, not averaged


def test_merge_works_without_transformers(pair: dict[str, Path], tmp_path: Path) -> None:
    """simple (and RegMean: it only reads statistics) never import transformers: run the CLI with
    a `transformers` package on the path that refuses to import."""
    blocker = tmp_path / "blocked" / "transformers"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('transformers is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    for method, extra in (("simple", []), ("regmean", ["--stats", pair["a_grams"], pair["b_grams"]])):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "rotfuse",
                "merge",
                "-m",
                method,
                pair["a"],
                pair["b"],
                *extra,
                "-o",
                tmp_path / method,
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        assert (tmp_path / method / "model.safetensors").exists()


# ---------------------------------------------------------------------- RegMean


def assert_least_squares_fit(merged: torch.Tensor, rows: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
    """`merged` ([out, in]) solves argmin_W sum_i ||X_i W^T - X_i W_i^T||^2 / n_i (each model's
    Gram is a mean over its rows): it makes the same predictions on every model's inputs as the
    lstsq solution. (Inputs after a LayerNorm span no more than d_in - 1 dimensions, so W itself
    is unique only up to the null space, where RegMean keeps the average.)"""
    lhs = torch.cat([x / x.shape[0] ** 0.5 for x in rows])
    rhs = torch.cat([x @ w.double().T / x.shape[0] ** 0.5 for x, w in zip(rows, weights)])
    # rcond: float32 activations leave the LayerNorm null direction at ~1e-8 instead of 0
    solution = torch.linalg.lstsq(lhs, rhs, rcond=1e-6, driver="gelsd").solution.T
    average = weighted_average(weights, [0.5] * len(weights))
    for x in rows:
        expected = x @ solution.T
        scale = float(expected.abs().max())
        torch.testing.assert_close(x @ merged.double().T, expected, rtol=1e-4, atol=1e-5 * scale)
        assert not torch.allclose(x @ average.T, expected, atol=1e-3 * scale)  # not the plain average


def test_regmean_merge_is_the_least_squares_solution_of_each_layer(pair: dict[str, Path], tmp_path: Path) -> None:
    report = merge(
        [pair["a"], pair["b"]],
        tmp_path / "out",
        MergeOptions(method="regmean", stats=(pair["a_grams"], pair["b_grams"]), settings={"alpha": 1.0}, device="cpu"),
    )
    a, b, out = tensors(pair["a"]), tensors(pair["b"]), tensors(tmp_path / "out")
    live = {
        "bert.encoder.layer.0.intermediate.dense": True,
        "bert.encoder.layer.1.attention.self.value": True,
        "classifier": False,
    }
    rows = [hooked_rows(load_model(pair[m]), _inputs(pair[f"{m}_data"]), list(live), live) for m in ("a", "b")]
    for module in live:
        weight = module + ".weight"
        assert_least_squares_fit(out[weight], [r[module] for r in rows], [a[weight], b[weight]])
        assert report["tensors"]["rules"][weight] == "regmean"
    for name in ("bert.encoder.layer.0.intermediate.dense.bias", "bert.embeddings.word_embeddings.weight"):
        assert report["tensors"]["rules"][name] == "simple"
        torch.testing.assert_close(out[name], (a[name] + b[name]) / 2)


def _inputs(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_regmean_of_a_model_with_itself_is_the_model(pair: dict[str, Path], tmp_path: Path) -> None:
    merge(
        [pair["a"], pair["a"]],
        tmp_path / "out",
        MergeOptions(method="regmean", stats=(pair["a_grams"], pair["a_grams"]), device="cpu"),
    )
    a, out = tensors(pair["a"]), tensors(tmp_path / "out")
    for name, value in a.items():
        torch.testing.assert_close(out[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_regmean_gpt2_conv1d_merges_in_its_own_layout(tmp_path: Path) -> None:
    models, rows = [], []
    live = {"transformer.h.0.attn.c_attn": True, "transformer.h.0.attn.c_proj": True}  # [24, 72] and square [24, 24]
    for seed in (4, 5):
        model = save_tiny("gpt2", tmp_path / f"gpt2_{seed}", seed=seed)
        inputs = token_inputs(8, 8, vocab=61, seed=seed)
        data = save_inputs(tmp_path / f"in_{seed}.safetensors", inputs)
        compute_stats(model, data, tmp_path / f"grams_{seed}", StatsOptions(kind="regmean", device="cpu"))
        models.append(model)
        rows.append(hooked_rows(load_model(model), inputs, list(live), live))
    report = merge(
        models,
        tmp_path / "out",
        MergeOptions(
            method="regmean", settings={"alpha": 1.0}, device="cpu", stats=(tmp_path / "grams_4", tmp_path / "grams_5")
        ),
    )
    merged = tensors(tmp_path / "out")
    for module in live:  # Conv1D stores [in, out]: a transposition mix-up would go unnoticed on c_proj's shape
        weights = [tensors(m)[module + ".weight"] for m in models]
        assert merged[module + ".weight"].shape == weights[0].shape
        assert_least_squares_fit(merged[module + ".weight"].T, [r[module] for r in rows], [w.T for w in weights])
    # the embedding is also the (tied) lm_head: one tensor, one rule
    assert report["tensors"]["rules"]["transformer.wte.weight"] == "simple"
    reloaded = load_model(tmp_path / "out")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()


# ---------------------------------------------------------------------- Fisher


@pytest.fixture(scope="module")
def fisher_stats(pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fisher")
    folders = []
    for name in ("a", "b"):
        data = save_inputs(root / f"{name}.safetensors", token_inputs(6, 8, vocab=61, seed=7, labels=3))
        compute_stats(pair[name], data, root / name, StatsOptions(kind="fisher", device="cpu"))
        folders.append(root / name)
    return folders[0], folders[1]


@pytest.mark.parametrize("normalize", [False, True])
def test_fisher_merge_applies_the_formula_to_the_statistics(
    pair: dict[str, Path], fisher_stats: tuple[Path, Path], tmp_path: Path, normalize: bool
) -> None:
    floor = 1e-8
    merge(
        [pair["a"], pair["b"]],
        tmp_path / "out",
        MergeOptions(
            method="fisher",
            stats=fisher_stats,
            weights=(1.0, 2.0),
            settings={"fisher_floor": floor, "fisher_normalize": normalize},
        ),
    )
    fishers = [tensors_of_stats(s) for s in fisher_stats]
    norms = [sum(float(f.double().pow(2).sum()) for f in fs.values()) ** 0.5 if normalize else 1.0 for fs in fishers]
    a, b, out = tensors(pair["a"]), tensors(pair["b"]), tensors(tmp_path / "out")
    for name in ("bert.encoder.layer.0.attention.self.query.weight", "classifier.bias", "bert.pooler.dense.weight"):
        fa, fb = (fishers[i][name].double() / norms[i] for i in (0, 1))
        fa, fb = fa.clamp_min(floor) / 3, 2 * fb.clamp_min(floor) / 3
        expected = (fa * a[name].double() + fb * b[name].double()) / (fa + fb)
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)


def tensors_of_stats(folder: Path) -> dict[str, torch.Tensor]:
    stats = StatsFolder.open(folder)
    return {name: stats.get(name) for name in stats.names}


# ---------------------------------------------------------------------- what merge refuses, heads, --match


def test_statistics_of_another_checkpoint_are_refused(pair: dict[str, Path], tmp_path: Path) -> None:
    aligned = tmp_path / "b_aligned"
    match_checkpoints(pair["a"], pair["b"], aligned, MatchOptions(device="cpu"))
    with pytest.raises(InputError, match=r"b_grams: statistics belong to another checkpoint .*compute them on"):
        merge(
            [pair["a"], aligned],
            tmp_path / "out",
            MergeOptions(method="regmean", stats=(pair["a_grams"], pair["b_grams"])),
        )
    with pytest.raises(UsageError, match="--match cannot be combined with --method regmean"):
        merge(
            [pair["a"], pair["b"]],
            tmp_path / "out",
            MergeOptions(method="regmean", stats=(pair["a_grams"], pair["b_grams"]), match=True),
        )
    with pytest.raises(UsageError, match="one --stats folder per model"):
        merge([pair["a"], pair["b"]], tmp_path / "out", MergeOptions(method="regmean", stats=(pair["a_grams"],)))
    assert not (tmp_path / "out").exists()


def test_merge_match_equals_match_then_merge(pair: dict[str, Path], tmp_path: Path) -> None:
    match_checkpoints(pair["a"], pair["b"], tmp_path / "aligned", MatchOptions(device="cpu"))
    merge([pair["a"], tmp_path / "aligned"], tmp_path / "two_steps", MergeOptions())
    report = merge([pair["a"], pair["b"]], tmp_path / "one_step", MergeOptions(match=True, device="cpu"))
    two, one = tensors(tmp_path / "two_steps"), tensors(tmp_path / "one_step")
    assert two.keys() == one.keys()
    for name in two:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-6, msg=name)
    alignment = report["models"][1]["alignment"]
    assert alignment["after"] < alignment["before"]


def test_heads_with_different_label_spaces(tmp_path: Path) -> None:
    a = save_tiny("bert", tmp_path / "a", seed=1, num_labels=3)
    b = save_tiny("bert", tmp_path / "b", seed=2, num_labels=5)
    with pytest.raises(InputError, match=r"classifier\.bias.*--exclude"):
        merge([a, b], tmp_path / "out", MergeOptions())
    report = merge([a, b], tmp_path / "out", MergeOptions(exclude=(r"^classifier\.",), head_from=1))
    out, from_b = tensors(tmp_path / "out"), tensors(b)
    assert report["tensors"]["rules"]["classifier.weight"] == "head"
    assert torch.equal(out["classifier.weight"], from_b["classifier.weight"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert len(config["id2label"]) == 5
    assert load_model(tmp_path / "out").classifier.out_features == 5
    merge([a, b], tmp_path / "first", MergeOptions(exclude=("classifier",)))
    assert torch.equal(tensors(tmp_path / "first")["classifier.weight"], tensors(a)["classifier.weight"])
    with pytest.raises(UsageError, match="matches no tensor"):
        merge([a, b], tmp_path / "none", MergeOptions(exclude=("nothing_like_this",)))


def test_incompatible_models_are_refused(pair: dict[str, Path], tmp_path: Path) -> None:
    vit = save_tiny("vit", tmp_path / "vit")
    with pytest.raises(InputError, match="model_type 'vit' differs"):
        merge([pair["a"], vit], tmp_path / "out", MergeOptions())
    with pytest.raises(UsageError, match="at least two"):
        merge([pair["a"]], tmp_path / "out", MergeOptions())
    with pytest.raises(UsageError, match="--weights has 3 values for 2 models"):
        merge([pair["a"], pair["b"]], tmp_path / "out", MergeOptions(weights=(1, 1, 1)))
