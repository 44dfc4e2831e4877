"""Architecture breadth: every built-in spec on a tiny random Hugging Face model.

For each architecture (and the config variants that change which tensors exist or which symmetry
is exact): matching against a different-seed anchor keeps every output of the model, a random
member of the symmetry group keeps them too and matching recovers it exactly, and restrictions
fire where the config demands them. test_archs_necessity.py shows that the restrictions (RoPE,
QK-norm, DeBERTa's position projections) are necessary; test_archs_errors.py covers refusals and
`rotfuse archs`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.functions import assert_same_function, save_pair

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.archs.spec import builtin_specs

# case -> (TINY entry, config overrides, spec it must bind to, symmetries the config switches off)
CASES: dict[str, tuple[str, dict, str, set[str]]] = {
    "gpt2": ("gpt2", {}, "gpt2", set()),
    "deberta-v2": ("deberta-v2", {}, "deberta-v2", set()),
    "deberta-v2-shared-key": ("deberta-v2", {"share_att_key": True}, "deberta-v2", set()),
    "deberta-v2-c2p": ("deberta-v2", {"pos_att_type": ["c2p"]}, "deberta-v2", set()),
    # deberta-v2-xlarge style: "p2c|c2p"-string config form, first-layer conv, normalised rel_embeddings
    "deberta-v2-p2c-conv": (
        "deberta-v2",
        {"pos_att_type": "p2c", "conv_kernel_size": 3, "norm_rel_ebd": "layer_norm"},
        "deberta-v2",
        set(),
    ),
    "deberta-v2-absolute": ("deberta-v2", {"relative_attention": False}, "deberta-v2", set()),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}, "llama", set()),
    "llama-gqa2-biases": ("llama", {"attention_bias": True, "mlp_bias": True}, "llama", set()),
    # partial_rotary_factor is ignored by modeling_llama's default rope: the whole head rotates
    "llama-gqa4-partial-ignored": ("llama", {"num_key_value_heads": 1, "partial_rotary_factor": 0.5}, "llama", set()),
    "mistral-gqa4-window": ("mistral", {}, "mistral", set()),
    "qwen2-gqa2-tied": ("qwen2", {}, "qwen2", set()),
    "qwen2-gqa4-untied": ("qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": False}, "qwen2", set()),
    "phi-partial-half": ("phi", {}, "phi", set()),
    "phi-partial-075-gqa3": ("phi", {"partial_rotary_factor": 0.75, "num_key_value_heads": 1}, "phi", set()),
    "phi-qk-layernorm": ("phi", {"qk_layernorm": True}, "phi", {"qk.rot", "qk.scale"}),
    "distilbert": ("distilbert", {}, "distilbert", set()),
    "clip": ("clip", {}, "clip", set()),
    "clip-vision-classifier": ("clip-vision-classifier", {}, "clip", set()),
    "clip-text": ("clip-text", {}, "clip_text_model", set()),
    "clip-vision": ("clip-vision", {}, "clip_vision_model", set()),
    "bert-relative-key-query": (
        "bert",
        {"position_embedding_type": "relative_key_query"},
        "bert",
        {"qk.rot", "qk.scale"},
    ),
    # decoder LLM families (issue 17; necessity in test_archs_llm_families.py)
    "qwen3-gqa2": ("qwen3", {}, "qwen3", {"qk.rot", "qk.scale"}),
    "qwen3-mha-biases-tied": (
        "qwen3",
        {"num_key_value_heads": 4, "attention_bias": True, "tie_word_embeddings": True},
        "qwen3",
        {"qk.rot", "qk.scale"},
    ),
    "phi3-gqa3-partial": ("phi3", {}, "phi3", set()),
    "phi3-mha-full-rotary-tied": (
        "phi3",
        {
            "num_key_value_heads": 3,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "phi3",
        set(),
    ),
    "gpt-neox-parallel": ("gpt-neox", {}, "gpt_neox", set()),
    "gpt-neox-sequential-no-attention-bias": (
        "gpt-neox",
        {"use_parallel_residual": False, "attention_bias": False},
        "gpt_neox",
        set(),
    ),
    "gemma-gqa2-tied": ("gemma", {}, "gemma", set()),
    "gemma-mha-untied-biases": (
        "gemma",
        {"num_key_value_heads": 4, "tie_word_embeddings": False, "attention_bias": True},
        "gemma",
        set(),
    ),
    # mixtures of experts: whole experts with the router's rows, each expert's neurons, attention as dense
    "mixtral-gqa2": ("mixtral", {}, "mixtral", set()),
    "mixtral-gqa4-top1": ("mixtral", {"num_key_value_heads": 1, "num_experts_per_tok": 1}, "mixtral", set()),
    "qwen2-moe-shared-expert": ("qwen2-moe", {}, "qwen2_moe", set()),
    "qwen2-moe-norm-topk": ("qwen2-moe", {"norm_topk_prob": True, "qkv_bias": False}, "qwen2_moe", set()),
    # q_norm / k_norm: QK rotation and scale are off (configs/archs/qwen3_moe.yaml)
    "qwen3-moe-qk-norm": ("qwen3-moe", {}, "qwen3_moe", {"qk.rot", "qk.scale"}),
    # full-width q_norm / k_norm: QK maps off, heads move with their gain slices (configs/archs/olmo2.yaml)
    "olmo2-gqa2": ("olmo2", {}, "olmo2", {"qk.rot", "qk.scale"}),
    # post-sublayer norms, soft-capping, sliding window: every per-layer map exact (configs/archs/gemma2.yaml)
    "gemma2-gqa2-window-softcap": ("gemma2", {}, "gemma2", set()),
    "gemma2-mha-untied-biases": (
        "gemma2",
        {"num_key_value_heads": 4, "tie_word_embeddings": False, "attention_bias": True},
        "gemma2",
        set(),
    ),
    # Gemma 3's per-head (1 + w) q_norm / k_norm: as Qwen3
    "gemma3-gqa2": ("gemma3", {}, "gemma3", {"qk.rot", "qk.scale"}),
    "olmo2-mha-biases": (
        "olmo2",
        {"num_key_value_heads": 4, "attention_bias": True},
        "olmo2",
        {"qk.rot", "qk.scale"},
    ),
}
COVERED_ELSEWHERE = {"roberta", "vit"}  # tests/align/test_match.py
COVERED_ELSEWHERE |= {"t5", "bart", "mbart"}  # tests/archs/test_archs_encoder_decoder.py
COVERED_ELSEWHERE |= {"gemma3_mm"}  # tests/archs/test_archs_gemma3_multimodal.py


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Callable[[str], tuple[Path, Path]]:
    """case -> (model, anchor) folders, each built once for the module's tests."""
    root = tmp_path_factory.mktemp("archs")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(case: str) -> tuple[Path, Path]:
        if case not in cache:
            tiny, overrides, _, _ = CASES[case]
            cache[case] = save_pair(tiny, root / case, **overrides)
        return cache[case]

    return get


