"""Qwen2-MoE / Qwen3-MoE with dense layers (`mlp_only_layers`, `decoder_sparse_step`): such a layer has a
dense mlp.gate_proj/up_proj/down_proj instead of the router and experts. The specs list it as an
alternative FFN layout (`ffn_layouts`), which binding picks per layer by the tensors the layer holds. Here:
a random member of every symmetry (residual map included) keeps the function and matching finds it back,
the dense layers really move, a layer holding both layouts or neither is refused, and the CLI end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.cli import run_here
from helpers.functions import assert_same_function
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.symmetry.names import symmetry_set

# case -> (TINY entry, config overrides, the dense layers of its 2)
DENSE = {
    "qwen2-moe-mlp-only-layers": ("qwen2-moe", {"mlp_only_layers": [1]}, [1]),
    "qwen2-moe-sparse-step-2": ("qwen2-moe", {"decoder_sparse_step": 2}, [0]),  # layer 0 dense
    "qwen3-moe-mlp-only-layers": ("qwen3-moe", {"mlp_only_layers": [0]}, [0]),
}
DOWN = "model.layers.{i}.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    cache: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in cache:
            tiny, overrides, _ = DENSE[case]
            cache[case] = save_tiny(tiny, root / case, seed=0, **overrides)
        return cache[case]

    return get


@pytest.mark.parametrize("case", DENSE)
def test_the_checkpoint_really_has_dense_layers(saved, case):
    names = set(load_file(str(saved(case) / "model.safetensors")))
    dense = DENSE[case][2]
    for i in range(2):
        assert (DOWN.format(i=i) in names) == (i in dense)
        assert (f"model.layers.{i}.mlp.gate.weight" in names) == (i not in dense)


@pytest.mark.parametrize("group", ["perm,rot,scale", pytest.param("all", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", DENSE)
def test_every_symmetry_keeps_the_function_and_is_recovered(saved, tmp_path, case, group):
    """Per-layer symmetries alone, then with the residual map: the dense layers' FFN permutation and the
    stream move with the rest; matching the scrambled copy back is exact."""
    model = saved(case)
    options = MatchOptions(symmetries=symmetry_set(group), device="cpu")
    scramble(model, tmp_path / "s", options, seed=7)
    assert_same_function(model, tmp_path / "s")
    before, after = (load_file(str(f / "model.safetensors")) for f in (model, tmp_path / "s"))
    for i in DENSE[case][2]:  # the dense FFN moved
        assert not torch.equal(before[DOWN.format(i=i)], after[DOWN.format(i=i)])
    report = match(model, tmp_path / "s", tmp_path / "back", options)
    totals = report["totals"]["matched"]
    assert totals["before"] > 1.0 and totals["after"] < 1e-5 * totals["before"]
    for row in report["layers"]:
        dense = row["layer"] in [str(i) for i in DENSE[case][2]]
        assert ("moe.experts" in row["modules"]) != dense and (not dense or "ffn" in row["modules"])
        ffn = row["modules"].get("ffn")
        if ffn is not None:
            assert ffn["after"] < 1e-5 * max(ffn["before"], 1e-12) + 1e-9
    assert_same_function(model, tmp_path / "back")


def _edited(folder: Path, out: Path, edit) -> Path:
    shutil.copytree(folder, out)
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    return out


def test_a_layer_with_both_layouts_or_neither_is_refused(saved, tmp_path):
    """Binding picks one layout per layer: a sparse layer that also holds a dense FFN, or a layer with
    no FFN at all, is refused -- exit 2, one line naming the layer, nothing written."""
    model = saved("qwen2-moe-mlp-only-layers")

    def both(tensors):
        for w in ("gate_proj", "up_proj", "down_proj"):
            tensors[f"model.layers.0.mlp.{w}.weight"] = tensors[f"model.layers.1.mlp.{w}.weight"].clone()

    def neither(tensors):
        for w in ("gate_proj", "up_proj", "down_proj"):
            del tensors[f"model.layers.1.mlp.{w}.weight"]

    for edit, layer, what in ((both, 0, "several (default, dense)"), (neither, 1, "none")):
        broken = _edited(model, tmp_path / what.split()[0], edit)
        code, err = run_here("scramble", broken, "-o", tmp_path / f"out-{layer}", "--seed", "1", "-q")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert f"'model.layers.{layer}.' matches {what}" in lines[0], err
        assert not (tmp_path / f"out-{layer}").exists()


def test_match_and_verify_on_the_command_line(cli, saved, tmp_path):
    case = "qwen2-moe-sparse-step-2"
    tiny, overrides, dense = DENSE[case]
    model = saved(case)
    anchor = save_tiny(tiny, tmp_path / "anchor", seed=1, **overrides)
    result = cli("match", anchor, model, "-o", tmp_path / "aligned", "--json", "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["arch"] == "qwen2_moe"
    rows = report["layers"]
    assert set(rows[dense[0]]["modules"]) == {"attn.qk", "attn.vo", "ffn"}
    assert set(rows[1]["modules"]) == {"attn.qk", "attn.vo", "ffn", "moe.experts"}
    ffn = rows[dense[0]]["modules"]["ffn"]
    assert ffn["after"] < ffn["before"]
    verified = cli("verify", model, tmp_path / "aligned", "-q")
    assert verified.returncode == 0, verified.stderr


@pytest.mark.parametrize(
    "layouts, message",
    [
        ("[{name: dense}]", "needs an ffn or experts"),
        (
            "[{name: dense, ffn: {inputs: [{weight: a.weight, optional: true}], output: {weight: b.weight}}}]",
            "cannot be optional",
        ),
        ("[{name: default, ffn: {inputs: [{weight: a.weight}], output: {weight: b.weight}}}]", "must be distinct"),
    ],
)
def test_bad_ffn_layouts_are_refused_when_the_spec_loads(tmp_path, layouts, message):
    from rotfuse.archs.spec import load_spec_file
    from rotfuse.core.errors import InputError

    spec = tmp_path / "spec.yaml"
    spec.write_text(f"extends: qwen3_moe\nname: mine\nffn_layouts: {layouts}\n")
    with pytest.raises(InputError, match=message):
        load_spec_file(spec)
