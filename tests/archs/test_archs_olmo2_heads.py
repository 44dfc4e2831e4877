"""OLMo 2's head permutation: q_norm / k_norm are RMSNorms over the full query / key width with a gain per
coordinate, and the RMS over the full width does not depend on the order of the heads, so whole heads (a KV
group with its query heads) permute exactly when their slices of the gains move with them (the spec's
`moves_with_heads`). Gains here are random (trained-like): at init they are all ones and would hide a
missing move. Preservation, recovery, and necessity through the tool itself (a spec without
moves_with_heads breaks the function)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers.functions import assert_same_function, max_relative_change
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.archs.spec import load_spec_file
from rotfuse.core.errors import InputError
from rotfuse.symmetry.names import symmetry_set

BROKEN = 1e-3
CONFIGS = {"gqa2": {}, "mha": {"num_key_value_heads": 4, "attention_bias": True}}
Q_NORM = "model.layers.{i}.self_attn.q_norm.weight"
DH = 6  # tiny olmo2: hidden 24, 4 heads


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("olmo2-heads")
    cache: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in cache:
            base = save_tiny("olmo2", root / f"{case}-init", seed=0, **CONFIGS[case])
            out = root / case
            shutil.copytree(base, out)
            tensors = load_file(str(base / "model.safetensors"))
            gen = torch.Generator().manual_seed(5)
            for name in [n for n in tensors if n.endswith("norm.weight")]:
                tensors[name] = 1 + 0.5 * torch.randn(tensors[name].shape, generator=gen)
            save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
            cache[case] = out
        return cache[case]

    return get


def _head_order(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which head block of `before` each head block of `after` holds (asserts it is a block permutation)."""
    a, b = before.reshape(-1, DH), after.reshape(-1, DH)
    order = [int(torch.nonzero((a == row).all(dim=1))[0]) for row in b]
    assert sorted(order) == list(range(len(order)))
    return order


@pytest.mark.parametrize("case", CONFIGS)
def test_a_random_head_permutation_moves_the_gains_and_keeps_the_function(trained, tmp_path, case):
    model = trained(case)
    scramble(model, tmp_path / "s", MatchOptions(symmetries=symmetry_set("heads"), device="cpu"), seed=3)
    assert_same_function(model, tmp_path / "s")
    before, after = (load_file(str(f / "model.safetensors")) for f in (model, tmp_path / "s"))
    moved = [_head_order(before[Q_NORM.format(i=i)], after[Q_NORM.format(i=i)]) for i in range(2)]
    assert any(order != sorted(order) for order in moved)  # the gain slices really moved


@pytest.mark.parametrize("case", CONFIGS)
def test_matching_recovers_the_heads_with_their_gains(trained, tmp_path, case):
    model = trained(case)
    options = MatchOptions(device="cpu")  # the default group: heads, VO rot/scale, FFN perm
    scramble(model, tmp_path / "s", options, seed=11)
    assert_same_function(model, tmp_path / "s")
    report = match(model, tmp_path / "s", tmp_path / "back", options)
    totals = report["totals"]["matched"]
    assert totals["before"] > 1.0 and totals["after"] < 1e-5 * totals["before"]
    assert any(row["modules"]["attn.qk"].get("head_permutation") for row in report["layers"])
    assert_same_function(model, tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    original = load_file(str(model / "model.safetensors"))
    for i in range(2):
        assert torch.allclose(back[Q_NORM.format(i=i)], original[Q_NORM.format(i=i)])


WITHOUT = """extends: olmo2
name: olmo2
moves_with_heads: {}
passive: [post_attention_layernorm.weight, post_feedforward_layernorm.weight, self_attn.q_norm.weight,
          self_attn.k_norm.weight, self_attn.o_proj.bias, mlp.down_proj.bias]
"""


def test_heads_without_their_gain_slices_break_the_function(trained, tmp_path):
    """The same scramble through a spec that leaves the gains in place changes the function."""
    model = trained("gqa2")
    spec = tmp_path / "without.yaml"
    spec.write_text(WITHOUT)
    heads = symmetry_set("heads")
    scramble(model, tmp_path / "with", MatchOptions(symmetries=heads, device="cpu"), seed=3)
    scramble(model, tmp_path / "without", MatchOptions(symmetries=heads, device="cpu", arch_spec=spec), seed=3)
    assert_same_function(model, tmp_path / "with")
    assert max_relative_change(model, tmp_path / "without") > BROKEN


def test_moves_with_heads_needs_that_circuits_rotations_and_scales_off(tmp_path):
    """A gain that only permutes cannot take a rotation or scale: the spec must always disable them."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("extends: olmo2\nname: mine\nrestrictions: []\n")
    with pytest.raises(InputError, match=r"moves_with_heads q: qk rotations .* must disable"):
        load_spec_file(spec)
