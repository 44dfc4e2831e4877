"""Every restriction in the specs is necessary, not just implemented: the transform it forbids
changes the model's outputs, while the allowed one keeps them.

- RoPE: a QK rotation must be one 2-D rotation per rotate_half frequency pair (i, i + rotary/2);
  a full rotation, a reflection inside a pair, or GPT-J style (2i, 2i+1) pairs change the logits.
  With partial rotary (Phi), the pass-through coordinates take any rotation, the rotary ones not.
- Spec safeguards: dropping Phi's qk_layernorm restriction, LLaMA's rope entry, or DeBERTa's
  position projections from the QK circuit breaks the function.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.functions import assert_same_function, max_relative_change
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.symmetry.circuit import CircuitTransform
from rotfuse.symmetry.names import symmetry_set
from rotfuse.symmetry.rotation import random_rotation
from rotfuse.symmetry.weights import Attention, Linear, qk_circuit, with_qk

BROKEN = 1e-3  # a relative output change this large is a different function, not rounding


# ---------------------------------------------------------------------- QK rotations vs RoPE


def _pair_blocks(
    dh: int, pairs: list[tuple[int, int]], groups: int, gen: torch.Generator, reflect: bool = False
) -> torch.Tensor:
    """Identity except, on each listed coordinate pair, a random 2-D rotation [[c, -s], [s, c]]
    or reflection [[c, s], [s, -c]]."""
    r = torch.eye(dh, dtype=torch.float64).repeat(groups, 1, 1)
    for i, j in pairs:
        angle = torch.rand(groups, generator=gen, dtype=torch.float64) * 2 * torch.pi
        c, s = torch.cos(angle), torch.sin(angle)
        r[:, i, i], r[:, j, i] = c, s
        r[:, i, j], r[:, j, j] = (s, -c) if reflect else (-s, c)
    return r


def _pass_through_only(dh: int, rotary: int, groups: int, gen: torch.Generator) -> torch.Tensor:
    r = torch.eye(dh, dtype=torch.float64).repeat(groups, 1, 1)
    r[:, rotary:, rotary:] = random_rotation(groups, dh - rotary, 0, gen)
    return r


# kind -> (rotation builder (groups, head_dim, rotary_dim, generator) -> [G, dh, dh], keeps the function)
ROTATIONS: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {
    "rope-commuting": (lambda g, dh, rot, gen: random_rotation(g, dh, rot, gen), True),
    "full-orthogonal": (lambda g, dh, rot, gen: random_rotation(g, dh, 0, gen), False),
    "reflection-in-a-pair": (lambda g, dh, rot, gen: _pair_blocks(dh, [(0, rot // 2)], g, gen, reflect=True), False),
    "interleaved-pairs": (
        lambda g, dh, rot, gen: _pair_blocks(dh, [(2 * i, 2 * i + 1) for i in range(rot // 2)], g, gen),
        False,
    ),
    "pairs-over-the-whole-head": (lambda g, dh, rot, gen: random_rotation(g, dh, dh, gen), False),
    "pass-through-dims-only": (lambda g, dh, rot, gen: _pass_through_only(dh, rot, g, gen), True),
}
# (TINY entry, overrides): LLaMA rotates the whole head (dh 6); Phi the first 4 of 8 (factor 0.5).
# LLaMA has no pass-through coordinates, so the last two kinds mean nothing there.
MODELS = {"llama-gqa2": ("llama", {}), "phi-partial": ("phi", {})}
NOT_APPLICABLE = {("llama-gqa2", "pass-through-dims-only"), ("llama-gqa2", "pairs-over-the-whole-head")}
CASES = [(model, kind) for model in MODELS for kind in ROTATIONS if (model, kind) not in NOT_APPLICABLE]


def rotate_qk(folder: Path, out: Path, build: Callable[..., torch.Tensor], rotary_dim: int, seed: int = 0) -> Path:
    """Copy a LLaMA/Phi checkpoint, applying `build`'s rotation to every layer's QK circuit."""
    shutil.copytree(folder, out)
    config = json.loads((folder / "config.json").read_text())
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    for layer in range(config["num_hidden_layers"]):
        names = {role: f"model.layers.{layer}.self_attn.{role}_proj." for role in ("q", "k")}
        q, k = (Linear(tensors[n + "weight"], tensors.get(n + "bias")) for n in names.values())
        attention = Attention(q, k, k, q, heads, kv, head_dim)  # v and o are not read by the QK circuit
        moved = CircuitTransform(rotation=build(kv, head_dim, rotary_dim, gen)).apply(qk_circuit(attention))
        new = with_qk(attention, moved)
        for role, linear in (("q", new.q), ("k", new.k)):
            tensors[names[role] + "weight"] = linear.weight.contiguous()
            if linear.bias is not None:
                tensors[names[role] + "bias"] = linear.bias.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(("model_name", "kind"), CASES)
def test_qk_rotation_must_commute_with_rope(tmp_path, model_name, kind):
    tiny, overrides = MODELS[model_name]
    model = save_tiny(tiny, tmp_path / "model", seed=0, **overrides)
    config = json.loads((model / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor = (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0) if tiny == "phi" else 1.0
    build, keeps = ROTATIONS[kind]
    rotated = rotate_qk(model, tmp_path / "rotated", build, int(head_dim * factor))
    change = max_relative_change(model, rotated)
    if keeps:
        assert change < 2e-5, f"{kind}: outputs changed by {change:.3g}"
    else:
        assert change > BROKEN, f"{kind}: outputs changed by only {change:.3g}; the restriction would be unnecessary"


@pytest.mark.parametrize("model_name", MODELS)
def test_rope_pair_rotation_sign_is_recovered(tmp_path, model_name):
    """scramble draws QK rotations from the RoPE-commuting group; matching must find them back
    exactly, which fails if the per-pair angle's sign convention disagrees with rotate_half."""
    tiny, overrides = MODELS[model_name]
    model = save_tiny(tiny, tmp_path / "model", seed=0, **overrides)
    options = MatchOptions(symmetries=symmetry_set("qk.rot"), device="cpu")
    scramble(model, tmp_path / "scrambled", options, seed=4)
    assert_same_function(model, tmp_path / "scrambled")
    report = match(model, tmp_path / "scrambled", tmp_path / "back", options)
    for row in report["layers"]:
        qk = row["modules"]["attn.qk"]
        assert qk["before"] > 1.0 and qk["after"] < 1e-5 * qk["before"], row


