"""Multimodal Gemma 3 checkpoints in the hub's naming era (configs/archs/gemma3_mm.yaml `renames`).

google/gemma-3-* were saved by transformers 4.5x, whose names keep SiglipVisionModel's inner module
(`vision_tower.vision_model.encoder.layers.N...`); transformers 5 writes `vision_tower.encoder...` and
loads both. The tests write the tiny model's tensors under the hub's names themselves, check that
transformers 5 loads that folder to the same function, and that rotfuse binds the spec to it, keeps
the function, recovers a scramble, pairs it with an anchor of the other era and writes the input's names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import run_here
from helpers.functions import assert_same_function, max_relative_change
from helpers.gemma3_mm import trained_like_pair
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.archs.bind import bind, select_spec
from rotfuse.archs.spec import load_spec_file
from rotfuse.core.errors import InputError
from rotfuse.eval.runtime import load_model
from rotfuse.symmetry.names import symmetry_set

T5_VISION, HUB_VISION = "vision_tower.", "vision_tower.vision_model."


def _hub_name(name: str) -> str:
    return HUB_VISION + name[len(T5_VISION) :] if name.startswith(T5_VISION) else name


def _rewrite(folder: Path, out: Path, rename) -> Path:
    """A copy of a single-file checkpoint with its tensors renamed."""
    out.mkdir()
    for item in folder.iterdir():
        if item.name != "model.safetensors":
            (out / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _names(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return set(handle.keys())


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The tiny model and a different-seed anchor as transformers 5 writes them (trained-like
    projector and norm gains), and the model again under the hub's names."""
    root = tmp_path_factory.mktemp("gemma3-hub")
    model, anchor = trained_like_pair(root)
    hub = _rewrite(model, root / "hub", _hub_name)
    return {"model": model, "anchor": anchor, "hub": hub}


