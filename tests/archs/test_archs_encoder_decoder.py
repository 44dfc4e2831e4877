"""Encoder-decoders (issue 17): T5 (v1.1 gated, v1.0 relu with its tied and scaled head, the bare
encoder), mT5 and BART / mBART, on tiny random models built from transformers' config classes.

Each spec has three stacks: `encoder`, `decoder` (self-attention and FFN) and `cross`, the
decoder's cross-attention blocks as an attention-only stack under the decoder's layer prefix
(Q reads the decoder stream, K/V the encoder output; its QK and VO circuits get their own maps).
Per case: matching keeps every output and never increases a module's distance; a random member
of the group keeps the function and matching recovers it (< 1e-5). Necessity: permuting the heads
of T5's self-attention (whose relative bias is shared by the whole stack) breaks the function, and
so does leaving the gated FFN's `wi_1` out of the neuron permutation. One CLI round trip: match,
verify, merge.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.functions import assert_same_function, max_relative_change, save_pair
from helpers.tiny_models import save_tiny

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.archs.spec import load_spec_file
from rotfuse.core.errors import InputError
from rotfuse.symmetry.names import symmetry_set

BROKEN = 1e-3  # a relative output change this large is a different function, not rounding
SELF_ATTENTION = ("encoder", "decoder")

# case -> (TINY entry, spec, stacks present, head permutation off in the self-attention stacks)
CASES: dict[str, tuple[str, str, set[str], bool]] = {
    "t5-v1.1-gated": ("t5-gated", "t5", {"encoder", "decoder", "cross"}, True),
    "t5-v1.0-tied": ("t5-v1.0", "t5", {"encoder", "decoder", "cross"}, True),
    "t5-encoder-only": ("t5-encoder", "t5", {"encoder"}, True),
    "mt5": ("mt5", "t5", {"encoder", "decoder", "cross"}, True),
    "bart": ("bart", "bart", {"encoder", "decoder", "cross"}, False),
    "mbart": ("mbart", "mbart", {"encoder", "decoder", "cross"}, False),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Callable[[str], tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("encdec")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(case: str) -> tuple[Path, Path]:
        if case not in cache:
            cache[case] = save_pair(CASES[case][0], root / case)
        return cache[case]

    return get


def _check_rows(report: dict, case: str) -> None:
    _, _, stacks, heads_off = CASES[case]
    assert {row["layer"].split(".")[0] for row in report["layers"]} == stacks
    for row in report["layers"]:
        stack = row["layer"].split(".")[0]
        assert set(row["modules"]) == ({"attn.qk", "attn.vo"} if stack == "cross" else {"attn.qk", "attn.vo", "ffn"})
        for name, module in row["modules"].items():
            assert module["after"] <= module["before"], (row["layer"], name)
            if name.startswith("attn."):
                assert {"rot", "scale"} <= set(module["applied"]), (row["layer"], name)
                if heads_off and stack in SELF_ATTENTION:
                    assert "heads" not in module["applied"], (row["layer"], name)
    notes = [note for note in report["restrictions"] if " off" in note]
    assert notes == (
        [
            "heads.perm off in encoder, decoder: the relative attention bias of block 0 (one column per "
            "head) is added to the scores of every layer of the stack, so a layer's heads cannot be "
            "permuted on their own (per-head rotation and rescaling are unaffected; cross-attention has "
            "no position bias and keeps head permutation)"
        ]
        if heads_off
        else []
    )


@pytest.mark.parametrize("case", CASES)
def test_matching_keeps_the_function(pairs, tmp_path, case):
    model, anchor = pairs(case)
    report = match(anchor, model, tmp_path / "aligned", MatchOptions(device="cpu"))
    assert report["arch"] == CASES[case][1]
    assert_same_function(model, tmp_path / "aligned")
    totals = report["totals"]["matched"]
    assert totals["after"] < 0.99 * totals["before"]
    _check_rows(report, case)


@pytest.mark.parametrize("case", CASES)
def test_scramble_keeps_the_function_and_matching_undoes_it(pairs, tmp_path, case):
    model, _ = pairs(case)
    scrambled = tmp_path / "scrambled"
    scramble(model, scrambled, MatchOptions(device="cpu"), seed=11)
    assert_same_function(model, scrambled)
    report = match(model, scrambled, tmp_path / "back", MatchOptions(device="cpu"))
    totals = report["totals"]["matched"]
    assert totals["before"] > 1.0
    assert totals["after"] < 1e-5 * totals["before"]
    for row in report["layers"]:  # every stack, cross-attention's QK and VO included, was moved and found back
        for name, module in row["modules"].items():
            assert module["before"] > 0.1 and module["after"] < 1e-5 * module["before"], (row["layer"], name)
    _check_rows(report, case)


def test_cross_attention_head_permutation_is_recovered(tmp_path):
    """T5's cross-attention has no position bias: its heads permute, and matching finds them back."""
    model = save_tiny("t5-gated", tmp_path / "model")
    heads = MatchOptions(symmetries=symmetry_set("heads.perm"), device="cpu")
    scramble(model, tmp_path / "scrambled", heads, seed=5)
    assert_same_function(model, tmp_path / "scrambled")
    report = match(model, tmp_path / "scrambled", tmp_path / "back", heads)
    for row in report["layers"]:
        for module in row["modules"].values():
            if row["layer"].startswith("cross."):
                assert module["after"] < 1e-5 * max(module["before"], 1e-3)
            else:  # encoder / decoder self-attention and FFN: nothing may move
                assert module["before"] == 0.0 and module["after"] == 0.0
    assert any(m["before"] > 1.0 for row in report["layers"] for m in row["modules"].values())


