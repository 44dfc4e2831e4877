"""Decoder LLM families (issue 17): the exactness findings written in each spec's comments.

Function preservation and recovery of the allowed group run through the parametrised cases in
test_archs.py (per-layer maps) and test_archs_residual.py (the residual stream); this file shows
that each family's restrictions are necessary -- the transform the spec must NOT allow changes
the outputs -- and runs every family through the CLI once (scramble, match back, match, verify,
merge, and the residual map).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.cli import run_here
from helpers.functions import assert_same_function, max_relative_change
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.symmetry.names import symmetry_set
from rotfuse.symmetry.rotation import random_rotation

BROKEN = 1e-3  # a relative output change this large is a different function, not rounding
SAME = 2e-5


def edit(folder: Path, out: Path, change: Callable[[dict[str, torch.Tensor], dict], None]) -> Path:
    """Copy a single-file checkpoint, letting `change(tensors, config)` edit its tensors in place."""
    shutil.copytree(folder, out)
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    change(tensors, config)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    return out


def per_head(weight: torch.Tensor, head_dim: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`fn` applied to each head's [head_dim, ...] block of a [heads * head_dim, ...] tensor."""
    heads = weight.shape[0] // head_dim
    blocks = weight.reshape(heads, head_dim, *weight.shape[1:])
    return torch.stack([fn(b) for b in blocks]).reshape(weight.shape)


def rope_rotation(head_dim: int, seed: int) -> torch.Tensor:
    """A random member of the RoPE-commuting group: one 2-D rotation per rotate_half pair."""
    return random_rotation(1, head_dim, head_dim, torch.Generator().manual_seed(seed))[0].float()


# ---------------------------------------------------------------------- Qwen3: per-head q_norm / k_norm

QWEN3_ATT = "model.layers.{i}.self_attn."


def _qwen3_gains(uniform: bool) -> Callable[[dict[str, torch.Tensor], dict], None]:
    """Set every q_norm / k_norm gain: all equal (a constant != 1), or random and unequal in pairs."""

    def change(tensors: dict[str, torch.Tensor], config: dict) -> None:
        gen = torch.Generator().manual_seed(5)
        for name in tensors:
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                size = tensors[name].shape
                tensors[name] = torch.full(size, 1.7) if uniform else 1 + 0.5 * torch.randn(size, generator=gen)

    return change


def _qwen3_qk(
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None, q_scale: float = 1.0, k_scale: float = 1.0
) -> Callable[[dict[str, torch.Tensor], dict], None]:
    """Q and K rows of every head moved by `transform` (R^T applied to [dh, d] blocks) and scaled."""

    def change(tensors: dict[str, torch.Tensor], config: dict) -> None:
        dh = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        for i in range(config["num_hidden_layers"]):
            for role, scale in (("q", q_scale), ("k", k_scale)):
                name = QWEN3_ATT.format(i=i) + f"{role}_proj.weight"
                moved = per_head(tensors[name], dh, transform) if transform else tensors[name]
                tensors[name] = moved * scale

    return change


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen3")
    base = save_tiny("qwen3", root / "init", seed=0)
    return {
        "init": base,
        "uniform": edit(base, root / "uniform", _qwen3_gains(uniform=True)),
        "trained": edit(base, root / "trained", _qwen3_gains(uniform=False)),
    }


def test_qwen3_rope_rotation_is_exact_only_where_it_commutes_with_the_qk_norm_gains(qwen3, tmp_path):
    rotation = rope_rotation(6, seed=3)
    rotate = _qwen3_qk(lambda block: rotation.T @ block)
    # equal gains commute with every rotation: the RoPE-commuting group is exact
    assert_same_function(qwen3["uniform"], edit(qwen3["uniform"], tmp_path / "u", rotate))
    # unequal gains (any trained model): the same rotation breaks the function -> qk.rot off
    change = max_relative_change(qwen3["trained"], edit(qwen3["trained"], tmp_path / "t", rotate))
    assert change > BROKEN, change
    # what is left with unequal gains: a sign flip of a whole rotate_half pair (angle pi)
    flip = torch.ones(6)
    flip[[1, 4]] = -1
    flipped = edit(qwen3["trained"], tmp_path / "f", _qwen3_qk(lambda b: flip[:, None] * b))
    assert_same_function(qwen3["trained"], flipped)


