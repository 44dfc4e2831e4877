"""Refusals (exit 2, one line naming the file, tensor or model_type) and `rotfuse archs`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.functions import one_thread
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.pair import open_model
from rotfuse.align.scramble import scramble
from rotfuse.archs.spec import builtin_specs, load_spec_file
from rotfuse.cli.archs import describe_spec
from rotfuse.core.errors import InputError

ISSUE_MODEL_TYPES = {
    "gpt2",
    "deberta-v2",
    "llama",
    "mistral",
    "qwen2",
    "distilbert",
    "clip",
    "clip_vision_model",
    "clip_text_model",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def add_tensors(folder: Path, **extra) -> Path:
    """Add tensors (name -> tensor) to a single-file checkpoint."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors.update(extra)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


def set_config(folder: Path, **values) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ---------------------------------------------------------------------- unknown / mismatched models


def test_unknown_model_type_exits_2_naming_it_and_how_to_add_a_spec(cli, tmp_path):
    model = set_config(save_tiny("llama", tmp_path / "m", seed=0), model_type="mystery-llm")
    result = cli("match", model, model, "-o", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'mystery-llm'" in lines[0] and "--arch-spec" in lines[0] and "configs/archs/README.md" in lines[0]


# (anchor TINY, anchor overrides, model TINY, model overrides, words the one-line error must contain)
MISMATCHES = {
    "other-architecture": ("llama", {}, "mistral", {}, ["architecture 'mistral' differs"]),
    "gqa-ratio": ("llama", {}, "llama", {"num_key_value_heads": 1}, ["self_attn.k_proj.weight", "has shape"]),
    "ffn-width": ("qwen2", {}, "qwen2", {"intermediate_size": 31}, ["mlp.down_proj.weight", "[24, 31]"]),
    "bias-only-in-model": ("llama", {}, "llama", {"attention_bias": True}, ["self_attn.q_proj.bias", "no counterpart"]),
    "bias-only-in-anchor": ("llama", {"mlp_bias": True}, "llama", {}, ["mlp.gate_proj.bias", "no counterpart"]),
    "deberta-position-projections": (
        "deberta-v2",
        {"share_att_key": True},
        "deberta-v2",
        {},
        ["pos_", "no counterpart"],
    ),
    "clip-tower-missing-in-anchor": (
        "clip-vision-classifier",
        {},
        "clip",
        {},
        ["text_model.encoder.layers.0.", "no counterpart"],
    ),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_mismatched_checkpoints_are_refused_naming_the_first_difference(tmp_path, case):
    anchor_tiny, anchor_kw, model_tiny, model_kw, words = MISMATCHES[case]
    anchor = save_tiny(anchor_tiny, tmp_path / "anchor", seed=1, **anchor_kw)
    model = save_tiny(model_tiny, tmp_path / "model", seed=0, **model_kw)
    with pytest.raises(InputError) as error:
        match(anchor, model, tmp_path / "out", MatchOptions(device="cpu"))
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    assert not (tmp_path / "out").exists()


def test_mismatch_exits_2_from_the_cli(cli, tmp_path):
    anchor = save_tiny("gpt2", tmp_path / "anchor", seed=1)
    model = save_tiny("gpt2", tmp_path / "model", seed=0, n_inner=41)
    result = cli("match", anchor, model, "-o", tmp_path / "out")
    assert result.returncode == 2
    assert "transformer.h.0.mlp.c_fc." in result.stderr and "[41" in result.stderr


# ---------------------------------------------------------------------- tensors the spec does not know


@pytest.mark.parametrize(
    "extra",
    [
        "model.layers.1.self_attn.q_norm.weight",  # a QK-norm (Qwen3-style) would break QK symmetries
        "model.layers.0.self_attn.q_proj.lora_A.weight",  # an unmerged adapter reads the residual stream into Q
    ],
)
def test_undescribed_layer_tensors_are_refused(tmp_path, extra):
    import torch

    model = add_tensors(save_tiny("llama", tmp_path / "model", seed=0), **{extra: torch.ones(6)})
    with pytest.raises(InputError, match=extra.replace(".", r"\.") + ".*passive"):
        open_model(model)


def test_position_projection_missing_from_layer_0_is_refused(tmp_path):
    """Which DeBERTa position projections exist is read off layer 0; a later layer holding one more
    would otherwise be left untransformed while its Q or K rotates."""
    import torch

    model = save_tiny("deberta-v2", tmp_path / "model", seed=0, pos_att_type=["c2p"])
    name = "deberta.encoder.layer.1.attention.self.pos_query_proj.weight"
    add_tensors(model, **{name: torch.zeros(30, 30)})
    with pytest.raises(InputError, match=name.replace(".", r"\.") + ".*layer 0"):
        scramble(model, tmp_path / "out", MatchOptions(device="cpu"), seed=0)


def test_layers_beyond_the_config_are_refused(tmp_path):
    import torch

    model = add_tensors(
        save_tiny("gpt2", tmp_path / "model", seed=0), **{"transformer.h.7.ln_1.weight": torch.ones(24)}
    )
    with pytest.raises(InputError, match=r"transformer\.h\.7\.ln_1\.weight.*layer 7.*2 layers"):
        open_model(model)


def test_odd_partial_rotary_dimension_is_refused(tmp_path):
    model = save_tiny("phi", tmp_path / "model", seed=0)
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"]["partial_rotary_factor"] = 0.375  # 8 * 0.375 = 3
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="rotary dimension 3"):
        open_model(model)


# ---------------------------------------------------------------------- spec files

INVALID_SPECS = {
    "o-bias": (
        "extends: gpt2\nname: x\nattention:\n  qkv: {weight: a, order: [q, k, v]}\n  o: {weight: o, bias: ob}\n",
        "passive",
    ),
    "rope-style": ("extends: llama\nname: x\nrope: {style: interleaved}\n", "rope style"),
    "qkv-and-q": (
        "extends: gpt2\nname: x\nattention:\n  qkv: {weight: a, order: [q, k, v]}\n  q: {weight: q}\n"
        "  o: {weight: o}\n",
        "not both",
    ),
    "no-index": ("extends: llama\nname: x\nlayer: layers.\n", "{i}"),
    "circular": ("extends: circular\nname: x\n", "circular"),
    "gain-offset-on-table": (
        "extends: gemma\nname: x\nresidual: {norm: rmsnorm, layer: [{table: a, gain_offset: 1.0}]}\n",
        "gain_offset",
    ),
    "gain-offset-not-a-number": (
        "extends: gemma\nname: x\nresidual: {norm: rmsnorm, layer: [{norm: a, readers: [], gain_offset: one}]}\n",
        "gain_offset",
    ),
}


@pytest.mark.parametrize("case", INVALID_SPECS)
def test_invalid_specs_are_refused_naming_the_file(tmp_path, case):
    text, words = INVALID_SPECS[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as error:
        load_spec_file(path)
    assert str(path) in str(error.value) and words in str(error.value), str(error.value)


# ---------------------------------------------------------------------- rotfuse archs


def test_archs_json_lists_every_architecture_with_its_group(cli):
    result = cli("archs", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["architectures"]}
    assert {t for row in rows.values() for t in row["model_types"]} >= ISSUE_MODEL_TYPES
    for name in ("llama", "mistral", "qwen2"):
        assert "RoPE-commuting" in rows[name]["summary"] and "GQA" in rows[name]["summary"]
        assert "gate_proj+up_proj" in rows[name]["summary"]
    assert "partial rotary" in rows["phi"]["summary"]
    assert "fused Q|K|V" in rows["gpt2"]["summary"] and "Conv1D" in rows["gpt2"]["summary"]
    assert "pos_key_proj" in rows["deberta-v2"]["summary"]
    assert [s["name"] for s in rows["clip"]["stacks"]] == ["text", "vision"]
    bert = rows["bert"]["restrictions"][0]
    assert bert["disable"] == ["qk.linear", "qk.rot", "qk.scale"]
    assert "relative_key" in bert["when_text"] and bert["reason"]
    assert "RoPE" not in rows["bert"]["summary"]


def test_archs_describes_a_new_spec_from_its_yaml(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "extends: bert\nname: mine\nrope: {partial_factor_key: rotary_pct}\n"
        "dims: {num_layers: n, num_heads: h, hidden_size: d, num_kv_heads: kv}\n"
    )
    row = describe_spec(load_spec_file(path))
    assert "QK rot (RoPE-commuting, partial rotary)" in row["summary"] and "GQA" in row["summary"]
    assert row["restrictions"][0]["disable"] == ["qk.linear", "qk.rot", "qk.scale"]  # inherited from bert


def test_archs_spec_dir_json_parses(cli):
    result = cli("archs", "--spec-dir", "--json")
    assert Path(json.loads(result.stdout)["spec_dir"]).is_dir()


def test_spec_readme_documents_every_key():
    readme = (Path(next(iter(builtin_specs().values())).source).parent / "README.md").read_text()
    for key in (
        "prefixes",
        "dims",
        "layer",
        "attention",
        "qkv",
        "order",
        "layout",
        "q_like",
        "k_like",
        "ffn",
        "inputs",
        "output",
        "rope",
        "partial_factor_key",
        "partial_factor_default",
        "passive",
        "stacks",
        "config_section",
        "optional",
        "restrictions",
        "when",
        "disable",
        "reason",
        "extends",
    ):
        assert f"`{key}`" in readme, key
