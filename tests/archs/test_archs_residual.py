"""Moving a whole checkpoint's residual stream (rotfuse.archs.residual) keeps its function.

For every architecture and the head classes that read the stream differently: build a tiny model
with every constant tensor (norm gains and biases, zero biases) randomised so that a missed
tensor shows, save it, move the stream of every stack by a random map through the plans (a
permutation for LayerNorm models, an orthogonal matrix for RMSNorm models, both paths for tied
embeddings), save that with safetensors, load it with transformers and compare every output:
logits must not change, outputs that are themselves stream vectors (a bare model's hidden
states) must come back moved by the same map. Then the necessity: an orthogonal map on a
LayerNorm model, an orthogonal map without folding the RMSNorm gains, and leaving out any single
tensor of a plan each change the outputs. Last, the refusals.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers.functions import one_thread
from helpers.tiny_models import TINY
from safetensors.torch import save_file

from rotfuse.archs.bind import bind, select_spec
from rotfuse.archs.residual import ResidualPlan, StreamTensor, residual_plans
from rotfuse.archs.spec import builtin_specs, load_spec_file
from rotfuse.core.errors import InputError
from rotfuse.eval.runtime import example_inputs, forward, load_model
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.symmetry.residual import StreamMap, random_stream_map

REL = 2e-5  # allowed output change, relative to each output's scale
CHANGED = 1e-3  # a broken map must change some output by more than this


@dataclass(frozen=True)
class Case:
    tiny: str
    cls: str | None = None  # a transformers class other than TINY's (same config)
    overrides: dict[str, Any] = field(default_factory=dict)
    orthogonal: bool = False  # the plan must allow any orthogonal map (and the test uses one)
    allow_untie: bool = False
    moved: dict[str, str] = field(default_factory=dict)  # output key -> stack whose stream it is in
    encoder_states: bool = False  # cross-attention: pass encoder_hidden_states
    choices: bool = False  # *ForMultipleChoice: the batch becomes the choices of one example
    head_apart: bool = False  # store lm_head apart from the embedding, config untied (T5 v1.1 as 4.x saved it)
    config_edits: dict[str, Any] = field(default_factory=dict)  # written into config.json (None: key removed)
    keys: tuple[str, ...] = ()  # the outputs compared (default: all); a folded final norm changes its outputs


CASES: dict[str, Case] = {
    # LayerNorm models: permutations
    "bert-seq-cls": Case("bert"),  # classifier reads the pooler output
    "bert-bare": Case("bert-bare", moved={"last_hidden_state": ""}),  # pooler_output does not move
    "bert-mlm": Case("bert-mlm"),
    "bert-token-cls": Case("bert", "BertForTokenClassification"),
    "bert-qa": Case("bert", "BertForQuestionAnswering", {"num_labels": 2}),
    "bert-pretraining": Case("bert", "BertForPreTraining"),
    "bert-decoder-cross-attention": Case(
        "bert", "BertLMHeadModel", {"is_decoder": True, "add_cross_attention": True}, encoder_states=True
    ),
    "roberta-seq-cls": Case("roberta"),  # RobertaClassificationHead reads hidden[:, 0]
    "roberta-mlm": Case("roberta-mlm"),
    "roberta-multiple-choice": Case("roberta", "RobertaForMultipleChoice", choices=True),
    "vit": Case("vit", orthogonal=True),  # pre-LN: LayerNorm gains fold, maps keep the ones
    "vit-bare": Case("vit-bare", moved={"last_hidden_state": ""}),
    "vit-masked-image": Case("vit", "ViTForMaskedImageModeling", {"encoder_stride": 4}, orthogonal=True),
    "gpt2-lm-tied": Case("gpt2"),
    "gpt2-lm-untie": Case("gpt2", orthogonal=True, allow_untie=True),
    "gpt2-seq-cls": Case("gpt2", "GPT2ForSequenceClassification", orthogonal=True),  # score has no bias
    "gpt2-bare": Case("gpt2", "GPT2Model", moved={"last_hidden_state": ""}),
    "gpt2-double-heads": Case("gpt2", "GPT2DoubleHeadsModel"),
    "gpt2-cross-attention": Case("gpt2", overrides={"add_cross_attention": True}, encoder_states=True),
    "gpt2-cross-attention-untie": Case(
        "gpt2", overrides={"add_cross_attention": True}, encoder_states=True, orthogonal=True, allow_untie=True
    ),
    "deberta-v2-token-cls": Case("deberta-v2"),
    "deberta-v2-seq-cls": Case("deberta-v2", "DebertaV2ForSequenceClassification", {"type_vocab_size": 2}),
    "deberta-v2-mlm": Case("deberta-v2-mlm"),
    # rel_embeddings read by query_proj/key_proj, their LayerNorm, the ConvLayer, the new MLM head
    "deberta-v2-mlm-shared-conv": Case(
        "deberta-v2-mlm",
        overrides={"legacy": False, "share_att_key": True, "conv_kernel_size": 3, "norm_rel_ebd": "layer_norm"},
    ),
    "phi": Case("phi", orthogonal=True),
    "phi-seq-cls": Case("phi", "PhiForSequenceClassification", orthogonal=True),
    "phi-tied-permutation": Case("phi", overrides={"tie_word_embeddings": True}),
    "phi-tied-untie": Case("phi", overrides={"tie_word_embeddings": True}, orthogonal=True, allow_untie=True),
    "distilbert-token-cls": Case("distilbert"),
    "distilbert-mlm": Case("distilbert-mlm"),
    "distilbert-seq-cls": Case("distilbert", "DistilBertForSequenceClassification"),
    "distilbert-sinusoidal": Case(
        "distilbert", "DistilBertForQuestionAnswering", {"sinusoidal_pos_embds": True, "num_labels": 2}
    ),
    # (transformers 5 puts the projected embeddings, which do not move, in the towers' pooler_output)
    "clip": Case(
        "clip", moved={"text_model_output.last_hidden_state": "text", "vision_model_output.last_hidden_state": "vision"}
    ),
    "clip-vision-classifier": Case("clip-vision-classifier"),
    "clip-text": Case("clip-text", moved={"last_hidden_state": ""}),  # text_embeds do not move
    "clip-vision": Case("clip-vision", moved={"last_hidden_state": "", "pooler_output": ""}),
    "clip-vision-projection": Case(
        "clip-vision", "CLIPVisionModelWithProjection", {"projection_dim": 16}, moved={"last_hidden_state": ""}
    ),
    # RMSNorm models: orthogonal maps after folding the gains
    "llama-untied": Case("llama", orthogonal=True),
    "llama-biases": Case("llama", overrides={"attention_bias": True, "mlp_bias": True}, orthogonal=True),
    "llama-seq-cls": Case("llama", "LlamaForSequenceClassification", orthogonal=True),
    "llama-token-cls": Case("llama", "LlamaForTokenClassification", orthogonal=True),
    "llama-qa": Case("llama", "LlamaForQuestionAnswering", {"num_labels": 2}, orthogonal=True),  # "transformer." prefix
    "llama-tied-permutation": Case("llama-tied"),
    "llama-tied-untie": Case("llama-tied", orthogonal=True, allow_untie=True),
    "llama-bare-permutation": Case("llama", "LlamaModel", moved={"last_hidden_state": ""}),
    "mistral-untied": Case("mistral", orthogonal=True),
    "qwen2-tied-permutation": Case("qwen2"),
    "qwen2-tied-untie": Case("qwen2", orthogonal=True, allow_untie=True),
    "qwen2-untied": Case("qwen2", overrides={"tie_word_embeddings": False}, orthogonal=True),
    "qwen2-qa": Case("qwen2", "Qwen2ForQuestionAnswering", {"num_labels": 2}, orthogonal=True),
    # decoder LLM families (issue 17)
    "qwen3-untied": Case("qwen3", overrides={"attention_bias": True}, orthogonal=True),
    "qwen3-seq-cls": Case("qwen3", "Qwen3ForSequenceClassification", orthogonal=True),
    "qwen3-tied-permutation": Case("qwen3", overrides={"tie_word_embeddings": True}),
    "phi3-untied": Case("phi3", orthogonal=True),
    "phi3-seq-cls": Case("phi3", "Phi3ForSequenceClassification", orthogonal=True),
    "phi3-tied-untie": Case("phi3", overrides={"tie_word_embeddings": True}, orthogonal=True, allow_untie=True),
    "gpt-neox": Case("gpt-neox", orthogonal=True),
    "gpt-neox-token-cls": Case("gpt-neox", "GPTNeoXForTokenClassification", orthogonal=True),
    "gpt-neox-tied-permutation": Case("gpt-neox", overrides={"tie_word_embeddings": True}),
    "gpt-neox-tied-untie": Case("gpt-neox", overrides={"tie_word_embeddings": True}, orthogonal=True, allow_untie=True),
    "gpt-neox-bare": Case("gpt-neox", "GPTNeoXModel", moved={"last_hidden_state": ""}),
    # (1 + w) gains fold as 1 + w (gain_offset): orthogonal maps, as for LLaMA
    "gemma-tied-permutation": Case("gemma"),
    "gemma-tied-untie": Case("gemma", orthogonal=True, allow_untie=True),
    "gemma-untied-biases": Case(
        "gemma", overrides={"tie_word_embeddings": False, "attention_bias": True}, orthogonal=True
    ),
    "gemma-seq-cls": Case("gemma", "GemmaForSequenceClassification", orthogonal=True),
    # encoder-decoders: the embedding shared by encoder and decoder couples their streams into one
    # plan "encoder+decoder"; cross-attention K/V read the encoder's output (its final norm folds
    # into them). transformers 5 ties T5's lm_head to it unless stored apart with other values.
    "t5-v1.1-untied": Case(
        "t5-gated",
        head_apart=True,
        config_edits={"tie_word_embeddings": False, "scale_decoder_outputs": None},
        orthogonal=True,
        keys=("logits",),
    ),
    "t5-v1.1-tied-permutation": Case("t5-gated", moved={"encoder_last_hidden_state": "encoder+decoder"}),
    "t5-v1.1-tied-untie": Case("t5-gated", orthogonal=True, allow_untie=True, keys=("logits",)),
    "t5-v1.0-tied-permutation": Case("t5-v1.0", moved={"encoder_last_hidden_state": "encoder+decoder"}),
    "t5-v1.0-untie": Case("t5-v1.0", orthogonal=True, allow_untie=True, keys=("logits",)),
    # a config.json as transformers 4 wrote it: no scale_decoder_outputs, derived from the tie flag
    "t5-v1.0-untie-4.x-config": Case(
        "t5-v1.0", orthogonal=True, allow_untie=True, keys=("logits",), config_edits={"scale_decoder_outputs": None}
    ),
    "t5-encoder": Case("t5-encoder", moved={"last_hidden_state": "encoder"}),
    # post-LN BART, and mBART whose layernorm_embedding normalises the stream: permutations only
    "bart": Case("bart", moved={"encoder_last_hidden_state": "encoder+decoder"}),
    "mbart": Case("mbart", moved={"encoder_last_hidden_state": "encoder+decoder"}),
    "bart-qa": Case(
        "bart", "BartForQuestionAnswering", {"num_labels": 2}, moved={"encoder_last_hidden_state": "encoder+decoder"}
    ),
    # mixtures of experts: the router and every expert read the folded post-attention norm
    "mixtral-untied": Case("mixtral", orthogonal=True),
    "qwen2-moe-untied": Case("qwen2-moe", orthogonal=True),  # + shared expert and its gate
    "qwen3-moe-untied": Case("qwen3-moe", orthogonal=True),
    # post-sublayer norms write the stream: permutations only
    "olmo2-permutation": Case("olmo2", overrides={"attention_bias": True}),
    "gemma2-tied-permutation": Case("gemma2"),
    "gemma2-untied-biases-permutation": Case(
        "gemma2", overrides={"tie_word_embeddings": False, "attention_bias": True}
    ),
    "gemma2-token-cls-permutation": Case("gemma2", "Gemma2ForTokenClassification"),
    "gemma3-untied-permutation": Case("gemma3", overrides={"tie_word_embeddings": False}),
    "gemma3-seq-cls-permutation": Case("gemma3", "Gemma3TextForSequenceClassification"),
    # two streams joined by the projector (reads vision on axis 0, writes text on axis 1); its output is
    # the text stream (tests/archs/test_archs_gemma3_mm_residual.py, with trained-like projector and gains)
    "gemma3-mm-permutation": Case(
        "gemma3-mm", moved={"image_outputs.last_hidden_state": "vision", "image_outputs.pooler_output": "text"}
    ),
    "olmo2-seq-cls-permutation": Case("olmo2", "Olmo2ForSequenceClassification"),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


# ---------------------------------------------------------------------- helpers


def save_case(case: Case, folder: Path, seed: int = 0) -> Path:
    """Build the case's tiny model with every constant tensor randomised (norm gains are 1 and
    biases 0 at init, where moving them or not makes no difference) and save it."""
    import transformers

    entry = TINY[case.tiny]
    torch.manual_seed(seed)
    model = getattr(transformers, case.cls or entry.model)(entry.config(**case.overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and bool((param == param.flatten()[0]).all()):
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(str(folder))
    if case.head_apart:
        _store_apart(folder, "lm_head.weight", 0.3 * torch.randn(model.get_input_embeddings().weight.shape))
    if case.config_edits:
        config = json.loads((folder / "config.json").read_text())
        for key, value in case.config_edits.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _store_apart(folder: Path, name: str, value: torch.Tensor) -> None:
    """Add a tensor to a saved single-file checkpoint (a head stored apart from the embedding)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    save_file({**tensors, name: value.contiguous()}, str(folder / "model.safetensors"), metadata={"format": "pt"})