def test_qwen3_qk_rescaling_is_not_exact(qwen3, tmp_path):
    """The norm divides the scale out of q and of k: (a, 1/a) changes only the eps term, which shows
    once a^2 * mean(q^2) is near eps -- not a symmetry of the projection weights."""
    scaled = edit(qwen3["trained"], tmp_path / "s", _qwen3_qk(q_scale=1e-3, k_scale=1e3))
    assert max_relative_change(qwen3["trained"], scaled) > BROKEN


def test_qwen3_qk_norm_gain_rescaling_is_the_new_freedom(qwen3, tmp_path):
    """The scale freedom the norm creates lives in its gains: q_norm * a with k_norm / a is exact
    (rotfuse does not move norm gains, hence no qk.scale for Qwen3)."""

    def change(tensors: dict[str, torch.Tensor], config: dict) -> None:
        for name in tensors:
            if name.endswith("q_norm.weight"):
                tensors[name] = tensors[name] * 2.5
            elif name.endswith("k_norm.weight"):
                tensors[name] = tensors[name] / 2.5

    assert_same_function(qwen3["trained"], edit(qwen3["trained"], tmp_path / "g", change))


# ---------------------------------------------------------------------- Phi-3: fused gate_up_proj, partial RoPE


def _phi3_ffn(perm_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[dict, dict], None]:
    """Permute down_proj's columns by a random neuron permutation and gate_up_proj's rows by
    `perm_rows(weight, perm)`."""

    def change(tensors: dict[str, torch.Tensor], config: dict) -> None:
        perm = torch.randperm(config["intermediate_size"], generator=torch.Generator().manual_seed(2))
        for i in range(config["num_hidden_layers"]):
            ffn = f"model.layers.{i}.mlp."
            tensors[ffn + "down_proj.weight"] = tensors[ffn + "down_proj.weight"][:, perm]
            tensors[ffn + "gate_up_proj.weight"] = perm_rows(tensors[ffn + "gate_up_proj.weight"], perm)

    return change


