"""`rotfuse match` end to end on real Hugging Face models: the aligned checkpoint computes the same
function (checked by running transformers before and after), a scrambled copy is recovered, and
the report is monotone. Tiny random models for every built-in architecture, plus the real
pretrained all-MiniLM-L6-v2."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.functions import assert_same_function
from helpers.tiny_models import save_tiny

from rotfuse.align.match import REPORT_NAME, match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.symmetry.names import symmetry_set

ARCHS = ["bert", "bert-bare", "roberta", "vit", "vit-bare"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matching_preserves_the_function(tmp_path, arch, seed):
    model = save_tiny(arch, tmp_path / "model", seed=seed)
    anchor = save_tiny(arch, tmp_path / "anchor", seed=seed + 100)
    report = match(anchor, model, tmp_path / "aligned", MatchOptions(device="cpu"))
    assert_same_function(model, tmp_path / "aligned")
    # it moved: the aligned model is closer to the anchor than the model was
    totals = report["totals"]["matched"]
    assert totals["after"] < totals["before"]
    for row in report["layers"]:
        for module in row["modules"].values():
            assert module["after"] <= module["before"]


@pytest.mark.parametrize("arch", ["bert", "vit"])
@pytest.mark.parametrize("subset", ["perm", "rot", "scale", "rot,scale", "perm,rot,scale"])
def test_scrambled_copy_is_recovered(tmp_path, arch, subset):
    model = save_tiny(arch, tmp_path / "model", seed=3)
    options = MatchOptions(symmetries=symmetry_set(subset), device="cpu")
    scramble(model, tmp_path / "scrambled", options, seed=7)
    assert_same_function(model, tmp_path / "scrambled")
    report = match(model, tmp_path / "scrambled", tmp_path / "back", options)
    totals = report["totals"]["matched"]
    assert totals["before"] > 1.0
    assert totals["after"] / totals["before"] < 1e-5
    assert_same_function(model, tmp_path / "back")


def test_report_counts_alternation_rounds(tmp_path):
    model = save_tiny("bert", tmp_path / "model", seed=0)
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1)
    report = match(anchor, model, tmp_path / "out", MatchOptions(device="cpu"))
    rounds = [row["modules"]["attn.qk"]["rounds"] for row in report["layers"]]
    assert all(r >= 2 for r in rounds)  # rotation and scale were alternated at least once more
    on_disk = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert on_disk["layers"] == report["layers"]


def test_layer_subset_touches_only_those_layers(tmp_path):
    model = save_tiny("bert", tmp_path / "model", seed=0, num_hidden_layers=3)
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1, num_hidden_layers=3)
    report = match(anchor, model, tmp_path / "out", MatchOptions(layers=frozenset({1}), device="cpu"))
    assert [row["layer"] for row in report["layers"]] == ["1"]
    src, out = Checkpoint.open(model), Checkpoint.open(tmp_path / "out")
    for name in src.names():
        same = torch.equal(src.get(name), out.get(name))
        if ".layer.1." in name and name.endswith(("query.weight", "value.weight", "intermediate.dense.weight")):
            assert not same, name
        elif ".layer.1." not in name:
            assert same, name
    assert_same_function(model, tmp_path / "out")


def test_anchor_with_other_prefix(tmp_path):
    """A bare BertModel anchor (no key prefix) and a BertForSequenceClassification model."""
    model = save_tiny("bert", tmp_path / "model", seed=0)
    anchor = save_tiny("bert-bare", tmp_path / "anchor", seed=0)
    report = match(anchor, model, tmp_path / "out", MatchOptions(device="cpu"))
    # same seed: the encoder weights are identical, so nothing should move
    assert report["totals"]["matched"]["before"] == pytest.approx(0.0, abs=1e-6)
    assert "classifier.weight" in report["unpaired_tensors"]
    assert_same_function(model, tmp_path / "out")


@pytest.mark.slow  # the real MiniLM: the full tier
def test_pretrained_minilm_function_and_recovery(tmp_path, minilm_dir):
    """The real pretrained MiniLM: scramble it, match it back (distance vanishes), and match it
    against the scrambled copy as anchor (function unchanged either way)."""
    options = MatchOptions(device="cpu")
    scramble(minilm_dir, tmp_path / "scrambled", options, seed=5)
    assert_same_function(minilm_dir, tmp_path / "scrambled")
    back = match(minilm_dir, tmp_path / "scrambled", tmp_path / "back", options)
    assert back["totals"]["matched"]["after"] / back["totals"]["matched"]["before"] < 1e-5
    assert_same_function(minilm_dir, tmp_path / "back")
    # the tokenizer and sentence-transformers files come along
    assert (tmp_path / "back" / "tokenizer.json").exists()
    assert (tmp_path / "back" / "1_Pooling" / "config.json").exists()


def test_same_model_matches_to_itself(tmp_path):
    model = save_tiny("vit", tmp_path / "model", seed=0)
    report = match(model, model, tmp_path / "out", MatchOptions(device="cpu"))
    assert report["totals"]["model"]["after"] == pytest.approx(0.0, abs=1e-4)
    assert_same_function(model, tmp_path / "out")


@pytest.mark.gpu
def test_cuda_gives_the_cpu_result(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = save_tiny("bert", tmp_path / "model", seed=0)
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1)
    cpu = match(anchor, model, tmp_path / "cpu", MatchOptions(device="cpu"))
    gpu = match(anchor, model, tmp_path / "gpu", MatchOptions(device="cuda"))
    assert gpu["device"] == "cuda"
    assert gpu["totals"]["matched"]["after"] == pytest.approx(cpu["totals"]["matched"]["after"], rel=1e-4)
    a, b = Checkpoint.open(tmp_path / "cpu"), Checkpoint.open(tmp_path / "gpu")
    for name in a.names():
        assert torch.allclose(a.get(name).float(), b.get(name).float(), atol=1e-4), name