def plans_for(folder: Path, allow_untie: bool = False) -> dict[str, ResidualPlan]:
    checkpoint = Checkpoint.open(folder)
    bound = bind(select_spec(checkpoint.config), checkpoint.config, checkpoint, str(folder))
    return residual_plans(bound, checkpoint, allow_untie=allow_untie)


def random_maps(plans: dict[str, ResidualPlan], orthogonal: bool, seed: int = 0) -> dict[str, StreamMap]:
    generator = torch.Generator().manual_seed(seed)
    return {
        stack: random_stream_map(plan.hidden_size, orthogonal, generator, plan.keeps_ones)
        for stack, plan in plans.items()
    }


def write_moved(src: Path, dst: Path, plans: dict[str, ResidualPlan], maps: dict[str, StreamMap]) -> Path:
    """What a caller does with the plans: every tensor through its plans' transforms (gains read
    from the source), the added tensors of an untied head, the config updates."""
    checkpoint = Checkpoint.open(src)
    tensors = {name: checkpoint.get(name) for name in checkpoint.names()}
    out = {}
    for name, tensor in tensors.items():
        for plan in plans.values():  # a tensor on several streams (a projector) moves with each, on its axes
            tensor = plan.transform(name, tensor, maps[plan.stack], tensors.__getitem__)
        out[name] = tensor
    config = json.loads((src / "config.json").read_text())
    for plan in plans.values():
        for name, source in plan.added.items():
            out[name] = plan.transform(name, tensors[source], maps[plan.stack], tensors.__getitem__)
        config.update(plan.config_updates)
    dst.mkdir(parents=True)
    tensors_out = {name: t.contiguous() for name, t in out.items()}
    save_file(tensors_out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    for extra in src.iterdir():  # generation_config.json and the like
        if extra.name not in ("config.json", "model.safetensors"):
            shutil.copy(extra, dst / extra.name)
    return dst


def flat_outputs(outputs: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every floating tensor of a model's output, by (dotted, for nested outputs) key."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in outputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            flat[prefix + key] = value
        elif hasattr(value, "items"):
            flat.update(flat_outputs(value, f"{prefix}{key}."))
    return flat


def run(folder: Path, case: Case) -> dict[str, torch.Tensor]:
    config = json.loads((folder / "config.json").read_text())
    inputs = example_inputs(config, batch=2, seq_len=12, seed=0)
    generator = torch.Generator().manual_seed(1)
    if "input_ids" in inputs and (config.get("type_vocab_size") or 0) > 1:
        inputs["token_type_ids"] = torch.randint(
            0, config["type_vocab_size"], inputs["input_ids"].shape, generator=generator
        )
    if case.encoder_states:
        width = config.get("hidden_size") or config["n_embd"]
        inputs["encoder_hidden_states"] = torch.randn(2, 5, width, generator=generator)
    if case.choices:
        inputs = {key: value.unsqueeze(0) for key, value in inputs.items()}
    return flat_outputs(forward(load_model(folder), inputs))


def output_change(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], case: Case, maps: dict[str, StreamMap]
) -> float:
    """Largest difference between the outputs after and the outputs before (moved by the map where
    they are stream vectors), relative to each output's scale."""
    assert before.keys() == after.keys() and before
    worst = 0.0
    for key, old in before.items():
        if case.keys and key not in case.keys:
            continue
        expected = maps[case.moved[key]].apply(old, (-1,)) if key in case.moved else old
        worst = max(worst, (after[key] - expected).abs().max().item() / max(expected.abs().max().item(), 1.0))
    return worst


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (its checkpoint folder, its outputs), built once per module."""
    root = tmp_path_factory.mktemp("residual")
    cache: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}

    def get(name: str) -> tuple[Path, dict[str, torch.Tensor]]:
        if name not in cache:
            folder = save_case(CASES[name], root / name)
            cache[name] = (folder, run(folder, CASES[name]))
        return cache[name]

    return get


# ---------------------------------------------------------------------- function preservation


def test_every_builtin_spec_has_a_case():
    covered = {select_spec(TINY[case.tiny].config().to_dict()).name for case in CASES.values()}
    assert covered == set(builtin_specs())


@pytest.mark.parametrize("name", CASES)
def test_moving_the_stream_keeps_the_function(saved, tmp_path, name):
    case = CASES[name]
    folder, before = saved(name)
    plans = plans_for(folder, case.allow_untie)
    assert all(plan.orthogonal == case.orthogonal for plan in plans.values()), [p.notes for p in plans.values()]
    maps = random_maps(plans, orthogonal=case.orthogonal)
    assert all(m.is_permutation != case.orthogonal for m in maps.values())
    moved = write_moved(folder, tmp_path / "moved", plans, maps)
    change = output_change(before, run(moved, case), case, maps)
    assert change <= REL, f"outputs changed by {change:.3g}"


def test_tied_embeddings_need_allow_untie(saved):
    folder, _ = saved("qwen2-tied-permutation")
    kept = plans_for(folder)[""]
    assert not kept.orthogonal and not kept.untie and not kept.folds and not kept.added
    assert kept.tensors["model.norm.weight"].role == "norm"  # permuted like any gain
    with pytest.raises(ValueError, match="only a permutation"):
        kept.transform(
            "model.embed_tokens.weight",
            torch.zeros(61, 24),
            random_stream_map(24, True, torch.Generator().manual_seed(0)),
            lambda name: torch.ones(24),
        )
    untied = plans_for(folder, allow_untie=True)[""]
    assert untied.orthogonal and untied.untie
    assert untied.added == {"lm_head.weight": "model.embed_tokens.weight"}
    assert untied.config_updates == {"tie_word_embeddings": False}
    assert untied.tensors["lm_head.weight"].axes == (1,)
    assert [f.readers for f in untied.folds if f.gain == "model.norm.weight"] == [("lm_head.weight",)]


def test_a_stored_tied_head_is_folded_in_place(saved, tmp_path):
    """Older checkpoints store the tied lm_head next to the embedding: it is folded where it is."""
    case = CASES["llama-tied-untie"]
    folder, before = saved("llama-tied-untie")
    embedding = Checkpoint.open(folder).get("model.embed_tokens.weight")
    stored = _with_extra_tensor(folder, tmp_path / "stored", "lm_head.weight", embedding.clone())
    plan = plans_for(stored, allow_untie=True)[""]
    assert plan.untie and plan.orthogonal and not plan.added
    assert plan.config_updates == {"tie_word_embeddings": False}
    maps = random_maps({"": plan}, orthogonal=True)
    moved = write_moved(stored, tmp_path / "moved", {"": plan}, maps)
    assert output_change(before, run(moved, case), case, maps) <= REL


def test_rmsnorm_plan_folds_every_gain(saved):
    folder, _ = saved("llama-untied")
    plan = plans_for(folder)[""]
    folds = {fold.gain: fold.readers for fold in plan.folds}
    assert folds["model.layers.1.input_layernorm.weight"] == tuple(
        f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"
    )
    assert folds["model.layers.0.post_attention_layernorm.weight"] == (
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    )
    assert folds["model.norm.weight"] == ("lm_head.weight",)
    assert len(folds) == 2 * 2 + 1 and not plan.untie and not plan.added
    gain = Checkpoint.open(folder).get("model.norm.weight")
    assert plan.transform("model.norm.weight", gain, StreamMap.identity(20), lambda n: gain).eq(1).all()


def test_plans_cover_each_tower_separately(saved):
    folder, _ = saved("clip")
    plans = plans_for(folder)
    assert set(plans) == {"text", "vision"}
    assert plans["text"].tensors["text_projection.weight"].axes == (1,)
    assert plans["vision"].tensors["vision_model.embeddings.patch_embedding.weight"].axes == (0,)
    assert "logit_scale" not in plans["text"].tensors and "logit_scale" not in plans["vision"].tensors
    assert {t.stack for t in plans["vision"].tensors.values()} == {"vision"}


def test_conv1d_layouts(saved):
    folder, _ = saved("gpt2-cross-attention")
    tensors = plans_for(folder)[""].tensors
    assert tensors["transformer.h.0.attn.c_attn.weight"].axes == (0,)  # [d, 3d]: reads on its input axis
    assert tensors["transformer.h.0.mlp.c_proj.weight"].axes == (1,)  # [dff, d]: writes on its output axis
    assert tensors["transformer.h.0.crossattention.q_attn.weight"].axes == (0,)
    assert "transformer.h.0.crossattention.c_attn.weight" not in tensors  # reads the encoder's states
    assert "transformer.h.0.attn.c_attn.bias" not in tensors and tensors["transformer.h.0.attn.c_proj.bias"].layer == 0


# ---------------------------------------------------------------------- necessity


@pytest.mark.parametrize("name", ["bert-mlm", "bart", "mbart"])
def test_an_orthogonal_map_breaks_a_layernorm_model(saved, tmp_path, name):
    """Post-LN (BERT, BART) and mBART's layernorm_embedding normalise the stream itself."""
    case = CASES[name]
    folder, before = saved(name)
    plans = {stack: dataclasses.replace(plan, orthogonal=True) for stack, plan in plans_for(folder).items()}
    maps = random_maps(plans, orthogonal=True)
    assert output_change(before, run(write_moved(folder, tmp_path / "moved", plans, maps), case), case, maps) > CHANGED


@pytest.mark.parametrize("name", ["llama-untied", "vit", "gpt2-seq-cls", "mixtral-untied"])
def test_an_orthogonal_map_needs_the_folds(saved, tmp_path, name):
    case = CASES[name]
    folder, before = saved(name)
    plans = {stack: dataclasses.replace(plan, folds=[]) for stack, plan in plans_for(folder).items()}
    maps = random_maps(plans, orthogonal=True)
    assert output_change(before, run(write_moved(folder, tmp_path / "moved", plans, maps), case), case, maps) > CHANGED


@pytest.mark.parametrize("name", ["vit", "gpt2-seq-cls"])
def test_a_layernorm_model_needs_maps_that_keep_the_ones(saved, tmp_path, name):
    """Folded LayerNorm still centers the stream: an orthogonal map that moves the all-ones
    direction changes the outputs, and the plan refuses it."""
    case = CASES[name]
    folder, before = saved(name)
    plans = plans_for(folder)
    generator = torch.Generator().manual_seed(0)
    maps = {stack: random_stream_map(plan.hidden_size, True, generator) for stack, plan in plans.items()}
    assert not any(m.keeps_ones for m in maps.values())
    stack, plan = next(iter(plans.items()))
    with pytest.raises(ValueError, match="keep the all-ones direction"):
        plan.transform(next(iter(plan.tensors)), torch.zeros(1), maps[stack], lambda name: torch.ones(1))
    unchecked = {stack: dataclasses.replace(plan, norm="rmsnorm") for stack, plan in plans.items()}  # no check
    moved = write_moved(folder, tmp_path / "moved", unchecked, maps)
    assert output_change(before, run(moved, case), case, maps) > CHANGED


def test_a_pre_ln_plan_folds_every_layernorm(saved):
    folder, _ = saved("gpt2-cross-attention-untie")
    plan = plans_for(folder, allow_untie=True)[""]
    assert plan.orthogonal and plan.keeps_ones and plan.untie
    folds = {fold.gain: (fold.readers, fold.bias) for fold in plan.folds}
    assert folds["transformer.h.1.ln_1.weight"] == (
        ("transformer.h.1.attn.c_attn.weight",),
        "transformer.h.1.ln_1.bias",
    )
    assert folds["transformer.h.0.ln_cross_attn.weight"][0] == ("transformer.h.0.crossattention.q_attn.weight",)
    assert folds["transformer.ln_f.weight"] == (("lm_head.weight",), "transformer.ln_f.bias")
    assert len(folds) == 2 * 3 + 1
    checkpoint = Checkpoint.open(folder)
    gain, bias = checkpoint.get("transformer.ln_f.weight"), checkpoint.get("transformer.ln_f.bias")
    identity = StreamMap.identity(gain.numel())
    assert plan.transform("transformer.ln_f.weight", gain, identity, checkpoint.get).eq(1).all()
    assert torch.allclose(plan.transform("transformer.ln_f.bias", bias, identity, checkpoint.get), bias / gain)
    # unfolded into the same gains, every tensor comes back as it was
    for name in ("transformer.ln_f.weight", "transformer.ln_f.bias", "transformer.h.0.attn.c_attn.weight"):
        folded = plan.transform(name, checkpoint.get(name), identity, checkpoint.get)
        back = plan.unfold(name, folded, into=checkpoint.get)
        assert torch.allclose(back, checkpoint.get(name), atol=1e-6), name


def test_post_ln_and_headless_models_get_permutations_only(saved):
    bert = plans_for(saved("bert-mlm")[0])[""]
    assert not bert.orthogonal and "no norm" in bert.notes[0]
    bare = plans_for(saved("gpt2-bare")[0])[""]
    assert not bare.orthogonal and "'ln_f.weight' feeds no weight" in bare.notes[0]
    pooled = plans_for(saved("vit-bare")[0])[""]  # the pooler reads the final norm, but so does the output
    assert not pooled.orthogonal and "no head" in pooled.notes[0]
    vision = plans_for(saved("clip")[0])["vision"]
    assert not vision.orthogonal


# every stream tensor outside the layers and in the last layer: leaving any one of them in the
# old basis changes the outputs
NECESSITY = [
    "bert-mlm",
    pytest.param("bert-decoder-cross-attention", marks=pytest.mark.slow),
    "roberta-seq-cls",
    "vit",
    "gpt2-cross-attention",
    pytest.param("deberta-v2-mlm-shared-conv", marks=pytest.mark.slow),
    "phi",
    "distilbert-mlm",
    pytest.param("clip", marks=pytest.mark.slow),
    "llama-tied-untie",
    "llama-biases",
    "t5-v1.1-untied",
    pytest.param("mbart", marks=pytest.mark.slow),
    "mixtral-untied",
    pytest.param("qwen2-moe-untied", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name", NECESSITY)
def test_leaving_out_any_tensor_changes_the_function(saved, tmp_path, name):
    case = CASES[name]
    folder, before = saved(name)
    plans = plans_for(folder, case.allow_untie)
    maps = random_maps(plans, orthogonal=case.orthogonal)
    checked = 0
    for stack, plan in plans.items():
        last = max(t.layer for t in plan.tensors.values() if t.layer is not None)
        for left_out, tensor in plan.tensors.items():
            if tensor.layer not in (None, last) or left_out in plan.added:
                continue
            partial = dict(plans)
            partial[stack] = dataclasses.replace(plan, tensors={n: t for n, t in plan.tensors.items() if n != left_out})
            moved = write_moved(folder, tmp_path / f"{checked}", partial, maps)
            change = output_change(before, run(moved, case), case, maps)
            assert change > CHANGED, f"leaving {left_out!r} out changed the outputs by only {change:.3g}"
            checked += 1
    assert checked >= 3


# ---------------------------------------------------------------------- encoder-decoders: coupled streams


def test_t5_plans_couple_encoder_and_decoder(saved):
    """One plan for both streams (shared.weight sits on each); the encoder's final norm folds into
    the cross-attention K/V of every decoder layer, the cross-attention norm into Q only."""
    plans = plans_for(saved("t5-v1.1-untied")[0])
    assert set(plans) == {"encoder+decoder"}
    plan = plans["encoder+decoder"]
    assert plan.streams == ("encoder", "decoder") and plan.orthogonal and not plan.untie
    folds = {fold.gain: fold.readers for fold in plan.folds}
    cross = "decoder.block.{}.layer.1.EncDecAttention.{}.weight"
    assert folds["encoder.final_layer_norm.weight"] == tuple(cross.format(i, p) for p in "kv" for i in range(3))
    assert folds["decoder.block.1.layer.1.layer_norm.weight"] == (cross.format(1, "q"),)
    assert folds["decoder.final_layer_norm.weight"] == ("lm_head.weight",)
    assert "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" not in plan.tensors
    assert set(plans_for(saved("t5-encoder")[0])) == {"encoder"}


def _t5_variant(tmp_path: Path, edit: Any) -> Path:
    """The built-in T5 spec with `edit(stacks)` applied to its parsed stacks."""
    raw = yaml.safe_load(Path(builtin_specs()["t5"].source).read_text())
    edit({stack["name"]: stack for stack in raw["stacks"]})
    spec = tmp_path / "t5-variant.yaml"
    spec.write_text(yaml.safe_dump(raw))
    return spec


def _plans_with(folder: Path, spec: Path, allow_untie: bool = False) -> dict[str, ResidualPlan]:
    checkpoint = Checkpoint.open(folder)
    return residual_plans(
        bind(load_spec_file(spec), checkpoint.config, checkpoint, str(folder)), checkpoint, allow_untie
    )


def _decoupled(stacks: dict[str, Any]) -> None:
    """shared.weight on no stream: the encoder's and the decoder's streams get a plan each."""
    for name in ("encoder", "decoder"):
        model = stacks[name]["residual"]["model"]
        model[0]["table"] = [t for t in model[0]["table"] if t != "shared.weight"]
    stacks["encoder"]["residual"]["model"].append({"free": "shared.weight"})


def test_the_shared_embedding_couples_the_streams(saved, tmp_path):
    """Moving the encoder's and the decoder's streams by different maps (a spec that leaves the
    shared embedding out of the coupling) changes the function."""
    case = CASES["t5-v1.1-untied"]
    folder, before = saved("t5-v1.1-untied")
    plans = _plans_with(folder, _t5_variant(tmp_path, _decoupled))
    assert set(plans) == {"encoder", "decoder"}
    plans = {
        k: dataclasses.replace(p, tensors={**p.tensors, "shared.weight": StreamTensor("shared.weight", (1,), k, None)})
        for k, p in plans.items()
    }  # moved by each map in turn: the last wins
    maps = random_maps(plans, orthogonal=True)
    change = output_change(before, run(write_moved(folder, tmp_path / "moved", plans, maps), case), case, maps)
    assert change > CHANGED


def test_separate_embeddings_give_two_streams(saved, tmp_path):
    """Encoder and decoder embeddings stored apart (transformers 5 keeps them apart when their
    values differ) and a spec that declares the unused shared.weight free: two plans, two
    independent maps, the function kept -- and cross-attention K/V must move with the ENCODER's
    map (`role_streams`): on the decoder's, the function changes."""
    case = CASES["t5-v1.1-untied"]
    folder, _ = saved("t5-v1.1-untied")
    split = tmp_path / "split"
    shutil.copytree(folder, split)
    embedding = Checkpoint.open(folder).get("shared.weight")
    _store_apart(split, "encoder.embed_tokens.weight", embedding + 0.3 * torch.randn_like(embedding))
    _store_apart(split, "decoder.embed_tokens.weight", embedding - 0.3 * torch.randn_like(embedding))
    before = run(split, case)
    plans = _plans_with(split, _t5_variant(tmp_path, _decoupled))
    assert set(plans) == {"encoder", "decoder"} and all(p.orthogonal for p in plans.values())
    assert plans["encoder"].tensors["decoder.block.2.layer.1.EncDecAttention.v.weight"].role == "reads"
    maps = random_maps(plans, orthogonal=True)
    moved = write_moved(split, tmp_path / "moved", plans, maps)
    assert output_change(before, run(moved, case), case, maps) <= REL

    def on_the_decoders(stacks: dict[str, Any]) -> None:
        _decoupled(stacks)
        del stacks["cross"]["residual"]["role_streams"]
        final = stacks["encoder"]["residual"]["model"][1]  # its readers are now on the decoder's stream
        stacks["decoder"]["residual"]["model"].append(stacks["encoder"]["residual"]["model"].pop(1))
        assert final["norm"] == "encoder.final_layer_norm.weight"

    wrong = _plans_with(split, _t5_variant(tmp_path, on_the_decoders))
    assert set(wrong) == {"encoder", "decoder"}
    moved = write_moved(split, tmp_path / "wrong", wrong, maps)
    assert output_change(before, run(moved, case), case, maps) > CHANGED


def test_untying_t5_v1_0_pins_its_output_scale(saved, tmp_path):
    """v1.0 scales the decoder output by d_model^-0.5; transformers 5 derives that from the tie flag
    when config.json does not say: untying without pinning scale_decoder_outputs changes it."""
    case = CASES["t5-v1.0-untie-4.x-config"]
    folder, before = saved("t5-v1.0-untie-4.x-config")
    plan = plans_for(folder, allow_untie=True)["encoder+decoder"]
    assert plan.config_updates == {"tie_word_embeddings": False, "scale_decoder_outputs": True}
    unpinned = {"encoder+decoder": dataclasses.replace(plan, config_updates={"tie_word_embeddings": False})}
    maps = random_maps(unpinned, orthogonal=True)
    moved = write_moved(folder, tmp_path / "moved", unpinned, maps)
    assert output_change(before, run(moved, case), case, maps) > CHANGED


# ---------------------------------------------------------------------- refusals


def _with_extra_tensor(folder: Path, dst: Path, name: str, value: torch.Tensor) -> Path:
    shutil.copytree(folder, dst)
    checkpoint = Checkpoint.open(folder)
    tensors = {n: checkpoint.get(n) for n in checkpoint.names()}
    save_file({**tensors, name: value}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_an_unknown_tensor_is_refused(saved, tmp_path):
    folder, _ = saved("bert-seq-cls")
    adapter = _with_extra_tensor(folder, tmp_path / "adapter", "adapter.down.weight", torch.zeros(4, 30))
    with pytest.raises(InputError, match="'adapter.down.weight' is not classified"):
        plans_for(adapter)


def test_a_class_dependent_head_needs_the_model_class(saved, tmp_path):
    folder, _ = saved("bert-seq-cls")
    classless = tmp_path / "classless"
    shutil.copytree(folder, classless)
    config = json.loads((classless / "config.json").read_text())
    del config["architectures"]
    (classless / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="'classifier.weight' is not classified.*none in config.json"):
        plans_for(classless)


def test_a_stream_tensor_of_the_wrong_width_is_refused(tmp_path):
    folder = save_case(Case("deberta-v2", overrides={"embedding_size": 16}), tmp_path / "narrow")
    with pytest.raises(InputError, match="embeddings"):
        plans_for(folder)


def test_a_spec_without_a_residual_section_is_refused(saved, tmp_path):
    folder, _ = saved("bert-seq-cls")
    spec_file = tmp_path / "bert.yaml"
    spec_file.write_text((Path(builtin_specs()["bert"].source)).read_text().split("\nresidual:")[0])
    checkpoint = Checkpoint.open(folder)
    bound = bind(load_spec_file(spec_file), checkpoint.config, checkpoint, str(folder))
    with pytest.raises(InputError, match="no residual: section"):
        residual_plans(bound, checkpoint)


def test_a_bare_rmsnorm_model_gets_permutations_only(saved):
    folder, _ = saved("llama-bare-permutation")
    plan = plans_for(folder, allow_untie=True)[""]
    assert not plan.orthogonal and not plan.folds
    assert any("'norm.weight' feeds no weight" in note for note in plan.notes)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"norm": "batchnorm"}, "norm must be one of"),
        ({"norm": "layernorm", "model": [{"reads": "a", "table": "b"}]}, "exactly one of"),
        ({"norm": "rmsnorm", "model": [{"norm": "g", "bias": "b", "readers": ["w"]}]}, "bias goes with"),
        ({"norm": "layernorm", "model": [{"table": "g", "bias": "b"}]}, "bias goes with"),
        ({"norm": "layernorm", "model": [{"norm": ["g", "h"], "bias": "b", "readers": ["w"]}]}, "bias goes with"),
        ({"norm": "rmsnorm", "model": [{"norm": "g"}]}, "readers go with norm"),
        ({"norm": "layernorm", "model": [{"reads": "a", "layout": "sideways"}]}, "layout must be"),
        ({"norm": "layernorm", "heads": []}, "unknown key 'heads' in residual"),
        ({"norm": "layernorm", "layer": [{"table": "a", "colour": 1}]}, "unknown key 'colour'"),
        ({"norm": "layernorm", "layer": ["table: a"]}, "must be a mapping"),
        (
            {"norm": "rmsnorm", "tie": {"embedding": "e", "head": "h", "untie": True}},
            "unknown key 'untie' in residual tie",
        ),
    ],
)
def test_invalid_residual_sections_are_refused_when_the_spec_loads(tmp_path, raw, message):
    spec = tmp_path / "mine.yaml"
    spec.write_text(yaml.safe_dump({"extends": "llama", "name": "mine", "residual": raw}))
    with pytest.raises(InputError, match=message) as caught:
        load_spec_file(spec)
    assert str(spec) in str(caught.value)
