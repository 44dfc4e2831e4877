"""`rotfuse match -s default,residual`: the residual-stream map found by weight matching or from
activations, together with the per-layer maps, for every architecture and both norm types --
function preserved, scrambled copies recovered -- and several models aligned in one call."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.cli import assert_one_line_error
from helpers.functions import assert_same_function, outputs
from helpers.tiny_models import save_tiny
from safetensors.torch import save_file

from rotfuse.align.match import REPORT_NAME, match
from rotfuse.align.options import MatchOptions
from rotfuse.align.pair import folded_view
from rotfuse.align.scramble import scramble
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.symmetry.names import symmetry_set

WITH_RESIDUAL = symmetry_set("default,residual")

KEEPING_ONES = "orthogonal, keeping the ones"  # pre-LN LayerNorm models, norms folded
# (TINY name, the map the stream gets)
CASES = {
    "bert": "permutation",
    "roberta": "permutation",
    "bert-mlm": "permutation",
    "vit": KEEPING_ONES,
    "gpt2": "permutation",
    "deberta-v2": "permutation",
    "distilbert-mlm": "permutation",
    "phi": KEEPING_ONES,
    "clip": "permutation",
    "llama": "orthogonal",
    "mistral": "orthogonal",
    "llama-tied": "permutation",
    "qwen2": "permutation",
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_scrambled_stream_and_layers_are_recovered(tmp_path, arch):
    model = save_tiny(arch, tmp_path / "model", seed=0)
    options = MatchOptions(symmetries=WITH_RESIDUAL, device="cpu", workers=1)
    scrambled = scramble(model, tmp_path / "scrambled", options, seed=4)
    assert all(kind == CASES[arch] for kind in scrambled["residual"]["maps"].values())
    assert_same_function(model, tmp_path / "scrambled", main_only=True)
    report = match(model, tmp_path / "scrambled", tmp_path / "back", options)
    totals = report["totals"]["model"]
    assert totals["before"] > 1.0
    assert totals["after"] / totals["before"] < 1e-5, (arch, report["residual"])
    assert_same_function(tmp_path / "scrambled", tmp_path / "back", main_only=True)


def test_residual_alignment_helps_models_from_different_seeds(tmp_path):
    """Unrelated models: adding the stream map moves the model closer than the per-layer maps alone,
    and the weight-matching rounds never end worse than they started. ViT's LayerNorms fold, so
    the distances are measured with the gains folded into their readers on both sides (round 0,
    the identity map, is the layers-only result in that space) and the copy is written in the
    anchor's gains."""
    model = save_tiny("vit", tmp_path / "model", seed=0)
    anchor = save_tiny("vit", tmp_path / "anchor", seed=1)
    both = match(anchor, model, tmp_path / "both", MatchOptions(symmetries=WITH_RESIDUAL, device="cpu"))
    assert both["residual"]["distances"] == "norm gains folded into their readers, on both sides"
    rounds = both["residual"]["rounds"]
    assert both["residual"]["method"] == "weights" and rounds[0]["round"] == 0 and len(rounds) >= 2
    assert min(r["distance"] for r in rounds[1:]) < rounds[0]["distance"]
    assert both["totals"]["model"]["after"] <= rounds[0]["distance"] * (1 + 1e-9)
    assert_same_function(model, tmp_path / "both", main_only=True)
    # written in the anchor's gains: every norm gain is the anchor's
    written, theirs = Checkpoint.open(tmp_path / "both"), Checkpoint.open(anchor)
    gains = [n for n in written.names() if "layernorm" in n]
    assert len(gains) == 2 * 2 * 2 + 2
    for name in gains:
        if name.endswith("weight"):
            assert torch.equal(written.get(name), theirs.get(name)), name


