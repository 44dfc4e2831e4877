"""BartForSequenceClassification: the decoder's last states at the eos tokens of input_ids (the same number in
every row, or the model refuses) -> classification_head.dense -> tanh -> out_proj.

Example inputs end each row with one eos token (a tokenizer's layout) and leave the decoder inputs to the model
(it shifts input_ids, so the pooled positions line up). Per-layer maps and the residual map keep the logits,
and both are recovered exactly; classification_head.dense reads the decoder's stream, so it must move with
the map (left behind, the logits change).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import match_verify_merge
from helpers.functions import assert_same_function, max_relative_change, save_pair
from safetensors.torch import load_file, save_file

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.eval.runtime import example_inputs
from rotfuse.symmetry.names import symmetry_set

BROKEN = 1e-3
WITH_RESIDUAL = symmetry_set("default,residual")
DENSE = "classification_head.dense.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return save_pair("bart-cls", tmp_path_factory.mktemp("bart-cls"))


def test_example_inputs_hold_one_eos_per_row_and_no_decoder_inputs(pair):
    config = json.loads((pair[0] / "config.json").read_text())
    inputs = example_inputs(config, batch=4, seq_len=12, seed=3)
    eos = inputs["input_ids"] == config["eos_token_id"]
    assert eos.sum(dim=1).tolist() == [1] * 4 and eos[:, -1].all()
    assert "decoder_input_ids" not in inputs
    generation = example_inputs({**config, "architectures": ["BartForConditionalGeneration"]}, seq_len=12)
    assert generation["decoder_input_ids"].shape[1] != generation["input_ids"].shape[1]


@pytest.mark.parametrize("symmetries", ["default", "default,residual"])
def test_matching_keeps_the_logits(pair, tmp_path, symmetries):
    model, anchor = pair
    options = MatchOptions(symmetries=symmetry_set(symmetries), device="cpu")
    report = match(anchor, model, tmp_path / "aligned", options)
    assert report["arch"] == "bart"
    assert report["totals"]["matched"]["after"] < 0.99 * report["totals"]["matched"]["before"]
    # the residual map moves encoder_last_hidden_state (the stream itself), not the logits
    assert_same_function(model, tmp_path / "aligned", main_only=symmetries != "default")


def test_scrambled_stream_and_layers_are_recovered(pair, tmp_path):
    model, _ = pair
    options = MatchOptions(symmetries=WITH_RESIDUAL, device="cpu", workers=1)
    scrambled = scramble(model, tmp_path / "scrambled", options, seed=4)
    assert scrambled["residual"]["maps"] == {"encoder+decoder": "permutation"}
    assert_same_function(model, tmp_path / "scrambled", main_only=True)
    report = match(model, tmp_path / "scrambled", tmp_path / "back", options)
    totals = report["totals"]["model"]
    assert totals["before"] > 1.0
    assert totals["after"] / totals["before"] < 1e-5, report["residual"]


def test_the_classification_head_must_move_with_the_decoder_stream(pair, tmp_path):
    model, _ = pair
    scramble(model, tmp_path / "scrambled", MatchOptions(symmetries=symmetry_set("residual"), device="cpu"), seed=4)
    assert_same_function(model, tmp_path / "scrambled", main_only=True)
    file = tmp_path / "scrambled" / "model.safetensors"
    tensors = load_file(str(file))
    moved = tensors[DENSE].clone()
    tensors[DENSE] = load_file(str(model / "model.safetensors"))[DENSE]  # left in the old basis
    assert not torch.equal(moved, tensors[DENSE])
    save_file(tensors, str(file), metadata={"format": "pt"})
    assert max_relative_change(model, tmp_path / "scrambled", main_only=True) > BROKEN


def test_through_the_cli(pair, tmp_path):
    model, anchor = pair
    match_verify_merge(anchor, model, tmp_path, "default,residual")