def test_transformers_5_loads_the_hub_names_to_the_same_function(folders):
    hub = folders["hub"]
    assert any(name.startswith(HUB_VISION + "encoder.layers.0.") for name in _names(hub))
    cls = type(load_model(folders["model"]))
    _, info = cls.from_pretrained(str(hub), local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert max_relative_change(folders["model"], hub) == 0.0


def test_the_spec_binds_to_either_era(folders):
    names = {}
    for era in ("model", "hub"):
        config = json.loads((folders[era] / "config.json").read_text())
        bound = bind(select_spec(config), config, _names(folders[era]), where=era)
        assert bound.spec.name == "gemma3_mm" and not bound.absent
        names[era] = bound
    layer = next(layer for layer in names["hub"].layers() if layer.stack == "vision")
    assert names["hub"].full_name(layer, "mlp.fc1.weight") == HUB_VISION + "encoder.layers.0.mlp.fc1.weight"
    assert names["model"].full_name(layer, "mlp.fc1.weight") == T5_VISION + "encoder.layers.0.mlp.fc1.weight"
    assert names["hub"].canonical(HUB_VISION + "post_layernorm.weight") == T5_VISION + "post_layernorm.weight"


def test_scramble_and_match_back_in_the_hub_era(folders, tmp_path):
    hub = folders["hub"]
    scramble(hub, tmp_path / "scrambled", MatchOptions(device="cpu"), seed=5)
    assert _names(tmp_path / "scrambled") == _names(hub)
    assert_same_function(hub, tmp_path / "scrambled")
    before = load_file(str(hub / "model.safetensors"))
    moved = load_file(str(tmp_path / "scrambled" / "model.safetensors"))
    fc1 = HUB_VISION + "encoder.layers.1.mlp.fc1.weight"
    assert not torch.equal(before[fc1], moved[fc1])  # the vision tower moved under its hub names
    report = match(hub, tmp_path / "scrambled", tmp_path / "back", MatchOptions(device="cpu"))
    totals = report["totals"]["matched"]
    assert totals["before"] > 1.0
    assert totals["after"] < 1e-5 * totals["before"]
    assert _names(tmp_path / "back") == _names(hub)
    assert_same_function(hub, tmp_path / "back")


def test_both_residual_streams_move_in_the_hub_era(folders, tmp_path):
    """The residual sections' names (embeddings, post_layernorm, projector) follow the renames too."""
    hub = folders["hub"]
    options = MatchOptions(symmetries=symmetry_set("default,residual"), device="cpu")
    report = scramble(hub, tmp_path / "scrambled", options, seed=9)
    assert report["residual"]["maps"] == {"text": "permutation", "vision": "permutation"}
    assert _names(tmp_path / "scrambled") == _names(hub)
    moved = load_file(str(tmp_path / "scrambled" / "model.safetensors"))
    patch = HUB_VISION + "embeddings.patch_embedding.weight"
    assert not torch.equal(moved[patch], load_file(str(hub / "model.safetensors"))[patch])
    assert_same_function(hub, tmp_path / "scrambled", main_only=True)


def test_an_anchor_of_the_other_era_pairs_by_meaning(folders, tmp_path):
    """A hub-era model matched to a transformers-5-era anchor: the same alignment as in one era (the
    pairing follows the renames), the output in the model's (hub) names."""
    hub, anchor, model = folders["hub"], folders["anchor"], folders["model"]
    across = match(anchor, hub, tmp_path / "across", MatchOptions(device="cpu"))
    same = match(anchor, model, tmp_path / "same", MatchOptions(device="cpu"))
    assert across["totals"]["matched"]["after"] == pytest.approx(same["totals"]["matched"]["after"], rel=1e-6)
    assert across["totals"]["matched"]["after"] < 0.99 * across["totals"]["matched"]["before"]
    assert _names(tmp_path / "across") == _names(hub)
    assert_same_function(hub, tmp_path / "across")
    ours = load_file(str(tmp_path / "across" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "same" / "model.safetensors"))
    for name, value in theirs.items():
        assert torch.allclose(ours[_hub_name(name)], value, atol=1e-6), name


def test_a_checkpoint_mixing_both_eras_is_refused(folders, tmp_path):
    """The vision tower under both names: which one transformers would load is not rotfuse's guess."""
    model = folders["model"]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for item in model.iterdir():
        if item.name != "model.safetensors":
            (mixed / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(model / "model.safetensors"))
    tensors.update({_hub_name(k): v.clone() for k, v in tensors.items() if k.startswith(T5_VISION)})
    save_file(tensors, str(mixed / "model.safetensors"), metadata={"format": "pt"})
    code, err = run_here("scramble", mixed, "-o", tmp_path / "out", "-q")
    assert code == 2, err
    assert "several naming layouts" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("renames", "message"),
    [
        ('[{"multi_modal_projector.": "projector."}]', "renames no stack's layer prefix"),
        ('[{"vision_tower.": "tower."}, {"language_model.": ""}]', "not a rename"),
        ('{"vision_tower.": "tower."}', "must be a list"),
    ],
)
def test_bad_renames_are_refused_at_load(tmp_path, renames, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"extends: gemma3_mm\nname: mine\nrenames: {renames}\n")
    with pytest.raises(InputError, match=message):
        load_spec_file(spec)


def test_through_the_cli_in_the_hub_era(folders, tmp_path):
    hub, anchor = folders["hub"], folders["anchor"]
    code, err = run_here("match", anchor, hub, "-o", tmp_path / "matched", "-q")
    assert code == 0, err
    code, err = run_here("verify", hub, tmp_path / "matched", "-q")
    assert code == 0, err
    assert _names(tmp_path / "matched") == _names(hub)


def test_merge_across_the_two_eras_is_refused_naming_the_tensor(folders, tmp_path):
    """`merge` pairs tensors by their names (it binds no architecture unless --match): a hub-era
    checkpoint and a transformers-5-era one are refused with one line naming the first tensor the
    other lacks, and nothing is written (re-saving the hub checkpoint with transformers 5 renames it)."""
    hub, anchor = folders["hub"], folders["anchor"]
    code, err = run_here("merge", "--method", "simple", anchor, hub, "-o", tmp_path / "across", "-q")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "vision_tower.embeddings" in err and str(hub) in err, err
    assert not (tmp_path / "across").exists()
