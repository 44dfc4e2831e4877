"""Mixtures of experts (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE): whole experts permute
with the router's rows, each expert's neurons on their own index, the shared expert as a plain
FFN. Function preservation and recovery for the default group are in test_archs.py (CASES) and
for the residual map in test_archs_residual.py; here: that a scramble really moves whole experts
and matching finds them, that the restrictions are necessary, and the command line end to end.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.functions import assert_same_function, max_relative_change, one_thread
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.symmetry.names import symmetry_set

BROKEN = 1e-3  # a relative output change this large is a different function, not rounding
# TINY entry -> (router, one expert's tensor pattern with {e} and {w}, its (gate, up, down) names)
MOE = {
    "mixtral": (
        "model.layers.{i}.block_sparse_moe.gate.weight",
        "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight",
        ("w1", "w3", "w2"),
    ),
    "qwen2-moe": (
        "model.layers.{i}.mlp.gate.weight",
        "model.layers.{i}.mlp.experts.{e}.{w}.weight",
        ("gate_proj", "up_proj", "down_proj"),
    ),
    "qwen3-moe": (
        "model.layers.{i}.mlp.gate.weight",
        "model.layers.{i}.mlp.experts.{e}.{w}.weight",
        ("gate_proj", "up_proj", "down_proj"),
    ),
}
EXPERTS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    cache: dict[str, Path] = {}

    def get(tiny: str) -> Path:
        if tiny not in cache:
            cache[tiny] = save_tiny(tiny, root / tiny, seed=0)
        return cache[tiny]

    return get


def _edited(folder: Path, out: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    shutil.copytree(folder, out)
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    return out


@pytest.mark.parametrize("tiny", MOE)
def test_scramble_moves_whole_experts_and_matching_finds_them(saved, tmp_path, tiny):
    model = saved(tiny)
    router, _, _ = MOE[tiny]
    options = MatchOptions(symmetries=symmetry_set("experts,perm"), device="cpu")
    scramble(model, tmp_path / "s", options, seed=5)
    assert_same_function(model, tmp_path / "s")
    before, after = (load_file(str(f / "model.safetensors"))[router.format(i=0)] for f in (model, tmp_path / "s"))
    order = [int(torch.nonzero((after == row).all(dim=1))[0]) for row in before]  # router rows: a permutation
    assert sorted(order) == list(range(EXPERTS)) and order != list(range(EXPERTS))
    report = match(model, tmp_path / "s", tmp_path / "back", options)
    totals = report["totals"]["matched"]
    assert totals["after"] < 1e-5 * totals["before"]
    moe = report["layers"][0]["modules"]["moe.experts"]
    assert moe["applied"] == ["experts", "perm"] and moe["after"] < 1e-5 * moe["before"]
    assert moe["expert_permutation"] == order  # anchor slot j takes scrambled expert order[j]
    assert_same_function(model, tmp_path / "back")


@pytest.mark.parametrize("tiny", MOE)
def test_experts_must_move_with_the_router_rows(saved, tmp_path, tiny):
    """Swapping two experts' tensors keeps the function only when the router's rows swap too."""
    model = saved(tiny)
    router, pattern, names = MOE[tiny]

    def swap(tensors: dict[str, torch.Tensor], with_router: bool) -> None:
        for i in range(2):
            for w in names:
                a, b = pattern.format(i=i, e=0, w=w), pattern.format(i=i, e=1, w=w)
                tensors[a], tensors[b] = tensors[b], tensors[a]
            if with_router:
                tensors[router.format(i=i)] = tensors[router.format(i=i)][[1, 0, 2, 3]]

    assert_same_function(model, _edited(model, tmp_path / "with", lambda t: swap(t, True)))
    assert max_relative_change(model, _edited(model, tmp_path / "without", lambda t: swap(t, False))) > BROKEN


@pytest.mark.parametrize("tiny", MOE)
def test_an_experts_gate_and_up_rows_share_one_permutation(saved, tmp_path, tiny):
    """One expert's neurons: gate and up rows and down columns together keep the function; the gate
    rows alone do not."""
    model = saved(tiny)
    _, pattern, (gate, up, down) = MOE[tiny]
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))

    def permute(tensors: dict[str, torch.Tensor], whole: bool) -> None:
        for i in range(2):
            name = pattern.format(i=i, e=2, w="{}")
            tensors[name.format(gate)] = tensors[name.format(gate)][perm]
            if whole:
                tensors[name.format(up)] = tensors[name.format(up)][perm]
                tensors[name.format(down)] = tensors[name.format(down)][:, perm]

    assert_same_function(model, _edited(model, tmp_path / "whole", lambda t: permute(t, True)))
    assert max_relative_change(model, _edited(model, tmp_path / "gate", lambda t: permute(t, False))) > BROKEN


@pytest.mark.parametrize(
    "tiny, arch, modules",
    [
        ("qwen2-moe", "qwen2_moe", {"attn.qk", "attn.vo", "ffn", "moe.experts"}),  # ffn: the shared expert
        ("mixtral", "mixtral", {"attn.qk", "attn.vo", "moe.experts"}),
        ("qwen3-moe", "qwen3_moe", {"attn.qk", "attn.vo", "moe.experts"}),
    ],
)
def test_match_verify_merge_on_the_command_line(cli, saved, tmp_path, tiny, arch, modules):
    model = saved(tiny)
    anchor = save_tiny(tiny, tmp_path / "anchor", seed=1)
    result = cli("match", anchor, model, "-o", tmp_path / "aligned", "--json", "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["arch"] == arch and "experts.perm" in report["symmetries"]
    for row in report["layers"]:
        assert set(row["modules"]) == modules
        assert row["modules"]["moe.experts"]["applied"] == ["experts", "perm"]
        assert row["modules"]["moe.experts"]["after"] < row["modules"]["moe.experts"]["before"]
    verified = cli("verify", model, tmp_path / "aligned", "-q")
    assert verified.returncode == 0, verified.stderr
    merged = cli("merge", anchor, tmp_path / "aligned", "-o", tmp_path / "merged", "-q")
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "merged" / "config.json").exists()


QWEN3_MOE_UNRESTRICTED = "extends: qwen3_moe\nname: qwen3_moe\nrestrictions: []\n"


def test_qwen3_moe_qk_norm_restriction_is_necessary(saved, tmp_path):
    """q_norm/k_norm gains are 1 at init, where any QK rotation commutes with them; with trained
    (here random) gains the RoPE-commuting rotation changes the function, so it stays off."""

    def random_gains(tensors: dict[str, torch.Tensor]) -> None:
        generator = torch.Generator().manual_seed(3)
        for name in [n for n in tensors if n.endswith(("q_norm.weight", "k_norm.weight"))]:
            tensors[name] = 1 + 0.5 * torch.randn(tensors[name].shape, generator=generator)

    model = _edited(saved("qwen3-moe"), tmp_path / "model", random_gains)
    spec = tmp_path / "unrestricted.yaml"
    spec.write_text(QWEN3_MOE_UNRESTRICTED)
    qk = symmetry_set("qk.rot,heads")
    scramble(model, tmp_path / "safe", MatchOptions(symmetries=qk, device="cpu"), seed=2)
    scramble(model, tmp_path / "unsafe", MatchOptions(symmetries=qk, device="cpu", arch_spec=spec), seed=2)
    assert_same_function(model, tmp_path / "safe")  # heads still permute: the gains are shared by all heads
    assert max_relative_change(model, tmp_path / "unsafe") > BROKEN


def test_archs_lists_the_moe_specs():
    from rotfuse.archs.spec import builtin_specs
    from rotfuse.cli.archs import describe_spec

    specs = builtin_specs()
    rows = {name: describe_spec(specs[name]) for name in ("mixtral", "qwen2_moe", "qwen3_moe")}
    for row in rows.values():
        assert "experts perm (with router rows)" in row["summary"] and "FFN perm per expert" in row["summary"]
    assert "shared expert" in rows["qwen2_moe"]["summary"] and "shared expert" not in rows["mixtral"]["summary"]
    assert "no QK rot" in rows["qwen3_moe"]["summary"] and "no QK rot" not in rows["mixtral"]["summary"]


@pytest.mark.parametrize("tiny", ["mixtral", pytest.param("qwen2-moe", marks=pytest.mark.slow)])
def test_every_symmetry_with_the_residual_map_is_recovered(saved, tmp_path, tiny):
    """A random member of every symmetry at once (residual map included: the router and the experts
    move with the stream) keeps the function, and matching finds it back."""
    model = saved(tiny)
    options = MatchOptions(symmetries=symmetry_set("all"), device="cpu")
    scramble(model, tmp_path / "s", options, seed=7)
    assert_same_function(model, tmp_path / "s")
    report = match(model, tmp_path / "s", tmp_path / "back", options)
    totals = report["totals"]["matched"]
    assert totals["before"] > 1.0 and totals["after"] < 1e-5 * totals["before"]
    assert_same_function(model, tmp_path / "back")