def test_a_copy_in_the_anchors_gains_averages_like_the_folded_pair(tmp_path):
    """The point of writing the copy in the anchor's norm gains: the plain average of ANCHOR and
    the copy computes what the average of both, folded, computes."""
    from rotfuse.eval.runtime import example_inputs, forward, load_model
    from rotfuse.merge.engine import MergeOptions, merge

    model = save_tiny("vit", tmp_path / "model", seed=0)
    anchor = save_tiny("vit", tmp_path / "anchor", seed=1)
    options = MatchOptions(symmetries=WITH_RESIDUAL, device="cpu")
    match(anchor, model, tmp_path / "copy", options)
    merge([anchor, tmp_path / "copy"], tmp_path / "merged", MergeOptions(method="simple", device="cpu"))
    inputs = example_inputs(json.loads((model / "config.json").read_text()), batch=2, seq_len=8, seed=0)
    merged = forward(load_model(tmp_path / "merged"), inputs).logits

    # the same average taken with every norm folded on both sides (gain 1, bias / gain)
    def folded(folder):
        side = folded_view(folder)
        return {name: side.read(name) for name in side.checkpoint.names()}

    mine, theirs = folded(tmp_path / "copy"), folded(anchor)
    average = {name: (mine[name] + theirs[name]) / 2 for name in mine}
    (tmp_path / "folded-average").mkdir()
    save_file(average, str(tmp_path / "folded-average" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "folded-average" / "config.json").write_text((anchor / "config.json").read_text())
    expected = forward(load_model(tmp_path / "folded-average"), inputs).logits
    assert torch.allclose(merged, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch, data", [("vit", "pixels"), ("llama", "tokens"), ("bert", "text")])
def test_activation_matching_recovers_the_stream(tmp_path, minilm_dir, arch, data):
    model = save_tiny(arch, tmp_path / "model", seed=0)
    config = json.loads((model / "config.json").read_text())
    generator = torch.Generator().manual_seed(0)
    if data == "pixels":
        path = tmp_path / "inputs.safetensors"
        save_file(
            {
                "pixel_values": torch.randn(
                    40, config["num_channels"], config["image_size"], config["image_size"], generator=generator
                )
            },
            str(path),
        )
    elif data == "tokens":
        path = tmp_path / "inputs.npz"
        import numpy as np

        np.savez(path, input_ids=torch.randint(0, config["vocab_size"], (24, 12), generator=generator).numpy())
    else:  # text through the checkpoint's own tokenizer: borrow MiniLM's (its vocabulary is larger)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            (model / name).write_bytes((minilm_dir / name).read_bytes())
        config["vocab_size"] = 30522
        model = save_tiny(arch, tmp_path / "big-vocab", seed=0, vocab_size=30522)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            (model / name).write_bytes((minilm_dir / name).read_bytes())
        path = tmp_path / "inputs.jsonl"
        path.write_text("\n".join(json.dumps({"text": f"sample number {i} about merging models"}) for i in range(40)))
    options = MatchOptions(symmetries=WITH_RESIDUAL, device="cpu", data=path, data_samples=40)
    scramble(model, tmp_path / "scrambled", MatchOptions(symmetries=WITH_RESIDUAL, device="cpu"), seed=2)
    report = match(model, tmp_path / "scrambled", tmp_path / "back", options)
    assert report["residual"]["method"] == "activations"
    totals = report["totals"]["model"]
    assert totals["after"] / totals["before"] < 1e-5
    assert_same_function(tmp_path / "scrambled", tmp_path / "back", main_only=True)


def test_untie_allows_an_orthogonal_map_on_tied_embeddings(tmp_path):
    model = save_tiny("llama-tied", tmp_path / "model", seed=0)
    options = MatchOptions(symmetries=WITH_RESIDUAL, device="cpu", allow_untie=True)
    scrambled = scramble(model, tmp_path / "scrambled", options, seed=1)
    assert scrambled["residual"]["maps"] == {"stream": "orthogonal"} and scrambled["residual"]["untied"]
    config = json.loads((tmp_path / "scrambled" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert "lm_head.weight" in Checkpoint.open(tmp_path / "scrambled").names()
    assert_same_function(model, tmp_path / "scrambled", main_only=True)


def test_untie_on_a_pre_ln_model_recovers_a_rotated_stream(tmp_path):
    """GPT-2 ties lm_head to wte and feeds it through ln_f: with --allow-untie the LayerNorms fold,
    the stream may rotate (keeping the ones), and a scrambled copy is matched back."""
    model = save_tiny("gpt2", tmp_path / "model", seed=0)
    options = MatchOptions(symmetries=WITH_RESIDUAL, device="cpu", allow_untie=True)
    scrambled = scramble(model, tmp_path / "scrambled", options, seed=3)
    assert scrambled["residual"]["maps"] == {"stream": KEEPING_ONES} and scrambled["residual"]["untied"]
    assert_same_function(model, tmp_path / "scrambled", main_only=True)
    report = match(tmp_path / "scrambled", model, tmp_path / "back", options)
    totals = report["totals"]["model"]
    assert totals["before"] > 1.0 and totals["after"] / totals["before"] < 1e-5
    assert_same_function(model, tmp_path / "back", main_only=True)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"] is False


def test_headless_model_needs_consent(tmp_path, cli):
    model = save_tiny("bert-bare", tmp_path / "model", seed=0)
    anchor = save_tiny("bert-bare", tmp_path / "anchor", seed=1)
    assert_one_line_error(
        cli("match", anchor, model, "-o", tmp_path / "out", "-s", "default,residual"),
        "BertModel has no head",
        "--allow-stream-output",
    )
    result = cli(
        "match",
        anchor,
        model,
        "-o",
        tmp_path / "out",
        "-s",
        "default,residual",
        "--allow-stream-output",
        "--json",
        "-q",
    )
    assert result.returncode == 0, result.stderr
    # the hidden states come out permuted by the stream map: same values, other order
    before, after = outputs(model), outputs(tmp_path / "out")
    assert torch.allclose(before.sort(-1).values, after.sort(-1).values, atol=1e-5)
    assert not torch.allclose(before, after, atol=1e-3)


def test_several_models_in_one_call(tmp_path, cli):
    anchor = save_tiny("vit", tmp_path / "anchor", seed=0)
    first = save_tiny("vit", tmp_path / "first", seed=1)
    second = save_tiny("vit", tmp_path / "nested" / "first", seed=2)  # same folder name: numbered
    result = cli("match", anchor, first, second, "-o", tmp_path / "out", "--json", "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(report["outputs"]) == ["first", "first-2"] and len(report["models"]) == 2
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text())["outputs"] == report["outputs"]
    assert_same_function(first, tmp_path / "out" / "first", main_only=True)
    assert_same_function(second, tmp_path / "out" / "first-2", main_only=True)
    assert_one_line_error(cli("match", anchor, first, tmp_path / "missing", "-o", tmp_path / "out2"), "missing")
    assert not (tmp_path / "out2").exists()


def test_data_needs_the_residual_symmetry(tmp_path, cli):
    model = save_tiny("vit", tmp_path / "model", seed=0)
    assert_one_line_error(
        cli("match", model, model, "-o", tmp_path / "out", "--data", tmp_path / "x.npz"), "--data", "residual"
    )


def test_merge_match_refuses_the_residual_stream(tmp_path, cli):
    model = save_tiny("vit", tmp_path / "model", seed=0)
    other = save_tiny("vit", tmp_path / "other", seed=1)
    assert_one_line_error(
        cli("merge", "--match", "-s", "default,residual", model, other, "-o", tmp_path / "out"), "--match", "residual"
    )