def test_every_builtin_spec_has_a_case():
    covered = {spec for _, _, spec, _ in CASES.values()} | COVERED_ELSEWHERE
    assert set(builtin_specs()) <= covered


@pytest.mark.parametrize("case", CASES)
def test_matching_keeps_the_function(pairs, tmp_path, case):
    model, anchor = pairs(case)
    _, _, spec, disabled = CASES[case]
    report = match(anchor, model, tmp_path / "aligned", MatchOptions(device="cpu"))
    assert report["arch"] == spec
    assert_same_function(model, tmp_path / "aligned")
    totals = report["totals"]["matched"]
    assert totals["after"] < 0.99 * totals["before"]  # the weights really moved
    for row in report["layers"]:
        for name, module in row["modules"].items():
            assert module["after"] <= module["before"], (row["layer"], name)
        qk = set(row["modules"]["attn.qk"]["applied"])
        # a restriction removes the per-head QK maps; whole-head permutation stays exact
        assert (not qk & {"rot", "scale"}) == bool(disabled), (row["layer"], qk)
    for symmetry in disabled:
        assert any(symmetry in note for note in report["restrictions"]), report["restrictions"]
    if not disabled:
        assert not [note for note in report["restrictions"] if " off: " in note]


@pytest.mark.parametrize("case", CASES)
def test_scramble_keeps_the_function_and_matching_undoes_it(pairs, tmp_path, case):
    model, _ = pairs(case)
    _, _, _, disabled = CASES[case]
    scrambled = tmp_path / "scrambled"
    scramble(model, scrambled, MatchOptions(device="cpu"), seed=11)
    assert_same_function(model, scrambled)
    report = match(model, scrambled, tmp_path / "back", MatchOptions(device="cpu"))
    totals = report["totals"]["matched"]
    assert totals["before"] > 1.0
    assert totals["after"] < 1e-5 * totals["before"]
    for row in report["layers"]:
        qk = row["modules"]["attn.qk"]
        assert (not {"rot", "scale"} & set(qk["applied"])) == bool(disabled)  # restricted: only heads move