# ---------------------------------------------------------------------- spec safeguards

DEBERTA_WITHOUT_POSITION_PROJECTIONS = """
extends: deberta-v2
name: deberta-v2
attention:
  q: {weight: attention.self.query_proj.weight, bias: attention.self.query_proj.bias}
  k: {weight: attention.self.key_proj.weight, bias: attention.self.key_proj.bias}
  v: {weight: attention.self.value_proj.weight, bias: attention.self.value_proj.bias}
  o: {weight: attention.output.dense.weight}
passive: ["attention.output.*", "output.*", "attention.self.pos_*"]
"""
# variant -> (TINY entry, overrides, spec text that drops one safeguard)
SAFEGUARDS = {
    "phi-qk-layernorm-unrestricted": ("phi", {"qk_layernorm": True}, "extends: phi\nname: phi\nrestrictions: []\n"),
    "llama-without-rope": ("llama", {}, "extends: llama\nname: llama\nrope: null\n"),
    "deberta-position-projections-left-out": ("deberta-v2", {}, DEBERTA_WITHOUT_POSITION_PROJECTIONS),
}


@pytest.mark.parametrize("variant", SAFEGUARDS)
def test_dropping_a_spec_safeguard_breaks_the_function(tmp_path, variant):
    tiny, overrides, spec_text = SAFEGUARDS[variant]
    model = save_tiny(tiny, tmp_path / "model", seed=0, **overrides)
    spec = tmp_path / "variant.yaml"
    spec.write_text(spec_text)
    qk = symmetry_set("qk.rot")
    scramble(model, tmp_path / "safe", MatchOptions(symmetries=qk, device="cpu"), seed=2)
    scramble(model, tmp_path / "unsafe", MatchOptions(symmetries=qk, device="cpu", arch_spec=spec), seed=2)
    assert_same_function(model, tmp_path / "safe")
    assert max_relative_change(model, tmp_path / "unsafe") > BROKEN