# ---------------------------------------------------------------------- necessity

# T5 with one stack whose gated FFN leaves wi_1 out of the neuron permutation
T5_WI1_LEFT_OUT = """
extends: t5
name: t5
restrictions: []
stacks:
  - name: encoder
    layer: "encoder.block.{i}."
    dims: {num_layers: num_layers, num_heads: num_heads, hidden_size: d_model, head_dim: d_kv}
    attention:
      q: {weight: layer.0.SelfAttention.q.weight}
      k: {weight: layer.0.SelfAttention.k.weight}
      v: {weight: layer.0.SelfAttention.v.weight}
      o: {weight: layer.0.SelfAttention.o.weight}
    ffn:
      inputs: [{weight: layer.1.DenseReluDense.wi_0.weight}]
      output: {weight: layer.1.DenseReluDense.wo.weight}
    passive: ["layer.*.layer_norm.weight", layer.0.SelfAttention.relative_attention_bias.weight,
              layer.1.DenseReluDense.wi_1.weight]
"""
# variant -> (TINY entry, spec text dropping one safeguard, symmetries the unsafe copy is scrambled with)
SAFEGUARDS = {
    "t5-self-attention-heads-permuted-per-layer": (
        "t5-gated",
        "extends: t5\nname: t5\nrestrictions: []\n",
        "heads.perm",
    ),
    "t5-v1.0-self-attention-heads-permuted-per-layer": (
        "t5-v1.0",
        "extends: t5\nname: t5\nrestrictions: []\n",
        "heads.perm",
    ),
    "t5-gated-ffn-wi_1-left-out": ("t5-encoder", T5_WI1_LEFT_OUT, "ffn.perm"),
}


@pytest.mark.parametrize("variant", SAFEGUARDS)
def test_dropping_a_spec_safeguard_breaks_the_function(tmp_path, variant):
    tiny, spec_text, symmetries = SAFEGUARDS[variant]
    model = save_tiny(tiny, tmp_path / "model", seed=0)
    spec = tmp_path / "variant.yaml"
    spec.write_text(spec_text)
    chosen = symmetry_set(symmetries)
    scramble(model, tmp_path / "safe", MatchOptions(symmetries=chosen, device="cpu"), seed=2)
    scramble(model, tmp_path / "unsafe", MatchOptions(symmetries=chosen, device="cpu", arch_spec=spec), seed=2)
    assert_same_function(model, tmp_path / "safe")
    assert max_relative_change(model, tmp_path / "unsafe") > BROKEN


# ---------------------------------------------------------------------- CLI


@pytest.mark.slow
@pytest.mark.parametrize("tiny", ["t5-gated", "bart"])
def test_cli_match_verify_merge(cli, tmp_path, tiny):
    model, anchor = save_pair(tiny, tmp_path)
    aligned = tmp_path / "aligned"
    result = cli("match", anchor, model, "-o", aligned)
    assert result.returncode == 0, result.stderr
    result = cli("verify", model, aligned)
    assert result.returncode == 0, result.stderr + result.stdout
    result = cli("merge", anchor, aligned, "-o", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["is_encoder_decoder"] and (tmp_path / "merged" / "model.safetensors").exists()
    result = cli("merge", "--match", anchor, model, "-o", tmp_path / "merged2")
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("restrictions: [{disable: [heads.perm], stacks: [nowhere], reason: r}]", "unknown stacks"),
        ("restrictions: [{disable: [heads.perm]}]", "needs a reason"),
    ],
)
def test_bad_restrictions_are_refused(tmp_path, text, fragment):
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"extends: t5\nname: t5\n{text}\n")
    with pytest.raises(InputError, match=fragment):
        load_spec_file(spec)


