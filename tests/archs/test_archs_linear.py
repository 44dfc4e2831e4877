"""GLMC's general invertible per-head maps (`qk.linear`, `vo.linear`) on real tiny Hugging Face
models: a random member of the group keeps every output, matching finds it back exactly, matching
against a different-seed anchor keeps the function, and the restrictions are necessary -- under
RoPE a general QK map breaks the function (only a scaled rotation per frequency pair commutes),
and so does any QK map under a per-head QK norm (Qwen3)."""

from __future__ import annotations

import pytest
from archs.test_archs import CASES as ARCH_CASES
from helpers.functions import assert_same_function, max_relative_change, save_pair
from helpers.tiny_models import save_tiny

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.symmetry.names import symmetry_set

BROKEN = 1e-3  # as tests/archs/test_archs_necessity.py: a different function, not rounding
LINEAR = MatchOptions(symmetries=symmetry_set("linear"), device="cpu")

# case -> (TINY entry, config overrides): Conv1D + fused QKV, encoders with biases, RoPE with GQA,
# partial rotary (full invertible block on the pass-through coordinates) with one KV head
CASES = {
    "gpt2": ("gpt2", {}),
    "bert": ("bert", {}),
    "vit": ("vit", {}),
    "llama-gqa2-biases": ("llama", {"attention_bias": True}),
    "phi-partial-gqa4": ("phi", {"num_key_value_heads": 1}),
}


@pytest.mark.parametrize("case", CASES)
def test_random_linear_maps_keep_the_function_and_are_recovered(tmp_path, case):
    tiny, overrides = CASES[case]
    model = save_tiny(tiny, tmp_path / "model", seed=0, **overrides)
    scramble(model, tmp_path / "scrambled", LINEAR, seed=3)
    assert_same_function(model, tmp_path / "scrambled")
    report = match(model, tmp_path / "scrambled", tmp_path / "back", LINEAR)
    for row in report["layers"]:
        for module in ("attn.qk", "attn.vo"):
            found = row["modules"][module]
            assert found["before"] > 1.0 and found["after"] < 1e-5 * found["before"], (module, row)
            assert "linear" in found["applied"]
    assert_same_function(model, tmp_path / "back")


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa2-biases"])
def test_matching_with_linear_maps_keeps_the_function_and_beats_rotations(tmp_path, case):
    tiny, overrides = CASES[case]
    model, anchor = save_pair(tiny, tmp_path, **overrides)
    with_linear = match(
        anchor, model, tmp_path / "linear", MatchOptions(symmetries=symmetry_set("default,linear"), device="cpu")
    )
    plain = match(anchor, model, tmp_path / "plain", MatchOptions(symmetries=symmetry_set("default"), device="cpu"))
    assert_same_function(model, tmp_path / "linear")
    for row_linear, row_plain in zip(with_linear["layers"], plain["layers"], strict=True):
        for module in ("attn.qk", "attn.vo"):
            # the linear solve starts from the rotation + scale optimum, so it can only do better
            assert row_linear["modules"][module]["after"] <= row_plain["modules"][module]["after"] * (1 + 1e-6)
            assert row_linear["modules"][module]["linear_condition"] <= 1e3


# variant -> (TINY entry, spec text that drops the restriction, symmetries the scramble draws)
UNSAFE = {
    "llama-general-qk-map-under-rope": ("llama", "extends: llama\nname: llama\nrope: null\n", "qk.linear"),
    "qwen3-qk-map-under-qk-norm": ("qwen3", "extends: qwen3\nname: qwen3\nrestrictions: []\n", "qk.linear"),
}


@pytest.mark.parametrize("variant", UNSAFE)
def test_forbidden_linear_maps_break_the_function(tmp_path, variant):
    tiny, spec_text, names = UNSAFE[variant]
    model = save_tiny(tiny, tmp_path / "model", seed=0)
    spec = tmp_path / "variant.yaml"
    spec.write_text(spec_text)
    symmetries = symmetry_set(names)
    scramble(model, tmp_path / "safe", MatchOptions(symmetries=symmetries, device="cpu"), seed=2)
    scramble(model, tmp_path / "unsafe", MatchOptions(symmetries=symmetries, device="cpu", arch_spec=spec), seed=2)
    assert_same_function(model, tmp_path / "safe")  # RoPE pairs / the restriction keep it exact
    assert max_relative_change(model, tmp_path / "unsafe") > BROKEN


def test_qk_norm_restriction_names_the_linear_map(tmp_path):
    model = save_tiny("qwen3", tmp_path / "model", seed=0)
    report = match(model, model, tmp_path / "out", LINEAR)
    text = " ".join(str(note) for note in report.get("notes", [])) + str(report.get("restrictions", ""))
    assert "qk.linear" in text, report.keys()


@pytest.mark.parametrize("case", ARCH_CASES)
def test_every_architecture_keeps_its_function_under_random_linear_maps(tmp_path, case):
    """Every built-in spec (test_archs.py's cases): a random member of default + linear, where the
    spec allows it, is an exact symmetry of the real model."""
    tiny, overrides, _, _ = ARCH_CASES[case]
    model = save_tiny(tiny, tmp_path / "model", seed=0, **overrides)
    scramble(model, tmp_path / "scrambled", MatchOptions(symmetries=symmetry_set("default,linear"), device="cpu"), 5)
    assert_same_function(model, tmp_path / "scrambled")
