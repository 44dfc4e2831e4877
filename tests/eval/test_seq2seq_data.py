"""Encoder-decoders on user data: the decoder's inputs derived from the file, their hidden states
in activation matching, their loss in learned matching (T5, BART, mBART)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.functions import assert_same_function, one_thread
from helpers.tiny_models import save_tiny
from safetensors.torch import save_file

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.core.errors import InputError
from rotfuse.eval.data import IGNORE_LABEL, load_inputs, with_decoder_inputs
from rotfuse.eval.score import LABELS_FROM_DATA, LABELS_NEXT_TOKEN, loss_spec
from rotfuse.symmetry.names import symmetry_set

WITH_RESIDUAL = symmetry_set("default,residual")
T5 = {"is_encoder_decoder": True, "decoder_start_token_id": 0, "pad_token_id": 0}


def _data(path: Path, vocab: int, labels: bool, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (24, 10), generator=g)
    tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        tensors["labels"] = torch.randint(3, vocab, (24, 7), generator=g)
    save_file(tensors, str(path))
    return path


def test_decoder_inputs_are_the_labels_or_the_source_shifted_right() -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[9, 10, IGNORE_LABEL]])
    from_labels = with_decoder_inputs({"input_ids": ids, "labels": labels}, T5)["decoder_input_ids"]
    assert from_labels.tolist() == [[0, 9, 10]]
    from_source = with_decoder_inputs({"input_ids": ids}, {**T5, "decoder_start_token_id": 2})["decoder_input_ids"]
    assert from_source.tolist() == [[2, 5, 6, 7]]
    padded = with_decoder_inputs({"input_ids": ids, "labels": torch.tensor([[9, IGNORE_LABEL, 4]])}, T5)
    assert padded["decoder_input_ids"].tolist() == [[0, 9, 0]]  # an ignored target is read as padding
    given = {"input_ids": ids, "decoder_input_ids": torch.tensor([[1, 2]])}
    assert with_decoder_inputs(given, T5) is given
    assert "decoder_input_ids" not in with_decoder_inputs({"input_ids": ids}, {"model_type": "llama"})


def test_load_inputs_adds_decoder_inputs_from_the_checkpoint_config(tmp_path: Path) -> None:
    model = save_tiny("t5-gated", tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    inputs = load_inputs(_data(tmp_path / "d.safetensors", config["vocab_size"], labels=True), model)
    assert inputs["decoder_input_ids"].shape == inputs["labels"].shape
    assert torch.equal(inputs["decoder_input_ids"][:, 1:], inputs["labels"][:, :-1])


def test_seq2seq_loss_needs_target_labels_and_multimodal_generation_is_causal() -> None:
    bart = {"architectures": ["BartForConditionalGeneration"], "is_encoder_decoder": True, "num_labels": 3}
    ids = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    with pytest.raises(InputError, match="sequence-to-sequence.*'labels'"):
        loss_spec(bart, ids, "d.safetensors")
    spec = loss_spec(bart, {**ids, "labels": ids["input_ids"]}, "d.safetensors")
    assert spec.labels == LABELS_FROM_DATA and not spec.shift  # targets position by position
    gemma = {"architectures": ["Gemma3ForConditionalGeneration"], "text_config": {"vocab_size": 50}}
    spec = loss_spec(gemma, ids, "d.safetensors")
    assert spec.labels == LABELS_NEXT_TOKEN and spec.shift


def test_seq2seq_labels_are_checked_against_the_vocabulary_not_num_labels(tmp_path: Path) -> None:
    model = save_tiny("bart", tmp_path / "model")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    assert load_inputs(_data(tmp_path / "ok.safetensors", vocab, labels=True), model)["labels"].max() >= 3
    bad = tmp_path / "bad.safetensors"
    save_file({"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.full((2, 3), vocab)}, str(bad))
    with pytest.raises(InputError, match="labels must lie in 0"):
        load_inputs(bad, model)


@pytest.mark.parametrize("tiny", ["t5-gated", "bart"])
def test_activation_matching_recovers_a_scrambled_stream(tmp_path: Path, tiny: str) -> None:
    """The encoder's and the decoder's hidden states both count: a scrambled copy is found back."""
    model = save_tiny(tiny, tmp_path / "model")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    data = _data(tmp_path / "d.safetensors", vocab, labels=False)
    with one_thread():
        scramble(model, tmp_path / "scrambled", MatchOptions(symmetries=WITH_RESIDUAL, device="cpu"), seed=3)
        options = MatchOptions(symmetries=WITH_RESIDUAL, device="cpu", data=data, data_samples=24)
        report = match(model, tmp_path / "scrambled", tmp_path / "back", options)
    assert report["residual"]["method"] == "activations"
    totals = report["totals"]["model"]
    assert totals["after"] / totals["before"] < 1e-5
    assert_same_function(tmp_path / "scrambled", tmp_path / "back", main_only=True)


@pytest.mark.parametrize("tiny", ["t5-gated", pytest.param("mbart", marks=pytest.mark.slow)])
def test_learned_matching_of_encoder_decoders_keeps_the_function(tmp_path: Path, tiny: str) -> None:
    model, anchor = save_tiny(tiny, tmp_path / "model", seed=0), save_tiny(tiny, tmp_path / "anchor", seed=1)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    options = MatchOptions(
        symmetries=WITH_RESIDUAL,
        device="cpu",
        data=_data(tmp_path / "train.safetensors", vocab, labels=True),
        learn=True,
        learn_steps=6,
        data_batch_size=8,
    )
    with one_thread():
        report = match(anchor, model, tmp_path / "out", options)
    learned = report["learned"]
    assert learned["labels"] == LABELS_FROM_DATA
    assert learned["after"]["train_loss"] < learned["before"]["train_loss"]
    assert_same_function(model, tmp_path / "out", main_only=True)
