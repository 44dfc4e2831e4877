"""Tiny Hugging Face models built from configs with random weights, saved as checkpoint folders.

One entry per architecture family in TINY; tests pick by name. Weights use a large init range so
attention is far from uniform and a broken symmetry shows up in the outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Tiny:
    config: Callable[..., Any]  # **overrides -> transformers config
    model: str  # transformers class name


def _bert(**kw: Any) -> Any:
    from transformers import BertConfig

    base = dict(
        vocab_size=61,
        hidden_size=30,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=37,
        max_position_embeddings=32,
        initializer_range=0.25,
        num_labels=3,
    )
    return BertConfig(**{**base, **kw})


def _roberta(**kw: Any) -> Any:
    from transformers import RobertaConfig

    base = dict(
        vocab_size=61,
        hidden_size=30,
        num_hidden_layers=2,
        num_attention_heads=5,
        intermediate_size=23,
        max_position_embeddings=40,
        initializer_range=0.25,
        num_labels=2,
    )
    return RobertaConfig(**{**base, **kw})


def _vit(**kw: Any) -> Any:
    from transformers import ViTConfig

    base = dict(
        image_size=12,
        patch_size=4,
        num_channels=3,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=29,
        initializer_range=0.25,
        num_labels=5,
    )
    return ViTConfig(**{**base, **kw})


TINY: dict[str, Tiny] = {
    "bert": Tiny(_bert, "BertForSequenceClassification"),
    "bert-bare": Tiny(_bert, "BertModel"),
    "roberta": Tiny(_roberta, "RobertaForSequenceClassification"),
    "vit": Tiny(_vit, "ViTForImageClassification"),
    "vit-bare": Tiny(_vit, "ViTModel"),
}


# ---- architecture breadth (tests/archs/): odd sizes, large init so attention is sharp


def _config(cls: str, **base: Any) -> Callable[..., Any]:
    """A TINY config factory: transformers config class `cls` with `base` sizes, overridable."""

    def make(**kw: Any) -> Any:
        import transformers

        return getattr(transformers, cls)(**{**base, **kw})

    return make


_TOKENS = dict(vocab_size=61, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.25)
_DECODER = dict(_TOKENS, hidden_size=20, intermediate_size=29, num_hidden_layers=2, max_position_embeddings=64)
_CLIP_TEXT = dict(
    _TOKENS,
    hidden_size=24,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=3,
    max_position_embeddings=20,
    initializer_factor=4.0,
)
_CLIP_VISION = dict(
    hidden_size=20,
    intermediate_size=29,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=12,
    patch_size=4,
    initializer_range=0.25,
    initializer_factor=4.0,
)

TINY.update(
    {
        "gpt2": Tiny(
            _config("GPT2Config", **_TOKENS, n_embd=24, n_layer=2, n_head=3, n_inner=37, n_positions=32),
            "GPT2LMHeadModel",
        ),
        "deberta-v2": Tiny(
            _config(
                "DebertaV2Config",
                **_TOKENS,
                hidden_size=30,
                num_hidden_layers=2,
                num_attention_heads=3,
                intermediate_size=37,
                max_position_embeddings=32,
                type_vocab_size=0,
                relative_attention=True,
                pos_att_type=["p2c", "c2p"],
                share_att_key=False,
                position_buckets=8,
                max_relative_positions=16,
                num_labels=3,
            ),
            "DebertaV2ForTokenClassification",
        ),
        # head_dim 6 with hidden_size 20: q_proj is [24, 20], not square
        "llama": Tiny(
            _config(
                "LlamaConfig",
                **_DECODER,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=6,
                tie_word_embeddings=False,
            ),
            "LlamaForCausalLM",
        ),
        "mistral": Tiny(
            _config(
                "MistralConfig",
                **_DECODER,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=8,
                sliding_window=5,
                tie_word_embeddings=False,
            ),
            "MistralForCausalLM",
        ),
        "qwen2": Tiny(
            _config(
                "Qwen2Config",
                **{**_DECODER, "hidden_size": 24},
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            ),
            "Qwen2ForCausalLM",
        ),
        "phi": Tiny(
            _config(
                "PhiConfig",
                **{**_DECODER, "hidden_size": 24},
                num_attention_heads=3,
                num_key_value_heads=3,
                partial_rotary_factor=0.5,
                tie_word_embeddings=False,
            ),
            "PhiForCausalLM",
        ),
        "distilbert": Tiny(
            _config(
                "DistilBertConfig",
                **_TOKENS,
                dim=30,
                n_layers=2,
                n_heads=5,
                hidden_dim=37,
                max_position_embeddings=32,
                num_labels=3,
            ),
            "DistilBertForTokenClassification",
        ),
        "clip": Tiny(
            _config(
                "CLIPConfig",
                text_config=_CLIP_TEXT,
                vision_config=_CLIP_VISION,
                projection_dim=16,
                initializer_factor=4.0,
            ),
            "CLIPModel",
        ),
        "clip-vision-classifier": Tiny(
            _config(
                "CLIPConfig", text_config=_CLIP_TEXT, vision_config=_CLIP_VISION, num_labels=3, initializer_factor=4.0
            ),
            "CLIPForImageClassification",
        ),
        "clip-text": Tiny(_config("CLIPTextConfig", **_CLIP_TEXT, projection_dim=16), "CLIPTextModelWithProjection"),
        "clip-vision": Tiny(_config("CLIPVisionConfig", **_CLIP_VISION), "CLIPVisionModel"),
    }
)


# ---- heads that read or write the residual stream
# (tests/archs/test_archs_residual.py, tests/align/test_residual_search.py)
TINY.update(
    {
        "bert-mlm": Tiny(_bert, "BertForMaskedLM"),
        "roberta-mlm": Tiny(_roberta, "RobertaForMaskedLM"),
        "distilbert-mlm": Tiny(TINY["distilbert"].config, "DistilBertForMaskedLM"),
        "deberta-v2-mlm": Tiny(TINY["deberta-v2"].config, "DebertaV2ForMaskedLM"),
        "llama-tied": Tiny(
            _config(
                "LlamaConfig",
                **_DECODER,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=6,
                tie_word_embeddings=True,
            ),
            "LlamaForCausalLM",
        ),
    }
)


# ---- mixtures of experts (tests/archs/test_archs.py, test_archs_moe.py): 4 routed experts, top 2; expert
# widths a multiple of 4 (transformers 5 runs experts through torch._grouped_mm: 16-byte strides)
_MOE = dict(
    _DECODER, num_attention_heads=4, num_key_value_heads=2, head_dim=6, num_experts_per_tok=2, tie_word_embeddings=False
)
TINY.update(
    {
        "mixtral": Tiny(
            _config("MixtralConfig", **{**_MOE, "intermediate_size": 12}, num_local_experts=4), "MixtralForCausalLM"
        ),
        "qwen2-moe": Tiny(
            _config(
                "Qwen2MoeConfig", **_MOE, num_experts=4, moe_intermediate_size=12, shared_expert_intermediate_size=11
            ),
            "Qwen2MoeForCausalLM",
        ),
        "qwen3-moe": Tiny(
            _config("Qwen3MoeConfig", **_MOE, num_experts=4, moe_intermediate_size=12), "Qwen3MoeForCausalLM"
        ),
    }
)


def build(name: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    import transformers

    entry = TINY[name]
    torch.manual_seed(seed)
    return getattr(transformers, entry.model)(entry.config(**overrides)).eval()


def save_tiny(
    name: str,
    folder: Path,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Build a tiny model and save it as a checkpoint folder (optionally cast and sharded)."""
    model = build(name, seed, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    return Path(folder)


# ---- encoder-decoders (tests/archs/test_archs_encoder_decoder.py): T5 v1.1 gated (d_kv 6 != d_model / heads,
# more decoder layers than encoder ones), T5 v1.0 (relu, tied head scaled by d_model^-0.5), BART (post-LN),
# mBART (pre-LN)
_T5 = dict(
    vocab_size=61,
    d_model=20,
    d_kv=6,
    d_ff=29,
    num_layers=2,
    num_heads=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    decoder_start_token_id=0,
)  # default init: T5 does not scale q.k
_BART = dict(
    _TOKENS,
    d_model=24,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=3,
    decoder_attention_heads=4,
    encoder_ffn_dim=29,
    decoder_ffn_dim=31,
    max_position_embeddings=32,
    init_std=0.25,
)
TINY.update(
    {
        "t5-gated": Tiny(
            _config("T5Config", **_T5, num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
            "T5ForConditionalGeneration",
        ),
        "t5-v1.0": Tiny(_config("T5Config", **_T5, feed_forward_proj="relu"), "T5ForConditionalGeneration"),
        "mt5": Tiny(
            _config("MT5Config", **_T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
            "MT5ForConditionalGeneration",
        ),
        "t5-encoder": Tiny(_config("T5Config", **_T5, feed_forward_proj="gated-gelu"), "T5EncoderModel"),
        "bart": Tiny(_config("BartConfig", **_BART), "BartForConditionalGeneration"),
        "mbart": Tiny(_config("MBartConfig", **_BART), "MBartForConditionalGeneration"),
    }
)

# ---- decoder LLM families (issue 17; tests/archs/test_archs_llm_families.py)
TINY.update(
    {
        # head_dim 6 with hidden_size 20: per-head q_norm / k_norm of size 6
        "qwen3": Tiny(
            _config(
                "Qwen3Config",
                **_DECODER,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=6,
                tie_word_embeddings=False,
            ),
            "Qwen3ForCausalLM",
        ),
        # fused qkv_proj (GQA) and gate_up_proj; partial rotary 0.75 of head_dim 8
        "phi3": Tiny(
            _config(
                "Phi3Config",
                **{**_DECODER, "hidden_size": 24},
                num_attention_heads=3,
                num_key_value_heads=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
                tie_word_embeddings=False,
            ),
            "Phi3ForCausalLM",
        ),
        # per-head fused query_key_value, partial rotary 0.5 of head_dim 8
        "gpt-neox": Tiny(
            _config(
                "GPTNeoXConfig",
                **{**_DECODER, "hidden_size": 24},
                num_attention_heads=3,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                tie_word_embeddings=False,
            ),
            "GPTNeoXForCausalLM",
        ),
        # head_dim 6 independent of hidden_size 20 / 4 heads; tied head (Gemma's default)
        "gemma": Tiny(
            _config("GemmaConfig", **_DECODER, num_attention_heads=4, num_key_value_heads=2, head_dim=6),
            "GemmaForCausalLM",
        ),
    }
)

# ---- post-sublayer norms (issue 17): OLMo 2 (full-width q_norm / k_norm), Gemma 2 and Gemma 3 (per-head QK-norm)
TINY.update(
    {
        # head_dim 6 (hidden 24 / 4 heads); q_norm of width 24, k_norm of width 12
        "olmo2": Tiny(
            _config(
                "Olmo2Config",
                **{**_DECODER, "hidden_size": 24},
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=False,
            ),
            "Olmo2ForCausalLM",
        ),
        # head_dim 6; a sliding window (4) shorter than the test sequences, one sliding and one full layer;
        # Gemma 2's default soft-capping (attention 50, logits 30)
        "gemma2": Tiny(
            _config(
                "Gemma2Config",
                **_DECODER,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=6,
                sliding_window=4,
                layer_types=["sliding_attention", "full_attention"],
            ),
            "Gemma2ForCausalLM",
        ),
        "gemma3": Tiny(
            _config(
                "Gemma3TextConfig",
                **_DECODER,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=6,
                sliding_window=4,
                layer_types=["sliding_attention", "full_attention"],
            ),
            "Gemma3ForCausalLM",
        ),
    }
)

# ---- multimodal Gemma 3 (issue 17; tests/archs/test_archs_gemma3_multimodal.py): Gemma 3's text layer and a
# SigLIP vision tower of another width (24 vs 20); a 4x4 patch grid pooled to 4 image tokens; image token ids
# inside the vocabulary, so the embedding of the image block is read too
_GEMMA3_TEXT = dict(
    _DECODER,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=6,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"],
)
_SIGLIP = dict(
    hidden_size=24,
    intermediate_size=29,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=16,
    patch_size=4,
    vision_use_head=False,
)


def _gemma3_mm(**kw: Any) -> Any:
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    base = dict(
        mm_tokens_per_image=4,
        boi_token_index=57,
        eoi_token_index=58,
        image_token_index=59,
        initializer_range=0.25,
    )
    text = Gemma3TextConfig(**{**_GEMMA3_TEXT, **kw.pop("text_config", {})})
    vision = SiglipVisionConfig(**{**_SIGLIP, **kw.pop("vision_config", {})})
    return Gemma3Config(text_config=text, vision_config=vision, **{**base, **kw})


TINY["gemma3-mm"] = Tiny(_gemma3_mm, "Gemma3ForConditionalGeneration")

# ---- BART's sequence classifier (tests/archs/test_archs_bart_classifier.py): pools the decoder's last states at
# the eos tokens of input_ids, then classification_head.dense -> tanh -> out_proj
TINY["bart-cls"] = Tiny(_config("BartConfig", **_BART, num_labels=3), "BartForSequenceClassification")