def test_an_optional_input_is_refused_outside_an_ffn(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "extends: llama\nname: llama\nattention:\n  q: {weight: a, optional: true}\n"
        "  k: {weight: b}\n  v: {weight: c}\n  o: {weight: d}\n"
    )
    with pytest.raises(InputError, match="unknown key 'optional'"):
        load_spec_file(spec)


def test_a_checkpoint_without_any_ffn_input_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = save_tiny("t5-encoder", tmp_path / "model")
    tensors = load_file(str(model / "model.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if ".wi_" not in k},
        str(model / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(InputError, match="none of the FFN inputs"):
        scramble(model, tmp_path / "out", MatchOptions(device="cpu"), seed=0)


# ---------------------------------------------------------------------- residual stream

WITH_RESIDUAL = symmetry_set("default,residual")


def save_t5_untied(folder: Path, seed: int = 0) -> Path:
    """T5 v1.1 as transformers 4 saved it: lm_head stored apart from shared.weight, config untied
    (no scale_decoder_outputs). transformers 5 keeps a head whose values differ from the embedding."""
    import torch
    from safetensors.torch import load_file, save_file

    save_tiny("t5-gated", folder, seed=seed)
    tensors = load_file(str(folder / "model.safetensors"))
    generator = torch.Generator().manual_seed(100 + seed)
    tensors["lm_head.weight"] = torch.randn(tensors["shared.weight"].shape, generator=generator)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    config.pop("scale_decoder_outputs", None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# case -> (builder, the map the coupled encoder+decoder stream gets, allow_untie)
RESIDUAL_CASES: dict[str, tuple[Callable[[Path], Path], str, bool]] = {
    "t5-v1.1-untied": (save_t5_untied, "orthogonal", False),
    "t5-v1.1-tied": (lambda folder: save_tiny("t5-gated", folder), "permutation", False),
    "t5-v1.0-tied": (lambda folder: save_tiny("t5-v1.0", folder), "permutation", False),
    "t5-v1.0-untie": (lambda folder: save_tiny("t5-v1.0", folder), "orthogonal", True),
    "bart": (lambda folder: save_tiny("bart", folder), "permutation", False),
    "mbart": (lambda folder: save_tiny("mbart", folder), "permutation", False),
}


@pytest.mark.parametrize("case", RESIDUAL_CASES)
def test_scrambled_stream_and_layers_are_recovered(tmp_path, case):
    """A random residual map (one for the coupled encoder+decoder stream) plus random per-layer maps
    keep the function, and matching finds both back (optimality)."""
    build, kind, allow_untie = RESIDUAL_CASES[case]
    model = build(tmp_path / "model")
    options = MatchOptions(symmetries=WITH_RESIDUAL, device="cpu", workers=1, allow_untie=allow_untie)
    scrambled = scramble(model, tmp_path / "scrambled", options, seed=4)
    assert scrambled["residual"]["maps"] == {"encoder+decoder": kind}
    assert_same_function(model, tmp_path / "scrambled", main_only=True)
    # an untied copy is matched as the anchor: an anchor whose head is still the embedding has no
    # head tensor to compare with (as for GPT-2 in tests/align/test_residual_search.py)
    anchor, moving = (tmp_path / "scrambled", model) if allow_untie else (model, tmp_path / "scrambled")
    report = match(anchor, moving, tmp_path / "back", options)
    totals = report["totals"]["model"]
    assert totals["before"] > 1.0
    assert totals["after"] / totals["before"] < 1e-5, (case, report["residual"])
    assert_same_function(model, tmp_path / "back", main_only=True)


@pytest.mark.slow
def test_residual_matching_of_unrelated_t5s_keeps_the_function(tmp_path):
    model, anchor = save_t5_untied(tmp_path / "model", seed=0), save_t5_untied(tmp_path / "anchor", seed=1)
    report = match(anchor, model, tmp_path / "aligned", MatchOptions(symmetries=WITH_RESIDUAL, device="cpu"))
    assert report["residual"]["maps"] == {"encoder+decoder": "orthogonal"}
    rounds = report["residual"]["rounds"]
    assert report["totals"]["model"]["after"] <= rounds[0]["distance"] * (1 + 1e-9)
    assert_same_function(model, tmp_path / "aligned", main_only=True)


@pytest.mark.slow
def test_cli_match_residual_and_verify(cli, tmp_path):
    model, anchor = save_t5_untied(tmp_path / "model", seed=0), save_t5_untied(tmp_path / "anchor", seed=1)
    aligned = tmp_path / "aligned"
    result = cli("match", anchor, model, "-o", aligned, "-s", "default,residual", "--json", "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["residual"]["maps"] == {"encoder+decoder": "orthogonal"}
    result = cli("verify", model, aligned)
    assert result.returncode == 0, result.stderr + result.stdout
