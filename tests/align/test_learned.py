"""Learned matching (align/learned/): the written copy computes MODEL's function exactly, its average
with the anchor is the merge whose loss was optimised, the run is deterministic, bad input is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.functions import assert_same_function, one_thread, save_pair
from safetensors.torch import load_file, save_file

from rotfuse.align.learned import loop
from rotfuse.align.learned.maps import LayerMaps, StreamMaps, straight_through
from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.core.errors import UsageError
from rotfuse.eval.interpolate import InterpolationSettings, interpolate
from rotfuse.symmetry.names import symmetry_set


def _data(kind: str, path: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    if kind == "vit":
        data = {
            "pixel_values": torch.randn(48, 3, 12, 12, generator=g),
            "labels": torch.randint(0, 5, (48,), generator=g),
        }
    else:
        data = {
            "input_ids": torch.randint(3, 61, (24, 10), generator=g),
            "attention_mask": torch.ones(24, 10, dtype=torch.long),
        }
    save_file(data, str(path))
    return path


def _learn(
    tmp_path: Path,
    kind: str,
    out: str = "out",
    steps: int = 12,
    symmetries: str = "default,residual",
    rate: float = 1e-2,
    perm_rate: float | None = None,
) -> tuple[Path, Path, Path, dict]:
    model, anchor = save_pair(kind, tmp_path)
    train = _data(kind, tmp_path / "train.safetensors")
    held = _data(kind, tmp_path / "held.safetensors", seed=1)
    options = MatchOptions(
        symmetries=symmetry_set(symmetries),
        device="cpu",
        data=train,
        learn=True,
        eval_data=held,
        learn_steps=steps,
        learn_rate=rate,
        learn_perm_rate=perm_rate,
        data_batch_size=16,
    )
    with one_thread():
        report = match(anchor, model, tmp_path / out, options, overwrite=True)
    return model, anchor, train, report


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vit", "llama"])
def test_learned_copy_keeps_the_function_and_is_the_merge_optimised(tmp_path: Path, kind: str) -> None:
    model, anchor, train, report = _learn(tmp_path, kind)
    learned = report["learned"]
    assert_same_function(model, tmp_path / "out")
    # the loss the loop reports at l = 0.5 is interpolate's on the written copy, averaged with the anchor
    inputs = load_file(str(train))
    with one_thread():
        curve = interpolate(anchor, tmp_path / "out", inputs, InterpolationSettings([0.0, 0.5, 1.0], batch_size=16))
    assert curve.losses[1] == pytest.approx(learned["after"]["train_loss"], rel=1e-4)
    assert learned["after"]["train_loss"] < learned["before"]["train_loss"]  # it learned something
    assert {"step", "train_loss", "eval_loss"} <= set(learned["log"][0])


@pytest.mark.slow
def test_logged_steps_score_a_fixed_subset_before_and_after_score_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "LOG_SAMPLES", 10)  # of the 24 training inputs
    model, anchor, train, report = _learn(tmp_path, "llama")
    learned = report["learned"]
    assert learned["log_train_samples"] == 10
    inputs = load_file(str(train))
    subset = torch.randperm(24, generator=torch.Generator().manual_seed(0))[:10].sort().values
    with one_thread():
        whole = interpolate(anchor, tmp_path / "out", inputs, InterpolationSettings([0.5], batch_size=16))
        part = interpolate(
            anchor, tmp_path / "out", {k: v[subset] for k, v in inputs.items()}, InterpolationSettings([0.5])
        )
    assert learned["after"]["train_loss"] == pytest.approx(whole.losses[0], rel=1e-4)
    assert learned["log"][-1]["train_loss"] == pytest.approx(part.losses[0], rel=1e-4)
    assert learned["log"][-1]["train_loss"] != pytest.approx(whole.losses[0], rel=1e-4)  # a different set
    assert learned["after"]["eval_loss"] == learned["log"][-1]["eval_loss"]  # the same held-out set
    assert learned["before"]["train_loss"] != learned["log"][0]["train_loss"]


def test_same_seed_same_output(tmp_path: Path) -> None:
    _learn(tmp_path, "vit", "one", steps=5)
    _learn(tmp_path, "vit", "two", steps=5)
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert all(torch.equal(one[name], two[name]) for name in one)


def test_learn_needs_data(tmp_path: Path) -> None:
    model, anchor = save_pair("vit", tmp_path)
    with pytest.raises(UsageError, match="--data"):
        match(anchor, model, tmp_path / "out", MatchOptions(learn=True, device="cpu"))


def test_memory_is_checked_before_learning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "available", lambda device: 1024)
    with pytest.raises(UsageError, match=r"--learn needs about .* GiB .*--batch-size"):
        _learn(tmp_path, "vit", steps=1)
    assert not (tmp_path / "out").exists()


def test_stream_map_keeps_the_ones_and_the_permutation_is_exact() -> None:
    maps = StreamMaps(7, "keeps_ones")
    with torch.no_grad():
        maps.param.normal_()
    q = maps.matrix()
    assert torch.allclose(q @ q.T, torch.eye(7, dtype=q.dtype), atol=1e-12)
    assert torch.allclose(q.sum(1), torch.ones(7, dtype=q.dtype), atol=1e-12)
    relaxed = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    p = straight_through(relaxed)
    assert torch.equal(p.detach().sum(0), torch.ones(5, dtype=torch.float64))
    assert set(p.detach().unique().tolist()) == {0.0, 1.0}
    (p * torch.arange(25.0, dtype=torch.float64).reshape(5, 5)).sum().backward()
    assert relaxed.grad is not None and bool(relaxed.grad.abs().sum() > 0)


@pytest.mark.parametrize(
    ("kind", "symmetries", "moved", "axis", "blocks"),
    [
        # post-LN BERT: the residual map is a permutation, learned only through the straight-through estimator
        pytest.param("bert", "residual", "bert.embeddings.word_embeddings.weight", 1, 30, marks=pytest.mark.slow),
        ("llama", "perm", "model.layers.0.mlp.up_proj.weight", 0, 29),  # FFN neurons: rows of up_proj
        ("gpt2", "heads", "transformer.h.0.attn.c_proj.weight", 0, 3),  # 3 heads: row blocks of Conv1D c_proj
    ],
)
def test_straight_through_permutations_change_and_stay_exact(
    tmp_path: Path, kind: str, symmetries: str, moved: str, axis: int, blocks: int
) -> None:
    """With only a permutation enabled, the merge's loss changes only if the hard permutation does:
    the estimator's gradient reaches the relaxed matrix, the written permutation differs from the
    matched start, it is still an exact symmetry of MODEL, and the loss of the average went down.
    (The GPT-2 case also has tied input and output embeddings, fed under both live names.)"""
    _, _, _, start = _learn(tmp_path, kind, "start", steps=0, symmetries=symmetries)
    model, _, _, report = _learn(tmp_path, kind, "out", steps=30, symmetries=symmetries, rate=0.1)
    learned = report["learned"]
    if kind == "bert":
        assert learned["stream_maps"] == {"stream": "permutation"}
    assert_same_function(model, tmp_path / "out")
    assert learned["before"]["train_loss"] == pytest.approx(start["learned"]["after"]["train_loss"], rel=1e-6)
    assert learned["after"]["train_loss"] < learned["before"]["train_loss"]

    def pieces(folder: str) -> list[torch.Tensor]:
        return list(load_file(str(tmp_path / folder / "model.safetensors"))[moved].chunk(blocks, dim=axis))

    before, after = pieces("start"), pieces("out")
    # the same rows / columns / head blocks as the matched start, in another order
    assert sorted(map(lambda t: t.flatten().tolist(), before)) == sorted(map(lambda t: t.flatten().tolist(), after))
    assert any(not torch.equal(x, y) for x, y in zip(before, after))


def test_relaxed_permutations_take_their_own_rate() -> None:
    """--learn-perm-rate: Adam's first step moves every entry by its group's rate, the relaxed
    matrices of the per-layer permutations (FFN neurons, heads) by the permutation rate, everything
    else (rotations, scales, the stream maps, a permutation one included) by the main rate."""
    layer = LayerMaps(symmetry_set("default"), groups=3, head_dim=4, ffn_width=6, rotary_dim=0)
    maps = torch.nn.ModuleDict(
        {"layer0": layer, "stream": StreamMaps(8, "permutation"), "stream_dec": StreamMaps(8, "keeps_ones")}
    )
    settings = loop.LearnSettings(Path("train.safetensors"), rate=0.01, perm_rate=0.07)
    optimiser = loop.make_optimiser(maps, settings)
    before = {name: p.detach().clone() for name, p in maps.named_parameters()}
    for p in maps.parameters():
        p.grad = torch.ones_like(p)
    optimiser.step()
    relaxed = {"layer0.heads", "layer0.ffn"}
    for name, p in maps.named_parameters():
        rate = 0.07 if name in relaxed else 0.01
        assert torch.allclose(before[name] - p.detach(), torch.full_like(p, rate), rtol=1e-6), name
    assert loop.LearnSettings(Path("x"), rate=0.02).permutation_rate == 0.02  # default: the main rate


def test_a_zero_permutation_rate_keeps_the_matched_permutation(tmp_path: Path) -> None:
    """The rate that lets the FFN permutation change within 30 steps
    (test_straight_through_permutations_change_and_stay_exact) cannot move it when the relaxed
    matrices' own rate is 0: the learned rows are the matched start's, in order."""
    moved = "model.layers.0.mlp.up_proj.weight"
    _learn(tmp_path, "llama", "start", steps=0, symmetries="perm")
    _learn(tmp_path, "llama", "out", steps=30, symmetries="perm", rate=0.1, perm_rate=0.0)
    start, out = (load_file(str(tmp_path / f / "model.safetensors"))[moved] for f in ("start", "out"))
    assert torch.equal(start, out)