def _both_halves(weight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    gate, up = weight.chunk(2)
    return torch.cat([gate[perm], up[perm]])


def _gate_half_only(weight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    gate, up = weight.chunk(2)
    return torch.cat([gate[perm], up])


@pytest.mark.parametrize(("split", "keeps"), [(_both_halves, True), (_gate_half_only, False)])
def test_phi3_gate_up_proj_is_two_projections_sharing_the_neuron_index(tmp_path, split, keeps):
    model = save_tiny("phi3", tmp_path / "model", seed=0)
    change = max_relative_change(model, edit(model, tmp_path / "moved", _phi3_ffn(split)))
    assert (change < SAME) if keeps else (change > BROKEN), change


def test_phi3_partial_rotary_factor_is_necessary(tmp_path):
    """Read without its partial rotary factor, the spec would pair coordinates over the whole head."""
    model = save_tiny("phi3", tmp_path / "model", seed=0)
    spec = tmp_path / "variant.yaml"
    spec.write_text("extends: phi3\nname: phi3\nrope: {style: rotate_half}\n")
    qk = symmetry_set("qk.rot")
    scramble(model, tmp_path / "safe", MatchOptions(symmetries=qk, device="cpu"), seed=2)
    scramble(model, tmp_path / "unsafe", MatchOptions(symmetries=qk, device="cpu", arch_spec=spec), seed=2)
    assert_same_function(model, tmp_path / "safe")
    assert max_relative_change(model, tmp_path / "unsafe") > BROKEN


# ---------------------------------------------------------------------- GPT-NeoX: per-head fused QKV, partial RoPE

NEOX_STACKED_QKV = """extends: gpt_neox
name: gpt_neox
attention:
  qkv: {weight: attention.query_key_value.weight, bias: attention.query_key_value.bias, order: [q, k, v]}
  o: {weight: attention.dense.weight}
"""
# variant -> (symmetries scrambled, spec text that drops one safeguard)
NEOX_SAFEGUARDS = {
    "qkv-read-as-stacked": ("qk.rot,vo.rot", NEOX_STACKED_QKV),
    "without-partial-rotary": ("qk.rot", "extends: gpt_neox\nname: gpt_neox\nrope: {style: rotate_half}\n"),
}


@pytest.mark.parametrize("variant", NEOX_SAFEGUARDS)
def test_gpt_neox_safeguards_are_necessary(tmp_path, variant):
    symmetries, text = NEOX_SAFEGUARDS[variant]
    model = save_tiny("gpt-neox", tmp_path / "model", seed=0)
    spec = tmp_path / "variant.yaml"
    spec.write_text(text)
    chosen = symmetry_set(symmetries)
    scramble(model, tmp_path / "safe", MatchOptions(symmetries=chosen, device="cpu"), seed=2)
    scramble(model, tmp_path / "unsafe", MatchOptions(symmetries=chosen, device="cpu", arch_spec=spec), seed=2)
    assert_same_function(model, tmp_path / "safe")
    assert max_relative_change(model, tmp_path / "unsafe") > BROKEN


# ---------------------------------------------------------------------- Gemma: (1 + w) RMSNorm gains

GEMMA_FOLDED_AS_W = """extends: gemma
name: gemma
residual:
  norm: rmsnorm
  model:
    - table: embed_tokens.weight
    - {norm: norm.weight, readers: [/lm_head.weight, /score.weight]}
    - reads: [/lm_head.weight, /score.weight]
    - free: [/lm_head.bias, /score.bias]
  layer:
    - {norm: input_layernorm.weight,
       readers: [self_attn.q_proj.weight, self_attn.k_proj.weight, self_attn.v_proj.weight]}
    - {norm: post_attention_layernorm.weight, readers: [mlp.gate_proj.weight, mlp.up_proj.weight]}
    - table: self_attn.o_proj.bias
"""


def test_gemma_one_plus_w_gains_must_fold_as_one_plus_w(tmp_path):
    """With `gain_offset: 1.0` the fold uses 1 + w and any orthogonal map is exact; folded as plain
    gains w (LLaMA's fold, the spec without gain_offset) the same match breaks the function."""
    model = edit(
        save_tiny("gemma", tmp_path / "init", seed=0, tie_word_embeddings=False), tmp_path / "model", _random_norms
    )
    anchor = save_tiny("gemma", tmp_path / "anchor", seed=1, tie_word_embeddings=False)
    spec = tmp_path / "folded-as-w.yaml"
    spec.write_text(GEMMA_FOLDED_AS_W)
    residual = symmetry_set("residual")
    report = match(anchor, model, tmp_path / "ortho", MatchOptions(symmetries=residual, device="cpu"))
    assert_same_function(model, tmp_path / "ortho")
    assert report["residual"]["maps"] == {"stream": "orthogonal"}, report["residual"]
    match(anchor, model, tmp_path / "as-w", MatchOptions(symmetries=residual, device="cpu", arch_spec=spec))
    assert max_relative_change(model, tmp_path / "as-w") > BROKEN


def _random_norms(tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Every norm gain random (Gemma stores w = 0 at init, where 1 + w and w fold alike up to a factor)."""
    gen = torch.Generator().manual_seed(5)
    for name in tensors:
        if name.endswith("norm.weight"):
            tensors[name] = 0.5 * torch.randn(tensors[name].shape, generator=gen)


# ---------------------------------------------------------------------- OLMo 2: full-width QK-norm, post-sublayer norms

OLMO2_LAYERS = 2


def _olmo2_gains(post_uniform: bool = False) -> Callable[[dict[str, torch.Tensor], dict], None]:
    """Random (trained-like) gains for every norm; the post-sublayer norms' all equal if `post_uniform`."""

    def change(tensors: dict[str, torch.Tensor], config: dict) -> None:
        gen = torch.Generator().manual_seed(5)
        for name in tensors:
            if name.endswith("norm.weight"):
                size = tensors[name].shape
                post = "post_" in name
                tensors[name] = (
                    torch.full(size, 1.3) if post and post_uniform else 1 + 0.5 * torch.randn(size, generator=gen)
                )

    return change


def _olmo2_heads(order: list[int], with_gains: bool) -> Callable[[dict[str, torch.Tensor], dict], None]:
    """Whole KV groups permuted (Q, K, V rows, O columns), their q_norm / k_norm slices too or not."""

    def change(tensors: dict[str, torch.Tensor], config: dict) -> None:
        dh = config["hidden_size"] // config["num_attention_heads"]
        group = config["num_attention_heads"] // config["num_key_value_heads"]
        kv_rows = torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in order])
        q_rows = torch.cat(
            [torch.arange((h * group + j) * dh, (h * group + j + 1) * dh) for h in order for j in range(group)]
        )
        for i in range(config["num_hidden_layers"]):
            att = QWEN3_ATT.format(i=i)
            moves = {"q_proj.weight": q_rows, "k_proj.weight": kv_rows, "v_proj.weight": kv_rows}
            if with_gains:
                moves |= {"q_norm.weight": q_rows, "k_norm.weight": kv_rows}
            for name, rows in moves.items():
                tensors[att + name] = tensors[att + name][rows]
            tensors[att + "o_proj.weight"] = tensors[att + "o_proj.weight"][:, q_rows]

    return change


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("olmo2")
    base = save_tiny("olmo2", root / "init", seed=0)
    return {
        "trained": edit(base, root / "trained", _olmo2_gains()),
        "post-uniform": edit(base, root / "post-uniform", _olmo2_gains(post_uniform=True)),
    }


def test_olmo2_full_width_qk_norm_rules_out_qk_rotation_and_scale(olmo2, tmp_path):
    rotation = rope_rotation(6, seed=3)
    rotated = edit(olmo2["trained"], tmp_path / "r", _qwen3_qk(lambda block: rotation.T @ block))
    assert max_relative_change(olmo2["trained"], rotated) > BROKEN
    scaled = edit(olmo2["trained"], tmp_path / "s", _qwen3_qk(q_scale=1e-3, k_scale=1e3))
    assert max_relative_change(olmo2["trained"], scaled) > BROKEN


@pytest.mark.parametrize("with_gains", [True, False])
def test_olmo2_heads_permute_only_with_their_qk_norm_gains(olmo2, tmp_path, with_gains):
    """Exact when q_norm / k_norm move with the heads (the spec's moves_with_heads), not without them."""
    moved = edit(olmo2["trained"], tmp_path / "h", _olmo2_heads([1, 0], with_gains))
    change = max_relative_change(olmo2["trained"], moved)
    assert (change < SAME) if with_gains else (change > BROKEN), change


@pytest.mark.parametrize("post_uniform", [True, False])
def test_olmo2_post_sublayer_norms_allow_only_permutations_of_the_stream(olmo2, tmp_path, post_uniform):
    """An orthogonal map with the final norm folded into lm_head and the post-sublayer gains left alone:
    exact only while those gains are all equal (N(yQ) = N(y)Q); trained gains break it, so the spec
    declares their output the stream (`readers: []`) and gets permutations only."""
    import dataclasses

    from rotfuse.archs.bind import bind, select_spec
    from rotfuse.archs.residual import NormFold, residual_plans
    from rotfuse.io.checkpoint import Checkpoint
    from rotfuse.symmetry.residual import random_stream_map

    folder = olmo2["post-uniform" if post_uniform else "trained"]
    checkpoint = Checkpoint.open(folder)
    bound = bind(select_spec(checkpoint.config), checkpoint.config, checkpoint, str(folder))
    (plan,) = residual_plans(bound, checkpoint).values()
    assert not plan.orthogonal
    tensors = {n: t for n, t in plan.tensors.items() if "post_" not in n}
    forced = dataclasses.replace(
        plan, tensors=tensors, folds=[NormFold("model.norm.weight", ("lm_head.weight",))], orthogonal=True
    )
    q = random_stream_map(plan.hidden_size, True, torch.Generator().manual_seed(0), False)
    values = {n: checkpoint.get(n) for n in checkpoint.names()}

    def change(out: dict[str, torch.Tensor], config: dict) -> None:
        for name in out:
            out[name] = forced.transform(name, values[name], q, values.__getitem__)

    delta = max_relative_change(folder, edit(folder, tmp_path / "q", change))
    assert (delta < SAME) if post_uniform else (delta > BROKEN), delta


# ---------------------------------------------------------------------- Gemma 2 / Gemma 3: post-sublayer norms, QK-norm


def _gemma_norms(post_uniform: bool) -> Callable[[dict[str, torch.Tensor], dict], None]:
    """Random w for every (1 + w) norm; the post-sublayer norms' all equal if `post_uniform`."""

    def change(tensors: dict[str, torch.Tensor], config: dict) -> None:
        gen = torch.Generator().manual_seed(5)
        for name in tensors:
            if name.endswith("norm.weight"):
                size = tensors[name].shape
                uniform = post_uniform and ".post_" in name
                tensors[name] = torch.full(size, 0.3) if uniform else 0.5 * torch.randn(size, generator=gen)

    return change


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("post_uniform", [True, False])
def test_gemma_post_sublayer_norms_allow_only_permutations_of_the_stream(tmp_path, family, post_uniform):
    """A variant spec that leaves the post-sublayer gains alone (`free`) and folds every other norm gets
    orthogonal maps: exact while those gains are uniform, broken for trained ones -- hence `readers: []`
    in the built-in specs, and permutations only."""
    import yaml

    from rotfuse.archs.bind import bind
    from rotfuse.archs.residual import residual_plans
    from rotfuse.archs.spec import builtin_spec_dir, load_spec_file
    from rotfuse.io.checkpoint import Checkpoint
    from rotfuse.symmetry.residual import random_stream_map

    init = save_tiny(family, tmp_path / "init", seed=0, tie_word_embeddings=False)
    folder = edit(init, tmp_path / "model", _gemma_norms(post_uniform))
    raw = yaml.safe_load((builtin_spec_dir() / f"{family}.yaml").read_text())
    raw["residual"]["layer"] = [
        {"free": rule["norm"]} if "post_" in str(rule.get("norm", "")) else rule for rule in raw["residual"]["layer"]
    ]
    spec_file = tmp_path / "post-free.yaml"
    spec_file.write_text(yaml.safe_dump({"extends": family, "name": family, "residual": raw["residual"]}))
    checkpoint = Checkpoint.open(folder)
    bound = bind(load_spec_file(spec_file), checkpoint.config, checkpoint, str(folder))
    (plan,) = residual_plans(bound, checkpoint).values()
    assert plan.orthogonal
    q = random_stream_map(plan.hidden_size, True, torch.Generator().manual_seed(0), False)
    values = {n: checkpoint.get(n) for n in checkpoint.names()}

    def change(out: dict[str, torch.Tensor], config: dict) -> None:
        for name in out:
            out[name] = plan.transform(name, values[name], q, values.__getitem__)

    delta = max_relative_change(folder, edit(folder, tmp_path / "q", change))
    assert (delta < SAME) if post_uniform else (delta > BROKEN), delta


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma3")
    base = save_tiny("gemma3", root / "init", seed=0)
    return {
        "uniform": edit(base, root / "uniform", _qwen3_gains(uniform=True)),
        "trained": edit(base, root / "trained", _qwen3_gains(uniform=False)),
    }


def test_gemma3_qk_norm_rules_out_qk_rotation_and_scale(gemma3, tmp_path):
    """Gemma 3's q_norm / k_norm are Qwen3's with (1 + w) gains: a RoPE-commuting rotation is exact for
    uniform gains only, and a QK rescaling is divided out."""
    rotate = _qwen3_qk(lambda block: rope_rotation(6, seed=3).T @ block)
    assert_same_function(gemma3["uniform"], edit(gemma3["uniform"], tmp_path / "u", rotate))
    assert max_relative_change(gemma3["trained"], edit(gemma3["trained"], tmp_path / "t", rotate)) > BROKEN
    scaled = edit(gemma3["trained"], tmp_path / "s", _qwen3_qk(q_scale=1e-3, k_scale=1e3))
    assert max_relative_change(gemma3["trained"], scaled) > BROKEN


def test_gemma2_soft_capping_and_sliding_window_are_active_in_the_tiny_model():
    """The per-layer cases of test_archs.py keep the function with both in play (no vacuous pass)."""
    from helpers.tiny_models import TINY

    config = TINY["gemma2"].config()
    assert config.attn_logit_softcapping and config.final_logit_softcapping
    assert "sliding_attention" in config.layer_types and config.sliding_window < 11  # tests use 11-12 tokens


# ---------------------------------------------------------------------- every family through the CLI

# family -> TINY entry; each spec's allowed maps (and the residual map) through the command line
CLI_FAMILIES = {
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gpt_neox": "gpt-neox",
    "gemma": "gemma",
    "olmo2": "olmo2",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
}


@pytest.mark.parametrize("family", CLI_FAMILIES)
def test_family_through_the_cli(tmp_path, family):
    tiny = CLI_FAMILIES[family]
    model = save_tiny(tiny, tmp_path / "model", seed=0)
    anchor = save_tiny(tiny, tmp_path / "anchor", seed=1)
    code, err = run_here("scramble", model, "-o", tmp_path / "scrambled", "--seed", "3", "-q")
    assert code == 0, err
    assert_same_function(model, tmp_path / "scrambled")
    code, err = run_here(
        "match", model, tmp_path / "scrambled", "-o", tmp_path / "back", "-q", "--report", tmp_path / "back.json"
    )
    assert code == 0, err
    totals = json.loads((tmp_path / "back.json").read_text())["totals"]["matched"]
    assert totals["after"] < 1e-5 * totals["before"]
    for symmetries, out in (("default", "matched"), ("default,residual", "residual")):
        code, err = run_here("match", anchor, model, "-s", symmetries, "-o", tmp_path / out, "-q")
        assert code == 0, err
        code, err = run_here("verify", model, tmp_path / out, "-q")
        assert code == 0, err
    code, err = run_here("merge", anchor, tmp_path / "residual", "-o", tmp_path / "merged", "-q")
    assert code == 0, err
    assert (tmp_path / "merged" / "model.safetensors").exists()
